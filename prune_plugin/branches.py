"""Edit once, restrain many: put a checkpoint's edits on the base model, as saved or with a PRUNE base applied.

A branch is W0 (the base model, checked against the checkpoint's W0 checksums) plus the checkpoint's matrices,
then optionally the restraint. The restraint runs through the very code path of 'final' mode
(EditSession.restrain_now, with the rank hints the editing session had), so restraining a checkpoint with base a
gives, bit for bit, what a run with ``prune_alpha: a`` in its YAML gives after the same edits.

    with checkpoint_branch(model, checkpoint, alpha=1.2) as branch:
        evaluate(model, tok, ...)       # the model holds W0 + PRUNE_1.2(edits)
    # W0 is back, bit for bit
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .checkpoint import Checkpoint, check_model
from .config import PruneConfig
from .restraint import Alpha
from .plugins import make_plugin_manager
from .session import EditSession
from .spectrum import MatrixFigures


def branch_config(checkpoint: Checkpoint, alpha: Alpha) -> PruneConfig:
    """PRUNE in 'final' mode with base `alpha` and the run's other restraint settings."""
    saved = checkpoint.manifest.get("hparams", {})
    return PruneConfig(prune=True, prune_alpha=alpha, prune_mode="final",
                       prune_never_enlarge=bool(saved.get("prune_never_enlarge", True)),
                       prune_originals_device=saved.get("prune_originals_device", "same"))


def apply_checkpoint(model: torch.nn.Module, checkpoint: Checkpoint, alpha: Alpha | None = None) -> EditSession:
    """Write the checkpoint's matrices into `model` (which must hold W0) and, if `alpha` is given, restrain them
    with that PRUNE base. Returns the session: `.last_restraint` has the figures, `.restore()` gives back W0."""
    config = branch_config(checkpoint, alpha) if alpha is not None else PruneConfig()
    # No third-party plugins: a branch is the checkpoint and, at most, the built-in restraint.
    session = EditSession(model, config, list(checkpoint.manifest["matrices"]),
                          plugin_manager=make_plugin_manager(config, load_entry_points=False))
    session.begin()  # W0, from the model as it is now
    check_model(checkpoint, session.originals, model)
    session.resume_at(checkpoint.edits, checkpoint.matrices(), checkpoint.state.get("rank_hints", {}))
    if alpha is not None:
        session.restrain_now()  # what PruneRestraint.prune_edit_end does in 'final' mode
    return session


@contextlib.contextmanager
def checkpoint_branch(model: torch.nn.Module, checkpoint: Checkpoint, alpha: Alpha | None = None
                      ) -> Iterator[EditSession]:
    """`apply_checkpoint` for the duration of a block; W0 is restored (and checked) afterwards."""
    session = apply_checkpoint(model, checkpoint, alpha)
    try:
        yield session
    finally:
        session.restore()
        for name in session.targets:
            if not torch.equal(model.get_parameter(name), session.originals[name]):
                raise RuntimeError(f"{name} differs from W0 after restoring a branch")


def restraint_summary(figures: dict[str, MatrixFigures]) -> dict[str, Any]:
    """Per matrix: rank of dW, values restrained, smax(dW) and smax(W0)."""
    return {name: {"rank": f.rank, "restrained": f.n_restrained, "smax_delta": f.smax_delta,
                   "smax_original": f.smax_original} for name, f in figures.items()}
