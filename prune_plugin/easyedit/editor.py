"""Hook the plugin into EasyEdit's BaseEditor: wrap ``apply_algo`` so every edit runs the post-edit hooks.

Data flow: YAML -> XHyperParams (with prune_config) -> BaseEditor.__init__ -> wrapped apply_algo -> EditSession
hooks (restraint, guard, telemetry) -> weights. The outermost edit()/batch_edit() call ends the sequence, which is
where the 'final' restraint runs. Works for the packaged 0.0.1.dev0 and the current EasyEdit alike: both keep
the method in ``self.apply_algo`` and call it as ``apply_algo(model, tok, [requests], hparams, ...)``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..config import PruneConfig
from ..plugins import make_plugin_manager
from ..session import EditSession
from .hparams import prune_config_of

LOG = logging.getLogger("prune_plugin")

#: Methods that keep their edit outside the edited weight matrices (adapters, codebooks, memories, prompts):
#: there is no accumulated dW of a weight matrix for PRUNE to restrain.
NOT_IN_PLACE = {
    "LoRA": "adapter weights (peft)", "QLoRA": "adapter weights (peft)", "MELO": "LoRA blocks in a vector database",
    "GRACE": "a codebook adaptor", "WISE": "a side memory", "SERAC": "a separate counterfactual model",
    "SERAC_MULTI": "a separate counterfactual model", "IKE": "in-context demonstrations", "ICE": "in-context learning",
    "MEND": "a hypernetwork applied on a copy", "DEFER": "a deferral model",
    "FT-Api": "a remote API", "DeepEdit-Api": "a remote API", "DPO": "adapter weights (peft)",
    # ULTRAEDIT does add its shifts to weights, but through one module-level executor that keeps the first model it
    # was given (and a lifelong normalizer fitted to every edit so far): later editors' models are not the ones it
    # edits, and W0 restored under it leaves the normalizer describing edits that no longer exist.
    "ULTRAEDIT": "its module-level executor, bound to the first model it saw, with a lifelong normalizer",
}

#: In-place methods whose hparams do not say which matrices they write: they need `prune_targets`.
NEEDS_TARGETS = {
    # KN's patch adds to rows/columns of the MLP output matrices of the layers holding the neurons it finds,
    # which are known only after it ran; the current EasyEdit keeps the patch in sequential mode, 0.0.1.dev0
    # removes it after each edit (then there is nothing to restrain).
    "KN": "the MLP output matrices of every layer KN may patch (e.g. model.layers.{i}.mlp.down_proj.weight)",
}

#: Module-level state some methods keep about the edits so far, beside the weights: (module of the installed
#: easyeditor, attribute, value meaning "no edits yet"). After session.restore() has put W0 back it describes
#: edits that no longer exist, so the plugin resets it and the next sequence starts as the first one did.
#: AlphaEdit's and SPHERE's null-space projection P depends only on W0's key statistics and stays.
METHOD_STATE = {
    "AlphaEdit": [("models.alphaedit.AlphaEdit_main", "cache_c_new", False)],  # cache_c: Σ k kᵀ of past edits
    "SPHERE": [("models.SPHERE.SPHERE_main", "cache_c_new", False)],
}

#: BaseEditor's edit entry points in either generation (each is wrapped where the class has it): the outermost call
#: ends the sequence, and the 0.0.1.dev0 compat runs them inside its CPU redirect.
EDIT_ENTRY_POINTS = ("edit", "batch_edit", "edit_requests", "edit_dataset", "normal_edit", "generate_edit")


@dataclass
class EditorSequence:
    """Where an EasyEdit editor is in its sequence of edits (the driver's state, beside the session's)."""

    depth: int = 0  # nesting of the editor's edit entry points (edit calls batch_edit ...): the outermost one ends it
    stopped: bool = False  # a step asked to stop (the collapse guard): no further request is applied


def sequence_of(editor: Any) -> EditorSequence | None:
    """The editor's sequence state (None when its hparams did not switch the plugin on)."""
    return getattr(editor, "_prune_sequence", None)


@contextlib.contextmanager
def one_sequence(editor: Any) -> Iterator[None]:
    """Within the block, the editor's requests belong to one sequence; leaving the outermost such block (without an
    error) ends it: the 'final' restraint and the last checkpoint run there."""
    session, sequence = getattr(editor, "_prune_session", None), sequence_of(editor)
    if session is None or sequence is None:
        yield
        return
    sequence.depth += 1
    try:
        yield
    finally:
        sequence.depth -= 1
    if sequence.depth == 0:
        session.end()


class PruneNotApplicableError(ValueError):
    """The configured editing method does not change weight matrices in place, so PRUNE cannot restrain it."""


def target_parameters(model: torch.nn.Module, hparams: Any, config: PruneConfig) -> list[str]:
    """Parameters the method edits: `prune_targets` if given, else every parameter of the modules named by the
    method's own ``rewrite_module_tmp(s)`` at its ``layers`` (as ROME, MEMIT, FT, EMMET, AlphaEdit, R-ROME do)."""
    names = [n for n, _ in model.named_parameters()]
    if config.prune_targets:
        missing = [t for t in config.prune_targets if t not in names]
        if missing:
            raise KeyError(f"prune_targets: {type(model).__name__} has no parameter {missing[0]!r}")
        return list(config.prune_targets)
    if hparams.alg_name in NEEDS_TARGETS:
        raise PruneNotApplicableError(
            f"{hparams.alg_name} edits weights in place, but its hparams do not say which: name "
            f"{NEEDS_TARGETS[hparams.alg_name]} with prune_targets: [parameter names]")
    source = _template_source(hparams)
    templates = getattr(source, "rewrite_module_tmps", None) or [getattr(source, "rewrite_module_tmp", None)]
    layers = getattr(source, "layers", None)
    if not all(isinstance(t, str) for t in templates) or not layers:
        raise PruneNotApplicableError(
            f"{hparams.alg_name}: cannot tell which weights the method edits (no rewrite_module_tmp/layers in its "
            "hparams); name them with prune_targets: [parameter names]")
    prefixes = tuple(t.format(layer) + "." for t in templates for layer in layers)
    found = [n for n in names if n.startswith(prefixes)]
    if not found:
        raise KeyError(f"{hparams.alg_name}: no parameter of {type(model).__name__} matches {sorted(set(prefixes))}")
    return found


def _template_source(hparams: Any) -> Any:
    """The hparams naming the edited modules: SimIE's are those of the base method it wraps (ROME, MEMIT, ...)."""
    if getattr(hparams, "rewrite_module_tmp", None) is None and getattr(hparams, "_base_hparams", None) is not None:
        return hparams._base_hparams
    return hparams


def forget_method_state(editor: Any) -> list[str]:
    """Reset what the editor's method keeps about past edits outside the weights (:data:`METHOD_STATE`, SimIE's
    instance on its hparams); returns what was reset, as "module.attribute"."""
    reset = []
    # the easyeditor package the editor class comes from (past the plugin's own compat subclass, if any)
    package = next((cls.__module__ for cls in type(editor).__mro__ if not cls.__module__.startswith("prune_plugin")),
                   "easyeditor").partition(".")[0]
    for module_name, attr, fresh in METHOD_STATE.get(editor.alg_name, []):
        module = sys.modules.get(f"{package}.{module_name}")
        if module is not None and hasattr(module, attr):
            setattr(module, attr, fresh)
            reset.append(f"{module_name}.{attr}")
    if getattr(editor.hparams, "_simie_instance", None) is not None:  # SimIE keeps its W copies and P there
        editor.hparams._simie_instance = None
        reset.append("hparams._simie_instance")
    return reset


def _restore_and_forget(session: EditSession, editor: Any) -> Callable[[], None]:
    restore = session.restore

    @functools.wraps(restore)
    def restore_all() -> None:
        restore()
        forgotten = forget_method_state(editor)
        if forgotten:
            LOG.info("prune-plugin: W0 restored; %s reset, so the next sequence starts afresh", ", ".join(forgotten))

    return restore_all


def check_applicable(alg_name: str) -> None:
    if alg_name in NOT_IN_PLACE:
        raise PruneNotApplicableError(
            f"PRUNE does not apply to {alg_name}: it keeps its edits in {NOT_IN_PLACE[alg_name]}, not in the model's "
            "weight matrices, so there is no accumulated dW = W - W0 to restrain. Remove the prune_* keys, or use a "
            "method that edits weights in place (ROME, R-ROME, MEMIT, MEMIT-FE, PMET, EMMET, EAMET, AlphaEdit, SPHERE, "
            "CORE, FT, DINM, SimIE, KN; see the README's support table).")


def attach_session(editor: Any) -> EditSession | None:
    """Create the editor's session and wrap its apply_algo, if its hparams switch the plugin on."""
    config = prune_config_of(editor.hparams)
    if config is None or not config.active:
        return None
    check_applicable(editor.alg_name)
    session = EditSession(editor.model, config, target_parameters(editor.model, editor.hparams, config),
                          plugin_manager=make_plugin_manager(config), tokenizer=getattr(editor, "tok", None))
    editor._prune_session = session
    editor._prune_sequence = sequence = EditorSequence()
    if config.prune_checkpoint_dir is not None:
        from .resume import attach_checkpointing

        attach_checkpointing(editor, session)
    editor.apply_algo = wrap_apply_algo(editor.apply_algo, session, sequence)
    # W0 back means no edits: what the method remembers of them (AlphaEdit's Σ k kᵀ, ...) goes too.
    session.restore = _restore_and_forget(session, editor)
    LOG.info("prune-plugin: %s on %d parameter(s) (%s)", editor.alg_name, len(session.targets),
             ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if v not in (None, False, "off")))
    return session


def wrap_apply_algo(apply_algo: Callable[..., Any], session: EditSession, sequence: EditorSequence
                    ) -> Callable[..., Any]:
    @functools.wraps(apply_algo)
    def apply_with_hooks(model: torch.nn.Module, tok: Any, requests: Any, hparams: Any, *args: Any, **kwargs: Any):
        if sequence.stopped:
            LOG.warning("prune-plugin: the collapse guard stopped the sequence; request not applied: %s",
                        _describe(requests))
            return model, {}
        if model is not session.model:
            raise RuntimeError("prune-plugin: the editor's model object changed; PRUNE needs edits made in place")
        session.before_edit()
        edited_model, weights_copy = apply_algo(model, tok, requests, hparams, *args, **kwargs)
        if edited_model is not session.model:
            raise RuntimeError(f"prune-plugin: {hparams.alg_name} returned a new model object (copy=True?); "
                               "PRUNE needs edits made in place")
        request = requests[0] if isinstance(requests, list) and len(requests) == 1 else {"requests": requests}
        step = session.after_edit(request)
        if step.stop:
            sequence.stopped = True
        return edited_model, weights_copy

    return apply_with_hooks


def _describe(requests: Any) -> str:
    first = requests[0] if isinstance(requests, list) and requests else requests
    return repr(first.get("prompt")) if isinstance(first, dict) else repr(first)


def patch_editor_class(editor_cls: type, undo: list) -> None:
    """Wrap BaseEditor.__init__ (to attach the session) and its edit entry points (to end the sequence)."""
    init = editor_cls.__dict__["__init__"]
    if getattr(init, "__prune_plugin_patched__", False):
        return

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        attach_session(self)

    __init__.__prune_plugin_patched__ = True  # type: ignore[attr-defined]
    undo.append((editor_cls, "__init__", init))
    editor_cls.__init__ = __init__
    for name in EDIT_ENTRY_POINTS:
        method = editor_cls.__dict__.get(name)
        if method is not None:
            undo.append((editor_cls, name, method))
            setattr(editor_cls, name, _ends_sequence(method))


def _ends_sequence(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        with one_sequence(self):
            return method(self, *args, **kwargs)

    return run
