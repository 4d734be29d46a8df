"""PRUNE's restraint F and its application to the accumulated edit dW = W - W0. Pure torch.

Official semantics (arXiv 2405.16821 and its released code): take the SVD dW = U S V^T, truncate it to the
numerical rank of dW, replace every singular value s >= smax(W0) by

    F(s) = log_a(s) - log_a(smax(W0)) + smax(W0)        (or (s + smax(W0)) / 2 for the 'linear' variant)

and recompose W = W0 + U_r F(S_r) V_r^T.

Fast path: dW of sequential editing is low rank (ROME adds rank one per edit), so a randomized range finder
recovers its exact SVD from a thin sketch. The sketch is accepted only with a certificate that the part it
missed lies below the rank tolerance (so the official truncation would drop it too); otherwise the sketch
grows, and past half the smaller dimension a dense float64 SVD is used. Everything runs in float64 on the
matrix's own device and is written back in the parameter's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Union

import torch

Alpha = Union[float, Literal["linear"]]

#: The bases the official code ships, by the names its configs use.
OFFICIAL_BASES: dict[str, float] = {"e": math.e, "2": 2.0, "1.5": 1.5, "1.2": 1.2}

_OVERSAMPLE = 8
_POWER_ESTIMATE_STEPS = 8


def parse_alpha(value: object) -> Alpha:
    """Accept a > 1 as a number or string ('e', '2', '1.2'), or 'linear'; raise ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "linear":
            return "linear"
        if text in OFFICIAL_BASES:
            return OFFICIAL_BASES[text]
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a log base > 1, 'e', or 'linear', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a log base > 1, 'e', or 'linear', got {value!r}")
    if not math.isfinite(value) or value <= 1:
        raise ValueError(f"must be a log base > 1 (F is only a restraint for a > 1), got {value!r}")
    return float(value)


def restrain_values(
    s: torch.Tensor, smax_original: float, alpha: Alpha, never_enlarge: bool = True
) -> tuple[torch.Tensor, int, int]:
    """Apply F to the singular values s of dW.

    Returns (new values, how many were >= smax(W0), how many the never-enlarge guard capped). F enlarges a
    value when smax(W0) < 1/ln(a) (e.g. a = 1.2 and smax < 5.48); with never_enlarge the result is min(s, F(s)),
    without it the official formula is reproduced exactly.
    """
    over = s >= smax_original
    if alpha == "linear":
        f = 0.5 * s + 0.5 * smax_original
    else:
        log_a = math.log(alpha)
        # torch.where evaluates both branches: clamp keeps log() finite for the values F does not touch.
        f = (torch.log(s.clamp_min(smax_original)) - math.log(smax_original)) / log_a + smax_original
    out = torch.where(over, f, s)
    n_guarded = 0
    if never_enlarge:
        enlarged = over & (out > s)
        n_guarded = int(enlarged.sum())
        out = torch.where(enlarged, s, out)
    return out, int(over.sum()), n_guarded


def rank_tolerance(s0: float, shape: tuple[int, int], storage_dtype: torch.dtype, scale: float) -> float:
    """Singular values of dW at or below this are noise, dropped as the official code drops them.

    numpy's matrix_rank default on the float32 delta the official code builds (s0 * max(m, n) * eps32), raised to
    the rounding floor of the storage dtype (eps * largest |entry| * (sqrt(m) + sqrt(n))) so that bf16/fp16
    rounding of W is not mistaken for edit directions.
    """
    m, n = shape
    eps32 = torch.finfo(torch.float32).eps
    floor = torch.finfo(storage_dtype).eps * scale * (math.sqrt(m) + math.sqrt(n)) if storage_dtype.is_floating_point else 0.0
    return max(s0 * max(m, n) * eps32, floor)


@dataclass
class RestraintFigures:
    """The scalar figures of restraining one matrix (what telemetry reports of it)."""

    smax_original: float
    smax_delta: float
    delta_fro: float
    rank: int
    n_restrained: int
    n_guarded: int
    path: Literal["zero", "lowrank", "dense"]

    def scalar_figures(self) -> dict[str, Any]:
        """These figures alone, as keyword arguments (a subclass's extra fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(RestraintFigures)}


@dataclass
class Restraint(RestraintFigures):
    """Outcome of restraining one matrix: its figures, and the spectrum before and after F."""

    singular_values: torch.Tensor  # the kept (rank-truncated) spectrum of dW, float64, descending
    restrained_values: torch.Tensor  # F applied to it

    @property
    def changed(self) -> bool:
        return self.n_restrained > 0


def _truncated_svd_lowrank(
    delta: torch.Tensor, k: int, tol_of, generator: torch.Generator, fro2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | int:
    """Thin SVD of delta from a k-column sketch, or (when the sketch cannot be certified complete) the sketch
    size to try next.

    Certificate: with delta = Q B + R, singular values of delta beyond the sketch's rank are at most ||R||_2, so
    ||R||_2 <= tol means the official truncation drops everything the sketch misses. `fro2` is ||delta||_F^2,
    so that ||R||_F^2 = fro2 - ||B||_F^2 costs no pass over delta.
    """
    m, n = delta.shape
    # omega^T is drawn k x n and the sketch formed as (omega^T delta^T)^T: the same product as delta @ omega, but
    # BLAS runs it two to three times faster than a tall-times-skinny product on a row-major delta.
    omega_t = torch.randn(k, n, dtype=delta.dtype, device=delta.device, generator=generator)
    q, _ = torch.linalg.qr((omega_t @ delta.mT).mT)
    del omega_t
    b = q.mT @ delta
    ub, s, vt = _wide_svd(b)
    tol = tol_of(float(s[0]))
    rank = int((s > tol).sum())
    resid_fro2 = max(fro2 - float(s.square().sum()), 0.0)
    if rank > k - _OVERSAMPLE // 2 and k < min(m, n):
        # The sketch may be saturated: more directions above tol could exist.
        return _next_sketch_size(k, rank, float(s[0]), resid_fro2, min(m, n))
    if resid_fro2 > tol * tol:
        # Frobenius is a loose bound; estimate ||R||_2 by power iteration on R = delta - Q B.
        x = torch.randn(n, dtype=delta.dtype, device=delta.device, generator=generator)
        est = 0.0
        for _ in range(_POWER_ESTIMATE_STEPS):
            x = x / x.norm().clamp_min(1e-300)
            y = delta @ x - q @ (b @ x)
            x = delta.mT @ y - b.mT @ (q.mT @ y)
            est = math.sqrt(float(x.norm()))
        if 1.1 * est > tol:
            return 2 * k
    u = q @ ub[:, :rank]
    return u, s[:rank], vt[:rank], tol


def _wide_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a short wide k x n matrix through a QR of b^T (b = R^T Q^T, then the k x k SVD of R^T):
    same accuracy as a direct SVD (both backward stable), and several times faster for k << n."""
    q, r = torch.linalg.qr(b.mT)
    ub, s, wt = torch.linalg.svd(r.mT)
    return ub, s, wt @ q.mT


def _next_sketch_size(k: int, rank: int, s_top: float, resid_fro2: float, min_dim: int) -> int:
    """Size of the next sketch after a saturated one: double it, or give up on sketching (return a size past the
    limit, so the caller takes the dense SVD) when dW clearly has too high a rank for any sketch within the limit.

    The energy the sketch missed, ||R||_F^2, takes at least about resid / smax(dW)^2 more directions, since none of
    them is larger than smax(dW) (s_top, the sketch's best-resolved value). That estimate is low for every spectrum
    but a flat one, so it only stops the doubling when even it says the rank is past the sketch limit; the
    expensive last sketches that could not have succeeded are then skipped. It never decides the result: that
    always comes from a certified sketch or the dense SVD.
    """
    limit = min_dim // 2
    if s_top > 0.0 and resid_fro2 > 0.0:
        missing = min(resid_fro2 / max(s_top * s_top, 1e-300), float(min_dim))
        if rank + missing > limit:
            return limit + 1
    return 2 * k


def restrain_factors(
    delta: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    storage_dtype: torch.dtype = torch.float32,
    scale: float | None = None,
    rank_hint: int = 0,
    seed: int = 0,
    fro: float | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, Restraint]:
    """The restraint as factors: ((U_r, F(S_r), V_r^T) or None when nothing reaches smax(W0), figures).

    The restrained dW is U_r diag(F(S_r)) V_r^T; keeping it factored lets a caller add it to W0 in row blocks
    instead of materialising another m x n float64 matrix. `fro` is ||delta||_F when the caller already has it.
    """
    d = delta.to(torch.float64)
    m, n = d.shape
    if fro is None:
        fro = float(torch.linalg.vector_norm(d))
    if fro == 0.0:
        empty = d.new_zeros(0)
        return None, Restraint(smax_original, 0.0, 0.0, 0, 0, 0, "zero", empty, empty)
    if scale is None:
        scale = _max_abs(d)

    def tol_of(s0: float) -> float:
        return rank_tolerance(s0, (m, n), storage_dtype, scale)

    generator = torch.Generator(device=d.device).manual_seed(seed)
    svd = None
    limit = min(m, n) // 2
    k = max(rank_hint + 1 + _OVERSAMPLE, 2 * _OVERSAMPLE)
    while k <= limit:
        out = _truncated_svd_lowrank(d, k, tol_of, generator, fro * fro)
        if not isinstance(out, int):
            svd = out
            break
        k = out
    path: Literal["lowrank", "dense"] = "lowrank"
    if svd is None:
        path = "dense"
        u, s, vt = torch.linalg.svd(d, full_matrices=False)
        tol = tol_of(float(s[0]))
        rank = int((s > tol).sum())
        svd = (u[:, :rank], s[:rank], vt[:rank], tol)
        del u, vt
    u, s, vt, _ = svd
    new_s, n_restrained, n_guarded = restrain_values(s, smax_original, alpha, never_enlarge)
    figures = Restraint(
        smax_original=smax_original, smax_delta=float(s[0]) if len(s) else 0.0, delta_fro=fro, rank=len(s),
        n_restrained=n_restrained, n_guarded=n_guarded, path=path, singular_values=s, restrained_values=new_s,
    )
    if n_restrained == 0:
        return None, figures
    return (u, new_s, vt), figures


def restrain_delta(
    delta: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    storage_dtype: torch.dtype = torch.float32,
    scale: float | None = None,
    rank_hint: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor | None, Restraint]:
    """Restrain dW. Returns (restrained dW in float64 or None when nothing reaches smax(W0), figures).

    `scale` is the largest |entry| of W0/W (for the storage rounding floor); `rank_hint` the rank found last time
    for this matrix, which sizes the first sketch.
    """
    factors, figures = restrain_factors(
        delta, smax_original, alpha, never_enlarge=never_enlarge, storage_dtype=storage_dtype, scale=scale,
        rank_hint=rank_hint, seed=seed,
    )
    if factors is None:
        return None, figures
    u, new_s, vt = factors
    return (u * new_s) @ vt, figures


#: Row blocks of restrain_parameter (W - W0 in, W0 + U F V^T out): about 16 MiB of float64. Much smaller blocks
#: starve the write-back GEMM (23-row blocks of a 4096x11008 matrix: 0.9 s at rank 100, 7.7 s at rank 1000,
#: against 0.3 s and 2.4 s for 256-row blocks).
_BLOCK_ELEMENTS = 1 << 21


@torch.no_grad()
def restrain_parameter(
    weight: torch.Tensor,
    original: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    rank_hint: int = 0,
    seed: int = 0,
    write: bool = True,
) -> tuple[Restraint, bool]:
    """Restrain one weight matrix in place: W <- W0 + U_r F(S_r) V_r^T. Returns (figures, whether W was written).

    The lean form of ``W0 + restrain_delta(W - W0)``: the only m x n float64 buffer is dW itself (freed before the
    write-back); dW is formed and the restrained matrix written back in row blocks of about 16 MiB, directly in W's
    dtype. W0 may live on another device than W (it is moved block by block). Raises FloatingPointError, leaving W
    untouched, when dW has a non-finite entry.
    """
    m, n = weight.shape
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    w = weight.detach()
    d = torch.empty((m, n), dtype=torch.float64, device=w.device)
    for start in range(0, m, rows):
        # Row blocks: an in-place op between float64 and float32 tensors would first make a float64 copy of the
        # whole of W0; block by block that copy stays in cache (and W0 may sit on another device).
        block = d[start:start + rows]
        block.copy_(w[start:start + rows])
        block.sub_(original[start:start + rows].to(w.device).to(torch.float64))  # moved in its own dtype
    fro = float(torch.linalg.vector_norm(d))
    if not math.isfinite(fro) and not bool(torch.isfinite(d).all()):
        raise FloatingPointError("the edit left non-finite values in the weights; nothing was restrained")
    scale = max(_max_abs(original), _max_abs(w))
    factors, figures = restrain_factors(
        d, smax_original, alpha, never_enlarge=never_enlarge, storage_dtype=weight.dtype, scale=scale,
        rank_hint=rank_hint, seed=seed, fro=fro,
    )
    del d
    if not write or factors is None:
        return figures, False
    u, new_s, vt = factors
    us = u * new_s
    for start in range(0, m, rows):
        w0_rows = original[start:start + rows].to(weight.device).to(torch.float64)
        weight[start:start + rows].copy_(torch.addmm(w0_rows, us[start:start + rows], vt))
    return figures, True


def _max_abs(t: torch.Tensor) -> float:
    """max |t|, from one min/max reduction (no |t| temporary; several times faster than abs().max() on a CPU)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def restrain_dense_reference(
    delta: torch.Tensor, smax_original: float, alpha: Alpha, *, never_enlarge: bool = False
) -> torch.Tensor:
    """The official recipe, literally: full float64 SVD, numpy's default rank, F on every value >= smax(W0).

    Slow (a dense SVD of the whole matrix); the test suite compares the fast path against it.
    """
    d = delta.to(torch.float64)
    u, s, vt = torch.linalg.svd(d, full_matrices=False)
    tol = float(s[0]) * max(d.shape) * torch.finfo(torch.float32).eps
    rank = int((s > tol).sum())
    new_s, _, _ = restrain_values(s, smax_original, alpha, never_enlarge)
    return (u[:, :rank] * new_s[:rank]) @ vt[:rank]
