"""The hook contract for post-edit plugins: what each hook receives, when it runs, what its return means.

Implementations are plain functions or methods marked with `hookimpl` (they may accept any subset of a hook's
arguments). Third-party plugins register through the setuptools entry-point group ``prune_plugin``:

    [options.entry_points]
    prune_plugin =
        my_restraint = my_package.my_module

Per edit, PRUNE's own restraint runs first (tryfirst), then the collapse guard, then telemetry (trylast), so
that the guard scores and telemetry records the restrained weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:  # only for annotations: the contract imports nothing heavy
    import torch

    from .session import EditSession, EditStep

PROJECT = "prune_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def prune_config_keys() -> Mapping[str, Any]:
    """Declare the extra hparams YAML keys this plugin reads, as {key: default}.

    Called when the configuration is parsed. Keys must start with ``prune_`` (the namespace the EasyEdit
    integration accepts); their values reach the plugin as ``session.config.extra[key]``.
    """


@hookspec
def prune_edit_start(session: "EditSession", model: "torch.nn.Module", originals: Mapping[str, "torch.Tensor"]) -> None:
    """Called once, before the first edit of a sequence, when the original weights W0 have been recorded.

    `originals` maps parameter names to read-only copies of W0 (do not modify them).
    """


@hookspec
def prune_after_edit(
    session: "EditSession",
    model: "torch.nn.Module",
    request: Mapping[str, Any],
    step: "EditStep",
    originals: Mapping[str, "torch.Tensor"],
) -> None:
    """Called after each edit has been written into the model's weights.

    `request` is the editing request (EasyEdit's dict: prompt, subject, target_new, ...); `step` carries the edit's
    index and a record that plugins annotate (`step.figures` per matrix, `step.perplexity`, `step.decisions`).
    A plugin may change weights here (a restraint) but must only touch `step.edited` parameters; it may ask the
    session to roll the edit back (`session.rollback(step)`) or to stop the sequence (`step.stop = True`).
    """


@hookspec
def prune_edit_end(
    session: "EditSession",
    model: "torch.nn.Module",
    steps: "list[EditStep]",
    originals: Mapping[str, "torch.Tensor"],
) -> None:
    """Called once after the last edit of a sequence (the official PRUNE restrains here, in 'final' mode)."""
