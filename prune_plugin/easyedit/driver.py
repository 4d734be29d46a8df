"""Drive EasyEdit from CounterFact-form records, for either generation: load hparams, build an editor around an
in-memory model, and edit sequentially (``keep_original_weight=False`` in 0.0.1.dev0, ``sequential_edit=True``
in the current EasyEdit)."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .installed import import_easyeditor, is_legacy_easyeditor, reset_easyeditor_caches
from .records import edit_kwargs


def easyeditor_module() -> Any:
    """The installed easyeditor, imported with the CPU compat where the packaged 0.0.1.dev0 needs it."""
    return import_easyeditor()


def load_hparams(path: str | os.PathLike) -> Any:
    """EasyEdit's own ``XHyperParams.from_hparams(path)``, the class picked by the file's alg_name."""
    import yaml

    with open(path, encoding="utf-8") as stream:
        alg_name = (yaml.safe_load(stream) or {}).get("alg_name")
    easyeditor = easyeditor_module()
    cls = hparams_class(easyeditor, alg_name) if isinstance(alg_name, str) else None
    if cls is None:
        raise ValueError(f"{path}: alg_name {alg_name!r} is not an editing method of the installed easyeditor")
    return cls.from_hparams(os.fspath(path))


def shipped_hparams(method: str) -> Path:
    """The hparams YAML the plugin ships for `method` (ROME, MEMIT, FT) on the embedded SmolLM2-135M."""
    return Path(str(resources.files("prune_plugin") / "hparams" / method / "smollm2-135m.yaml"))


def hparams_class(easyeditor: Any, alg_name: str) -> type | None:
    """The easyeditor's XHyperParams class for `alg_name`: "R-ROME" -> R_ROMEHyperParams, "MEMIT-FE" ->
    MEMITFEHyperParams, "ULTRAEDIT" -> UltraEditHyperParams (names compared without case, "-" and "_")."""
    def key(name: str) -> str:
        return name.replace("-", "").replace("_", "").lower()

    found = [name for name in dir(easyeditor) if name.endswith("HyperParams") and key(name[:-11]) == key(alg_name)]
    return getattr(easyeditor, found[0]) if len(found) == 1 else None


def build_editor(hparams: Any, model: torch.nn.Module, tok: Any) -> Any:
    """A BaseEditor editing `model` in place (the plugin's session is attached if the hparams switch it on).

    easyeditor's module-level caches (context templates, covariances) are reset, in either generation: they would
    otherwise carry what the methods computed for another model. Build one editor per model and use it before
    building the next. `hparams` is left as it was, also when building fails."""
    easyeditor = easyeditor_module()
    if is_legacy_easyeditor(easyeditor):
        from .legacy import make_editor  # resets the caches too

        return make_editor(hparams, model, tok)
    name = hparams.model_name
    hparams.model_name = (model, tok)  # the current BaseEditor takes an in-memory (model, tokenizer) pair
    try:
        editor = easyeditor.BaseEditor.from_hparams(hparams)
    finally:
        hparams.model_name = name
    editor.model_name = name
    reset_easyeditor_caches(easyeditor)
    return editor


def edit_sequentially(editor: Any, records: Sequence[dict], *, resume: bool = False, easyedit_metrics: bool = True,
                      **kwargs: Any) -> list[dict]:
    """Apply the records one after another without restoring weights in between; returns EasyEdit's metrics.

    `resume`: continue from the latest complete checkpoint in the YAML's prune_checkpoint_dir (if there is one),
    skipping the records it has applied; EasyEdit's metrics then cover the records edited by this call only.
    `easyedit_metrics=False`: skip EasyEdit's own pre- and post-edit scoring of every request (three forward
    passes each, before and after: on a long run on a CPU that is a tenth of the time) and apply the requests
    through the editor's method directly, as ``edit`` does; returns no metrics. The weights are the same."""
    if resume:
        from .resume import resume as resume_from_checkpoint

        _, records = resume_from_checkpoint(editor, records)
        if not records:  # everything was applied before: only the end of the sequence is left
            getattr(editor, "_prune_session").end()
            return []
    legacy = is_legacy_easyeditor(easyeditor_module())
    if not easyedit_metrics:
        _apply_without_metrics(editor, records, legacy)
        return []
    sequential = {"keep_original_weight": False} if legacy else {"sequential_edit": True}
    metrics, _, _ = editor.edit(**edit_kwargs(records), **sequential, verbose=False, **kwargs)
    return metrics


def _apply_without_metrics(editor: Any, records: Sequence[dict], legacy: bool) -> None:
    import contextlib

    from .editor import one_sequence

    kwargs = edit_kwargs(records)
    requests = editor._prepare_requests(kwargs.pop("prompts"), kwargs.pop("target_new"), **kwargs)
    if hasattr(editor.hparams, "batch_size"):
        editor.hparams.batch_size = 1  # one request at a time, as edit() sets it
    compat: Any = contextlib.nullcontext()
    if legacy:
        from .legacy import legacy_compat

        compat = legacy_compat(editor._easyeditor)
    with one_sequence(editor), compat:  # one sequence: it ends (final restraint, last checkpoint) after the last request
        for request in requests:
            editor.apply_algo(editor.model, editor.tok, [request], editor.hparams, copy=False,
                              return_orig_weights=False, keep_original_weight=False)
