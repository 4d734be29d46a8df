"""PRUNE as a hook implementation: restrain each edited matrix after every edit ('online') or once at the end
('final', as the official code does)."""
from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Iterable

import torch

from ..hookspecs import hookimpl
from ..originals import get_parameter
from ..restraint import restrain_parameter

if TYPE_CHECKING:
    from ..session import EditSession, EditStep, MatrixFigures

LOG = logging.getLogger("prune_plugin")


class PruneEnlargeWarning(UserWarning):
    """F would have enlarged singular values (smax(W0) < 1/ln a); the never-enlarge guard kept them."""


def restrain_matrices(session: "EditSession", names: Iterable[str], *, write: bool = True) -> dict[str, "MatrixFigures"]:
    """Restrain dW = W - W0 of each named 2-D parameter (write=False only measures what PRUNE would do)."""
    from ..session import MatrixFigures

    cfg = session.config
    figures: dict[str, MatrixFigures] = {}
    for name in names:
        param = get_parameter(session.model, name)
        if param.ndim != 2:
            continue  # biases and norms: no spectrum to restrain
        t0 = time.perf_counter()
        original = session.originals[name]  # may live on the CPU: restrain_parameter moves it block by block
        with torch.no_grad():
            if name not in session.smax:  # once per matrix, on the weight's device; reuse that copy below
                original = original.to(param.device)
            smax0 = session.smax.get(name, original)
            try:
                cond_before = session.conditions.get(name, param, original) if session.wants_condition else None
                result, wrote = restrain_parameter(
                    param, original, smax0, cfg.prune_alpha, never_enlarge=cfg.prune_never_enlarge,
                    rank_rule=cfg.prune_rank_rule, rank_hint=session.rank_hints.get(name, 0), write=write,
                )
            except FloatingPointError:  # from either call: W is left as the edit wrote it, restorable from W0
                raise FloatingPointError(f"{name}: the edit left non-finite values in the weights; nothing was "
                                         "restrained (session.restore() gives back W0)") from None
            session.rank_hints[name] = result.next_rank_hint
            cond_after = ((session.conditions.get(name, param, original) if wrote else cond_before)
                          if session.wants_condition else None)
        if result.n_guarded and write:
            warnings.warn(
                f"{name}: F would enlarge {result.n_guarded} singular value(s) (smax(W0)={smax0:.4g} < 1/ln a); "
                "kept them unchanged (prune_never_enlarge: false reproduces the official formula)",
                PruneEnlargeWarning, stacklevel=2,
            )
        figures[name] = MatrixFigures(**result.scalar_figures(), name=name, restrained=wrote, cond_before=cond_before,
                                      cond_after=cond_after, seconds=time.perf_counter() - t0)
        if wrote:
            LOG.info("PRUNE %s: %d of %d singular values restrained (smax(dW) %.4g -> %.4g, smax(W0) %.4g)",
                     name, result.n_restrained, result.rank, result.smax_delta, float(result.restrained_values.max()), smax0)
    return figures


class PruneRestraint:
    """The built-in restraint; registered by a session whose config says ``prune: true``."""

    @hookimpl(tryfirst=True)
    def prune_after_edit(self, session: "EditSession", step: "EditStep") -> None:
        if session.config.prune_mode == "online" and step.edited:
            with session.timed(step, "restraint"):
                step.figures.update(restrain_matrices(session, step.edited))

    @hookimpl(tryfirst=True)
    def prune_edit_end(self, session: "EditSession") -> None:
        if session.config.prune_mode == "final":
            session.restrain_now()
