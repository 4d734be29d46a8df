"""The per-edit restraint path as plugins/prune.py had it before commit 2496cd1, kept here ONLY to measure what the
lean path (restraint.restrain_parameter, used by plugins/prune.py since) gained. Never used by the product.

It forms dW as a difference of two float64 copies, checks finiteness with a full boolean pass, takes
||W||_F through a float64 copy, gets the restrained dW as a dense float64 matrix from restrain_delta, and writes
(W0 in float64 + that matrix) back: several m x n float64 buffers alive at once. The restraint core
(restrain_delta's sketch and certificate) is the current one, so the difference measured is the bookkeeping around
it. Condition numbers (telemetry) are left out, as in the benchmarks' sessions.
"""
from __future__ import annotations

import time

import torch

from prune_plugin.originals import get_parameter
from prune_plugin.restraint import restrain_delta


def previous_restrain_matrices(session, names) -> dict[str, dict]:
    cfg = session.config
    figures = {}
    for name in names:
        param = get_parameter(session.model, name)
        t0 = time.perf_counter()
        original = session.originals[name].to(param.device)
        with torch.no_grad():
            delta = param.detach().to(torch.float64) - original.to(torch.float64)
            if not torch.isfinite(delta).all():
                raise FloatingPointError(f"{name}: the edit left non-finite values in the weights; nothing was restrained")
            smax0 = session.smax.get(name, original)
            new_delta, result = restrain_delta(
                delta, smax0, cfg.prune_alpha, never_enlarge=cfg.prune_never_enlarge, rank_rule=cfg.prune_rank_rule,
                storage_dtype=param.dtype, weight_norm=float(param.detach().double().norm()),
                rank_hint=session.rank_hints.get(name, 0),
            )
            session.rank_hints[name] = result.next_rank_hint
            wrote = new_delta is not None
            if wrote:
                param.copy_((original.to(torch.float64) + new_delta).to(param.dtype))
        figures[name] = {"rank": result.rank, "path": result.path, "n_restrained": result.n_restrained,
                         "restrained": wrote, "seconds": time.perf_counter() - t0}
    return figures
