"""Run the packaged EasyEdit (PyPI ``easyeditor 0.0.1.dev0``, 2023) on a CPU-only machine with current transformers.

Everything here is for that release only, so that dropping its support is deleting this file (what every
generation needs, import and detection included, is in installed.py; nothing imports this module but code that
has found the 0.0.1.dev0 installed). That release was written for one CUDA GPU and transformers 4.30; three
things stop it here, and this module fixes each one only where it is needed:

* Every method and the evaluation hard-code ``cuda:{hparams.device}``; :func:`cpu_device_redirect` sends those
  requests to the CPU (a torch function mode, active only while CUDA is unavailable).
* Since transformers 4.54 Llama-family decoder layers return a tensor, while MEMIT's hooks index ``output[0]``;
  :func:`decoder_tuple_outputs` lets easyeditor's hooks see a 1-tuple and hands the model its tensor back.
* ``BaseEditor`` only loads models by name; :func:`make_editor` builds one around an in-memory model.

Sequential editing in this release is ``editor.edit(..., keep_original_weight=False)``: the methods then return an
empty ``weights_copy`` and ``edit`` restores nothing, so every edit lands on top of the previous ones.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import logging
import sys
import threading
import types
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from .editor import EDIT_ENTRY_POINTS
from .installed import check_hparams_fit, import_easyeditor, is_legacy_easyeditor, reset_easyeditor_caches

__all__ = ["patch_legacy_editor_class", "cpu_device_redirect", "decoder_tuple_outputs", "legacy_compat", "make_editor"]

LOG = logging.getLogger("prune_plugin")


# --------------------------------------------------------------------------------------------------- devices


def _is_cuda(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


_CPU = torch.device("cpu")
# Functions whose first device argument may be a bare int, which torch reads as a CUDA index.
_INT_DEVICE_POSITION = {"to": 1, "_parse_to": 0}


class _CudaToCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument of a torch call (``.to('cuda:0')``, ``device=``, ``.cuda()``) to CPU."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.device:  # naming a CUDA device is harmless; using it is what gets redirected
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0].to(_CPU, non_blocking=kwargs.get("non_blocking", False))
        if any(_is_cuda(a) for a in args) or name in _INT_DEVICE_POSITION:
            int_at = _INT_DEVICE_POSITION.get(name)
            args = tuple(
                _CPU if _is_cuda(a) or (i == int_at and type(a) is int) else a for i, a in enumerate(args))
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or type(kwargs["device"]) is int):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


_redirect_state = threading.local()


@contextlib.contextmanager
def cpu_device_redirect(enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, torch calls that ask for a CUDA device get the CPU instead.

    `enabled`: None switches the redirect on only when CUDA is unavailable; False never, True always. Nested use is
    a no-op. Yields whether a redirect is in force.
    """
    if enabled is None:
        enabled = not torch.cuda.is_available()
    if not enabled or getattr(_redirect_state, "active", False):
        yield getattr(_redirect_state, "active", False)
        return
    _redirect_state.active = True
    try:
        with _CudaToCpu():
            yield True
    finally:
        _redirect_state.active = False


# --------------------------------------------------------------------------------------------------- decoder layers


def _is_decoder_layer(root: torch.nn.Module, layer_name: str | None) -> bool:
    """A block of the model's layer stack: a numbered child of a ModuleList (``model.layers.3``, ``transformer.h.3``)."""
    if not layer_name:
        return False
    parent_name, _, index = layer_name.rpartition(".")
    if not index.isdigit():
        return False
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        return False
    return isinstance(parent, torch.nn.ModuleList)


def _tuple_view_hook(hook: Any) -> Any:
    """Wrap a forward hook so that it sees a tensor output as a 1-tuple; the model still gets a tensor back."""

    def wrapped(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            return hook(module, inputs, output)
        result = hook(module, inputs, (output,))
        return result[0] if isinstance(result, tuple) else result

    return wrapped


@contextlib.contextmanager
def decoder_tuple_outputs(easyeditor: types.ModuleType) -> Iterator[None]:
    """Within the block, easyeditor's ``nethook.Trace`` on a decoder layer sees the layer's output as a tuple.

    The 2023 code indexes ``output[0]`` (hidden states) of decoder layers; transformers >= 4.54 returns a bare
    tensor from Llama-family layers, so ``output[0]`` would silently take the first batch row. Layers that still
    return tuples (GPT-2) and every other module are left alone. Nested use is a no-op.
    """
    nethook = importlib.import_module(easyeditor.__name__ + ".util.nethook")
    original = nethook.Trace
    if getattr(original, "_prune_tuple_view", False):
        yield
        return

    class Trace(original):  # TraceDict looks `Trace` up in nethook's namespace, so this reaches it too
        _prune_tuple_view = True

        def __init__(self, module: torch.nn.Module, layer: str | None = None, *args: Any, **kwargs: Any):
            super().__init__(module, layer, *args, **kwargs)
            if _is_decoder_layer(module, layer):
                target = nethook.get_module(module, layer)
                hooks = target._forward_hooks  # replace our own hook in place, keeping its position in the chain
                hooks[self.registered_hook.id] = _tuple_view_hook(hooks[self.registered_hook.id])

    nethook.Trace = Trace
    try:
        yield
    finally:
        nethook.Trace = original


# --------------------------------------------------------------------------------------------------- together


@contextlib.contextmanager
def legacy_compat(easyeditor: types.ModuleType | None = None) -> Iterator[bool]:
    """Everything the legacy release needs while it edits: CPU redirect (if no CUDA) and decoder tuple outputs.

    Inert (yields False) when the imported easyeditor is not the legacy release.
    """
    easyeditor = easyeditor or import_easyeditor()
    if not is_legacy_easyeditor(easyeditor):
        yield False
        return
    with cpu_device_redirect(), decoder_tuple_outputs(easyeditor):
        yield True


_compat_classes: dict[type, type] = {}


def _compat_editor_class(base: type) -> type:
    """A subclass of `base` whose edit entry points run inside :func:`legacy_compat`."""
    if base not in _compat_classes:
        def entry(name: str) -> Any:
            def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                with legacy_compat(self._easyeditor):
                    return getattr(super(cls, self), name)(*args, **kwargs)
            method.__name__ = method.__qualname__ = name
            return method

        cls = type(f"LegacyCompat{base.__name__}", (base,), {
            "__module__": __name__,
            "__doc__": f"{base.__name__} whose edit entry points run inside legacy_compat() (CPU, decoder tuples).",
            **{name: entry(name) for name in EDIT_ENTRY_POINTS if hasattr(base, name)},
        })
        _compat_classes[base] = cls
    return _compat_classes[base]


_COMPAT_MARK = "__prune_legacy_compat__"


def patch_legacy_editor_class(editor_cls: type, undo: list) -> bool:
    """Run the legacy ``BaseEditor``'s ``__init__`` and edit entry points inside :func:`legacy_compat`, so that
    ``BaseEditor.from_hparams(hparams)`` with EasyEdit's own ``device: 0`` works on a CPU-only machine (it moves the
    model to ``cuda:0`` and every method asks for it). Idempotent; appends (class, attribute, original) to `undo`.

    Returns False (and patches nothing) for a current EasyEdit, which needs none of it.
    """
    easyeditor = sys.modules[editor_cls.__module__.partition(".")[0]]
    if not is_legacy_easyeditor(easyeditor) or getattr(editor_cls.__dict__["__init__"], _COMPAT_MARK, False):
        return False
    for name in ("__init__", *EDIT_ENTRY_POINTS):
        method = editor_cls.__dict__.get(name)
        if method is None:
            continue

        def compat(method: Any = method) -> Any:
            @functools.wraps(method)  # also carries the plugin's own patch marks, so activate() stays idempotent
            def run(self: Any, *args: Any, **kwargs: Any) -> Any:
                with legacy_compat(easyeditor):
                    return method(self, *args, **kwargs)
            setattr(run, _COMPAT_MARK, True)
            return run

        undo.append((editor_cls, name, method))
        setattr(editor_cls, name, compat())
    return True


def make_editor(hparams: Any, model: torch.nn.Module, tok: Any) -> Any:
    """A legacy ``BaseEditor`` around an in-memory `model` and `tok`, ready for CPU sequential editing.

    `hparams` is a loaded legacy ``XHyperParams``; it is copied, not changed. Its ``model_name`` string is kept as the
    editor's ``model_name`` (the methods test it for 't5'/'chatglm'; use the checkpoint's name). The tokenizer gets a
    pad token (its eos) if it has none, and right padding, which ROME, MEMIT and FT assume. The returned editor's
    ``edit``/``batch_edit``/``edit_requests``/``edit_dataset`` run inside :func:`legacy_compat`. easyeditor's caches
    are reset, so build one editor per model and use it before building the next.
    """
    easyeditor = import_easyeditor()
    if not is_legacy_easyeditor(easyeditor):
        raise RuntimeError("make_editor is for the legacy easyeditor 0.0.1.dev0; the installed easyeditor has "
                           "sequential_edit, build its BaseEditor directly")
    if not isinstance(hparams, easyeditor.HyperParams) or not dataclasses.is_dataclass(hparams):
        raise TypeError(f"hparams must be a loaded easyeditor hyperparameter object, not {type(hparams).__name__}")
    alg_dict = importlib.import_module(easyeditor.__name__ + ".util.alg_dict").ALG_DICT
    if hparams.alg_name not in alg_dict:
        raise ValueError(f"alg_name {hparams.alg_name!r} is not one of this easyeditor's methods {sorted(alg_dict)}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not callable(tok) or not hasattr(tok, "decode"):
        raise TypeError(f"tok must be a transformers tokenizer, not {type(tok).__name__}")
    check_hparams_fit(model, hparams)

    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"

    name = hparams.model_name if isinstance(hparams.model_name, str) else model.config._name_or_path
    # BaseEditor loads a model from a name, except when model_name is a (model, tokenizer) pair. A shallow copy
    # (not dataclasses.replace) keeps attributes that are not dataclass fields, such as a plugin's settings.
    hp = copy.copy(hparams)
    hp.model_name = (model, tok)
    editor_logger = importlib.import_module(easyeditor.__name__ + ".editors.editor").LOG
    handlers_before = list(editor_logger.handlers)
    with legacy_compat(easyeditor):  # __init__ moves the model to cuda:{device}
        editor = _compat_editor_class(easyeditor.BaseEditor)(hp)
    _drop_duplicate_handlers(editor_logger, handlers_before)
    editor.model_name = hp.model_name = name
    editor._easyeditor = easyeditor
    reset_easyeditor_caches(easyeditor)
    return editor


def _drop_duplicate_handlers(logger: logging.Logger, before: list[logging.Handler]) -> None:
    """BaseEditor.__init__ adds a file and a stream handler on every call; keep only the first editor's pair."""
    if not before:
        return
    for handler in [h for h in logger.handlers if h not in before]:
        logger.removeHandler(handler)
        handler.close()
