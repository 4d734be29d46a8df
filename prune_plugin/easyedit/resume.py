"""Checkpoints and resume for EasyEdit runs.

With ``prune_checkpoint_dir`` in the hparams YAML, the editor's session writes checkpoints (see
prune_plugin.checkpoint). An interrupted run continues from its last complete checkpoint:

    editor = BaseEditor.from_hparams(hparams)         # the same YAML as the interrupted run
    checkpoint, remaining = pe.resume(editor, records) # W0 recorded, the checkpoint's matrices loaded
    editor.edit(**edit_kwargs(remaining), ...)         # the requests not yet applied

(`prune_plugin.easyedit.driver.edit_sequentially(editor, records, resume=True)` does both.) The checkpoint must
come from the same model (W0 checksums), the same hparams, and the same first requests; anything else is a
CheckpointMismatchError naming the difference.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from typing import Any, Sequence

from ..checkpoint import (Checkpoint, CheckpointMismatchError, check_model, check_requests, check_settings, json_safe,
                          latest_checkpoint, read_checkpoint)
from ..config import PruneConfig
from ..session import EditSession
from .records import request_of

LOG = logging.getLogger("prune_plugin")

#: hparams keys a resumed run may change: where things are written and what is only measured.
RESUMABLE_CHANGES = ("model_name", "stats_dir", "device", "prune_telemetry", "prune_telemetry_condition",
                     "prune_checkpoint_dir", "prune_checkpoint_at")
_TEMPLATE_CACHE = "CONTEXT_TEMPLATES_CACHE"


def run_settings(hparams: Any, config: PruneConfig) -> dict[str, Any]:
    """The hparams (EasyEdit's fields and the prune_* keys) as the manifest records them."""
    if dataclasses.is_dataclass(hparams):
        values = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)}
    else:
        values = {k: v for k, v in vars(hparams).items() if not k.startswith("_")}
    values.pop("prune_config", None)
    if not isinstance(values.get("model_name"), str):
        values["model_name"] = None  # an in-memory (model, tokenizer) pair
    values.update(config.to_dict())
    return json_safe(values)


def context_templates() -> dict[str, Any]:
    """EasyEdit's cached context templates (ROME, MEMIT, ... sample them from the model at their first edit and
    keep them for the whole process), by module: a resumed run must use the same ones."""
    return {name: getattr(module, _TEMPLATE_CACHE) for name, module in sorted(sys.modules.items())
            if name.startswith("easyeditor.") and getattr(module, _TEMPLATE_CACHE, None) is not None}


def set_context_templates(saved: dict[str, Any]) -> None:
    for name, value in saved.items():
        setattr(importlib.import_module(name), _TEMPLATE_CACHE, value)


def attach_checkpointing(editor: Any, session: EditSession) -> None:
    """Register the checkpoint plugin on the editor's session (when its YAML has prune_checkpoint_dir)."""
    from ..plugins.checkpoint import Checkpointing

    config = session.config
    if config.prune_checkpoint_dir is None or session.pm.get_plugin("checkpoint") is not None:
        return
    hparams = editor.hparams
    plugin = Checkpointing(config.prune_checkpoint_dir, config.prune_checkpoint_at,
                           settings=lambda: run_settings(hparams, config),
                           state=lambda: {"context_templates": context_templates()},
                           source=getattr(getattr(editor.model, "config", None), "_name_or_path", None))
    session.pm.register(plugin, name="checkpoint")


def resume(editor: Any, records: Sequence[dict], checkpoint: Checkpoint | str | None = None
           ) -> tuple[Checkpoint | None, list[dict]]:
    """Prepare `editor` to continue the run of `records` from `checkpoint` (default: the latest complete one in
    its prune_checkpoint_dir). Returns (the checkpoint or None when there is none yet, the records still to edit).

    Checks the checkpoint against this model's W0, these hparams and these records before touching any weight."""
    session: EditSession | None = getattr(editor, "_prune_session", None)
    if session is None or session.config.prune_checkpoint_dir is None:
        raise ValueError("resume needs prune_checkpoint_dir in the editor's hparams YAML")
    if session.steps:
        raise RuntimeError("resume: this editor has already edited; build a fresh editor around the base model")
    if checkpoint is None:
        checkpoint = latest_checkpoint(session.config.prune_checkpoint_dir)
        if checkpoint is None:
            LOG.info("resume: no complete checkpoint in %s, starting from the first request",
                     session.config.prune_checkpoint_dir)
            return None, list(records)
    elif not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    from ..plugins.checkpoint import REQUEST_IDENTITY

    check_settings(checkpoint, run_settings(editor.hparams, session.config), ignore=RESUMABLE_CHANGES)
    check_requests(checkpoint, [request_of(r) for r in records], REQUEST_IDENTITY)
    session.begin()  # W0 recorded from the base model, before the checkpoint's matrices replace it
    check_model(checkpoint, session.originals, session.model)
    state = checkpoint.state
    if state.get("seed") != session.config.edit_seed:
        raise CheckpointMismatchError(f"{checkpoint.path}: written with seed {state.get('seed')!r}, this run "
                                      f"seeds {session.config.edit_seed!r}")
    session.resume_at(checkpoint.edits, checkpoint.matrices(), state.get("rank_hints", {}), checkpoint.bases())
    set_context_templates(state.get("context_templates", {}))
    session.pm.get_plugin("checkpoint").resumed_from(checkpoint)
    LOG.info("resumed from %s: %d of %d requests already applied", checkpoint.path, checkpoint.edits, len(records))
    return checkpoint, list(records[checkpoint.edits:])
