"""The official PRUNE restraint, re-implemented here ONLY as the benchmark baseline (never used by the product).

What the released PRUNE code does per restrained matrix, in numpy float32:

    delta = W - W0                                         # float32
    U, S, Vt = np.linalg.svd(delta, full_matrices=1)       # SVD-family call 1 (full U and full Vt)
    U0, S0, Vt0 = np.linalg.svd(W0, full_matrices=1)       # SVD-family call 2, only S0[0] is used
    rank = np.linalg.matrix_rank(delta)                    # SVD-family call 3 (singular values again)
    S[S >= S0[0]] = F(S[S >= S0[0]])                       # F(s) = log_a(s) - log_a(S0[0]) + S0[0]
    W = W0 + U[:, :rank] @ diag(S[:rank]) @ Vt[:rank]

No SVD of W itself is taken (the official code logs no spectrum of the edited matrix), so the baseline has exactly
the three calls above. F is applied with a vectorised where instead of the official Python loop over S; that loop
costs microseconds next to the SVDs and gives the same float32 values.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class OfficialTimes:
    svd_delta: float
    svd_original: float
    matrix_rank: float
    total: float


def official_f(s: np.ndarray, smax0: np.float32, alpha) -> np.ndarray:
    """F on the float32 singular values, as the official code applies it (no never-enlarge guard)."""
    over = s >= smax0
    if alpha == "linear":
        f = (s + smax0) / np.float32(2)
    else:
        log_a = np.float32(math.log(alpha))
        f = np.log(np.maximum(s, smax0)) / log_a - np.log(smax0) / log_a + smax0
    return np.where(over, f, s).astype(np.float32)


def official_restrain(w0: np.ndarray, w: np.ndarray, alpha) -> tuple[np.ndarray, OfficialTimes, dict]:
    """Restrained W (float32) exactly as the official code computes it, with the time of each SVD-family call."""
    assert w0.dtype == np.float32 and w.dtype == np.float32
    t_start = time.perf_counter()
    delta = w - w0
    t0 = time.perf_counter()
    u, s, vt = np.linalg.svd(delta, full_matrices=1)
    t1 = time.perf_counter()
    _u0, s0, _vt0 = np.linalg.svd(w0, full_matrices=1)
    t2 = time.perf_counter()
    rank = int(np.linalg.matrix_rank(delta))
    t3 = time.perf_counter()
    del _u0, _vt0
    new_s = official_f(s, s0[0], alpha)
    restrained = w0 + u[:, :rank] @ np.diag(new_s[:rank]) @ vt[:rank, :]
    t_end = time.perf_counter()
    info = {"rank": rank, "smax0": float(s0[0]), "n_restrained": int((s[:rank] >= s0[0]).sum())}
    return restrained, OfficialTimes(t1 - t0, t2 - t1, t3 - t2, t_end - t_start), info
