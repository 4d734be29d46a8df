"""Run the packaged EasyEdit (PyPI ``easyeditor 0.0.1.dev0``, 2023) on a CPU-only machine with current transformers.

That release was written for one CUDA GPU and transformers 4.30. Four things stop it here, and this module fixes
each one only where it is needed:

* ``import easyeditor`` imports its multimodal trainers and the methods we do not drive (torchvision, timm, cv2,
  fairscale, iopath, hydra, peft, openai, sentence_transformers; the current EasyEdit also av, qwen_vl_utils,
  zhipuai, rouge). Packages that do not import are replaced by placeholders for the duration of the import only
  (:func:`import_placeholders`, which the start-up hook puts around a plain ``import easyeditor``, and
  :func:`import_easyeditor`); using one raises ImportError. Where a package imports, it is used as it is.
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
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
import threading
import types
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "PLACEHOLDER_PACKAGES", "installed_easyeditor_version", "is_legacy_easyeditor", "import_placeholders",
    "import_easyeditor", "patch_legacy_editor_class",
    "cpu_device_redirect", "decoder_tuple_outputs", "legacy_compat", "reset_easyeditor_caches", "check_hparams_fit",
    "make_editor",
]

LOG = logging.getLogger("prune_plugin")

#: Packages that ``import easyeditor`` imports but the ROME/MEMIT/FT code path never uses, with what needs them.
PLACEHOLDER_PACKAGES: dict[str, str] = {
    "torchvision": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "timm": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "cv2": "the multimodal datasets",
    "fairscale": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "iopath": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "hydra": "MEND and SERAC",
    "sentence_transformers": "IKE",
    "peft": "LoRA",
    "openai": "FT-Api",
    # Imported at package import by the current EasyEdit (GitHub), none of them by an in-place method:
    "av": "the video editors",
    "qwen_vl_utils": "the Qwen-VL editors",
    "zhipuai": "the API-based editors",
    "rouge": "the safety and concept-editing evaluation",
}


# --------------------------------------------------------------------------------------------------- version


def installed_easyeditor_version() -> str | None:
    """Version of the installed ``easyeditor`` distribution, None when it is not installed as a distribution."""
    try:
        return importlib.metadata.version("easyeditor")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_legacy_easyeditor(easyeditor: types.ModuleType | None = None) -> bool:
    """True for the 2023 release, which has no ``sequential_edit`` switch on ``BaseEditor.edit``.

    With the package module given, its ``BaseEditor.edit`` signature decides (works for source checkouts too);
    otherwise the installed distribution's version does, without importing anything.
    """
    if easyeditor is not None:
        edit = easyeditor.BaseEditor.edit
        return "sequential_edit" not in inspect.signature(inspect.unwrap(edit)).parameters
    version = installed_easyeditor_version()
    return version is not None and version.startswith("0.0.1")


# --------------------------------------------------------------------------------------------------- import


class _Unavailable:
    """Stands in for anything taken from a placeholder package; calling it raises an ImportError naming it."""

    def __init__(self, name: str, root: str):
        self._name, self._root = name, root

    def __getattr__(self, attr: str) -> "_Unavailable":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}", self._root)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(
            f"{self._name} is unavailable: the package {self._root!r} did not import, and easyeditor only needs it "
            f"for {PLACEHOLDER_PACKAGES[self._root]}. Install it to use that part of easyeditor.")

    def __repr__(self) -> str:
        return f"<unavailable {self._name}>"


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an empty package for each of `roots` (and any submodule of them)."""

    def __init__(self, roots: set[str]):
        self.roots = roots
        self.served: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in self.roots or not _imported_by_easyeditor():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, "placeholder installed by prune_plugin.easyedit.legacy")
        module.__path__ = []
        root = spec.name.partition(".")[0]

        def __getattr__(attr: str) -> _Unavailable:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Unavailable(f"{spec.name}.{attr}", root)

        module.__getattr__ = __getattr__
        self.served.add(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _imported_by_easyeditor() -> bool:
    """Whether the import being resolved comes from easyeditor's own code (not, say, an availability probe of
    transformers or datasets that happens to run during ``import easyeditor``)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module.startswith(("importlib", "_frozen_importlib")) or module == __name__):
            return module == "easyeditor" or module.startswith("easyeditor.")
        frame = frame.f_back
    return False


def _imports(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # a broken install (e.g. a CUDA torchvision against CPU torch) fails with any error
        return False
    return True


_placeholders_state = threading.local()


@contextlib.contextmanager
def import_placeholders() -> Iterator[set[str]]:
    """Within the block, easyeditor's own imports of the packages in :data:`PLACEHOLDER_PACKAGES` that do not import
    here get a placeholder; yields the names of those packages. Nested use is a no-op (yields an empty set).

    Afterwards the placeholders are taken out of ``sys.modules`` again, so other code that tries ``import timm``
    still gets its ImportError; easyeditor's modules keep their references. Packages that import are left alone,
    so where torchvision / timm / cv2 are installed, this does nothing.
    """
    if getattr(_placeholders_state, "active", False):
        yield set()
        return
    # Libraries that record which optional packages exist when first imported must do so before placeholders exist.
    for name in ("transformers", "datasets"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    missing = {name for name in PLACEHOLDER_PACKAGES if not _imports(name)}
    finder = _PlaceholderFinder(missing)
    sys.meta_path.insert(0, finder)
    _placeholders_state.active = True
    try:
        yield missing
    finally:
        _placeholders_state.active = False
        sys.meta_path.remove(finder)
        for name in finder.served:
            sys.modules.pop(name, None)
        if finder.served:
            LOG.debug("imported easyeditor with placeholders for %s", sorted(missing))


def import_easyeditor() -> types.ModuleType:
    """Import and return the ``easyeditor`` package, inside :func:`import_placeholders`.

    A plain ``import easyeditor`` does the same once the start-up hook is installed (pip install of this package);
    this function works without the hook too (editable installs, PRUNE_PLUGIN_AUTOLOAD=0).
    """
    if "easyeditor" in sys.modules:
        return sys.modules["easyeditor"]
    if importlib.util.find_spec("easyeditor") is None:
        raise ImportError("easyeditor is not installed: pip install --no-deps easyeditor==0.0.1.dev0 "
                          "(with the project's constraints file)")
    with import_placeholders():
        return importlib.import_module("easyeditor")


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


def reset_easyeditor_caches(easyeditor: types.ModuleType | None = None) -> None:
    """Forget easyeditor's module-level caches: context templates (ROME, MEMIT) and covariance statistics.

    They are keyed by nothing (templates) or by ``config._name_or_path`` (covariances), so they leak across models:
    templates generated by one model's tokenizer, or a covariance of another model with the same (often empty) name.
    """
    easyeditor = easyeditor or import_easyeditor()
    for module, attr, fresh in (
        ("models.rome.rome_main", "CONTEXT_TEMPLATES_CACHE", lambda: None),
        ("models.memit.memit_main", "CONTEXT_TEMPLATES_CACHE", lambda: None),
        ("models.memit.memit_main", "COV_CACHE", dict),
        ("models.rome.compute_u", "inv_mom2_cache", dict),
    ):
        mod = importlib.import_module(f"{easyeditor.__name__}.{module}")
        if hasattr(mod, attr):
            setattr(mod, attr, fresh())


_ENTRY_POINTS = ("edit", "batch_edit", "edit_requests", "edit_dataset")
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
            **{name: entry(name) for name in _ENTRY_POINTS if hasattr(base, name)},
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
    for name in ("__init__", *_ENTRY_POINTS):
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


def check_hparams_fit(model: torch.nn.Module, hparams: Any) -> None:
    """Raise ValueError, naming the hparams key to fix, when a module template or layer does not fit `model`."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layers = list(getattr(hparams, "layers", []) or [])
    if not layers:
        raise ValueError(f"{hparams.alg_name} hparams: 'layers' is empty")
    for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp"):
        template = getattr(hparams, key, None)
        if not isinstance(template, str):
            continue
        for layer in layers:
            name = template.format(layer)
            if hparams.alg_name == "FT" and key == "rewrite_module_tmp":
                # FT edits every parameter whose name contains the formatted template
                if not any(name in p for p in params):
                    raise ValueError(f"FT hparams: rewrite_module_tmp {template!r} at layer {layer} matches no "
                                     f"parameter of {type(model).__name__}")
            elif name not in modules:
                raise ValueError(f"{hparams.alg_name} hparams: {key} {template!r} at layer {layer} names no module "
                                 f"of {type(model).__name__} (no {name!r})")
    if hparams.alg_name == "MEMIT":  # MEMIT reads the head and the final norm directly
        if f"{hparams.lm_head_module}.weight" not in params:
            embeddings = model.get_input_embeddings()
            tied_to = next((n for n, m in modules.items() if m is embeddings), None)
            raise ValueError(
                f"MEMIT hparams: lm_head_module {hparams.lm_head_module!r} has no own weight parameter"
                + (f"; if the head is tied to the input embeddings, set lm_head_module: {tied_to}" if tied_to else ""))
        if hparams.ln_f_module not in modules:
            raise ValueError(f"MEMIT hparams: ln_f_module {hparams.ln_f_module!r} names no module")


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
