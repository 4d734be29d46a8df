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
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .checkpoint import Checkpoint, check_model, read_checkpoint, write_checkpoint
from .config import PruneConfig
from .restraint import Alpha, parse_alpha
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
    session.resume_at(checkpoint.edits, checkpoint.matrices(), checkpoint.state.get("rank_hints", {}),
                      checkpoint.bases())
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


def alpha_label(alpha: Alpha) -> str:
    """A PRUNE base as written on the command line and in folder names ("e", "1.2", "linear")."""
    return "e" if alpha == math.e else str(alpha)


def parse_branch(spec: str) -> tuple[str, Alpha | None]:
    """"CHECKPOINT@ALPHA" -> (the checkpoint's location, the base; None without "@")."""
    location, _, alpha_text = spec.partition("@")
    try:
        return location, parse_alpha(alpha_text) if alpha_text else None
    except ValueError as err:
        raise ValueError(f"{spec}: the part after @ {err}") from None


def base_model(checkpoint: Checkpoint, override: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The base model a checkpoint was written from, or `override` (its W0 is checked when the checkpoint is applied)."""
    from .models import default_model_dir, load_model

    source = override or checkpoint.manifest["model"].get("source")
    if source and Path(source).resolve() == default_model_dir().resolve():
        source = None  # the embedded default: rebuilt from its GGUF if the cache was cleared
    return load_model(source)


def restrain_checkpoint(location: str, alphas: Sequence[Alpha], out: str | None = None) -> list[dict[str, Any]]:
    """``prune-plugin restrain``: apply each PRUNE base in `alphas` to the checkpoint at `location` (W0 back after
    each), writing each restrained state as a checkpoint under `out`/a=ALPHA when `out` is given. Returns, per base,
    its label, restraint_summary figures and the folder written (or None)."""
    checkpoint = read_checkpoint(location)
    model, _ = base_model(checkpoint)
    done = []
    for alpha in alphas:
        session = apply_checkpoint(model, checkpoint, alpha)
        label, figures = alpha_label(alpha), restraint_summary(session.last_restraint)
        written = None
        if out:
            manifest = {**checkpoint.manifest, "restraint": {"alpha": label, "mode": "final", "from": str(checkpoint.path),
                                                             "figures": figures}}
            for key in ("format", "version", "edits", "matrices", "files", "written"):
                manifest.pop(key, None)
            written = write_checkpoint(Path(out) / f"a={label}", checkpoint.edits,
                                       {n: model.get_parameter(n) for n in session.targets}, manifest)
        session.restore()
        done.append({"alpha": label, "figures": figures, "written": written})
    return done


def evaluate_branch(location: str, alpha: Alpha | None, tasks: Sequence[str], *, model: str | None = None,
                    metadata: dict | None = None, limit: float | None = None) -> dict[str, Any]:
    """``prune-plugin eval``: lm-eval's results for `tasks` on the checkpoint at `location`, restrained with
    `alpha` when given, on its base model (or `model`); W0 is back afterwards."""
    from .lmeval import evaluate

    checkpoint = read_checkpoint(location)
    lm, tok = base_model(checkpoint, model)
    with checkpoint_branch(lm, checkpoint, alpha):
        raw = evaluate(lm, tok, list(tasks), metadata=metadata, batch_size=10, bootstrap_iters=0, limit=limit,
                       model_kwargs={"add_bos_token": False})
    return {"checkpoint": str(checkpoint.path), "edits": checkpoint.edits,
            "alpha": alpha_label(alpha) if alpha is not None else None, "tasks": list(tasks),
            "results": raw["results"]}
