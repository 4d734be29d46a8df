"""Spectral figures of weight matrices: smax(W0) (computed once per matrix), condition numbers, and the figures
reported per edited matrix."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .restraint import RestraintFigures, deflated_norm_bound

# Below this many elements a float64 singular-value pass is as cheap as anything else. Above it the Gram route is
# 2-4x faster than svdvals at every size measured (576x1536: 60 ms against 200 ms; 2048x2048: 1.5 s against 6.7 s).
_DENSE_LIMIT = 1 << 16
# Columns of the larger side converted to float64 at a time while the Gram matrix is accumulated (~32 MiB).
_GRAM_BLOCK_ELEMENTS = 1 << 22


#: Largest condition number condition_number() takes from the Gram matrix. eigvalsh's absolute error on W W^T is
#: about sqrt(n) eps smax^2, so smin comes out with a relative error near 0.5 sqrt(n) eps kappa^2: ~6e-7 at
#: kappa = 1e4 for n = 11008. Better-conditioned matrices (trained weights are far below) keep the fast route;
#: worse ones get a dense singular-value pass.
_GRAM_MAX_CONDITION = 1e4


def _gram(weight: torch.Tensor) -> torch.Tensor:
    """W W^T or W^T W, whichever is smaller, in float64, accumulated from float64 blocks of W (so no float64 copy
    of the whole matrix is made). Its eigenvalues are the squares of W's min(m, n) singular values."""
    w = weight.detach()
    if w.shape[0] > w.shape[1]:
        w = w.mT  # Gram of the smaller side: W^T W = (W^T)(W^T)^T
    small, large = w.shape
    gram = torch.zeros(small, small, dtype=torch.float64, device=w.device)
    step = max(1, _GRAM_BLOCK_ELEMENTS // max(small, 1))
    for start in range(0, large, step):
        block = w[:, start:start + step].to(torch.float64)
        gram.addmm_(block, block.mT)
    return gram


#: Relative accuracy of largest_singular_value's certified Krylov estimate.
SMAX_RTOL = 1e-6
_SMAX_BLOCK = 8
_SMAX_ITERATIONS = 30
#: Power steps of the randomized bound on ||W (I - V V^T)||: it only has to separate the deflated rest from smax.
_SMAX_NORM_POWER = 10
#: From this many elements largest_singular_value tries the certified Krylov estimate first. Off for now (no
#: matrix is that large): on a W0 whose second singular value is close to the first (0.88 of it in the benchmark's
#: 4096x11008 matrix) the estimate cannot certify and gives up after about 2.7 s, which the Gram route then pays
#: on top. certified_largest_singular_value stays available, tested on its own.
_KRYLOV_MIN = 1 << 62


def largest_singular_value_dense(weight: torch.Tensor) -> float:
    """smax(W) in float64 from the full spectrum (small matrices) or the Gram matrix of the smaller side (m^2 n and
    one eigvalsh: exact to float64 round-off for the largest value, several times cheaper than a dense SVD)."""
    w = weight.detach()
    if w.numel() <= _DENSE_LIMIT:
        return float(torch.linalg.svdvals(w.to(torch.float64))[0])
    return float(torch.linalg.eigvalsh(_gram(w))[-1].clamp_min(0).sqrt())


def certified_largest_singular_value(weight: torch.Tensor, rtol: float = SMAX_RTOL, seed: int = 0) -> float | None:
    """smax(W) to `rtol` relative from block subspace iteration in float64, or None when it cannot certify that.

    With orthonormal V (n x b), W V = U T Z^T gives Ritz triplets (t_i, u_i, v_i) with W v_i = t_i u_i exactly, so
    t_1 <= smax(W). For the first c Ritz vectors, W^T W = [[T_c^2, R^T], [R, C]] in the basis (V_c, V_c-perp),
    ||R|| = ||(W^T U_c - V_c T_c) T_c|| and ||C|| = ||W (I - V_c V_c^T)||^2 <= beta^2 (beta from
    restraint.deflated_norm_bound, failing with probability < 2.3e-10); if beta < t_1 the Schur complement gives
    smax^2 <= t_1^2 + ||R||^2 / (t_1^2 - beta^2). The estimate is accepted when that bound is within rtol.
    Memory: one float64 copy of W (8 m n bytes) while it runs, and n x b vectors.
    """
    w = weight.detach().to(torch.float64)
    if w.shape[0] > w.shape[1]:
        w = w.mT  # the wider side holds the right vectors: the smaller Gram side is never formed anyway
    m, n = w.shape
    b = min(_SMAX_BLOCK, m)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(n, b, dtype=w.dtype, device=w.device, generator=generator))
    bounds_tried = 0
    for _ in range(_SMAX_ITERATIONS):
        u, t, zt = torch.linalg.svd((v.mT @ w.mT).mT, full_matrices=False)  # W V = U T Z^T
        v = v @ zt.mT  # right Ritz vectors: W v_i = t_i u_i
        if float(t[0]) == 0.0:
            return 0.0
        wtu = (u.mT @ w).mT  # W^T U: the residuals now and the next iterate
        res = ((wtu - v * t) * t).square().sum(0).cumsum(0).sqrt()  # ||R_c||_F for c = 1..b
        top2 = float(t[0]) ** 2
        # The bound costs 2 * _SMAX_NORM_POWER passes: try it only once the top Ritz vector has converged far
        # enough for it to succeed, deflating by every leading Ritz vector converged as far.
        good = 1e-4 * top2
        if float(res[0]) <= good and bounds_tried < 2:
            bounds_tried += 1
            c = max(1, int((res <= good).sum()))
            beta = deflated_norm_bound(w, u[:, :0], v[:, :c].mT, generator, power=_SMAX_NORM_POWER)
            if beta * beta >= top2:
                return None  # the rest is not separated from smax: no certificate possible
            upper2 = top2 + float(res[c - 1]) ** 2 / (top2 - beta * beta)
            if math.sqrt(upper2 / top2) - 1 <= rtol:
                return float(t[0])
        v, _ = torch.linalg.qr(wtu)
    return None


def largest_singular_value(weight: torch.Tensor) -> float:
    """smax(W) in float64, to 1e-6 relative: the certified Krylov estimate for matrices of 8M elements and more
    (docs/benchmarks.md: against the Gram route at 4096x11008), the dense computation when it cannot certify itself
    and for smaller matrices."""
    w = weight.detach()
    if w.numel() >= _KRYLOV_MIN:
        estimate = certified_largest_singular_value(w)
        if estimate is not None:
            return estimate
    return largest_singular_value_dense(w)


def condition_number(weight: torch.Tensor) -> float:
    """smax(W) / smin(W) over the min(m, n) singular values, in float64 (inf for a rank-deficient W).

    Larger matrices go through the Gram matrix (as largest_singular_value; ~7x cheaper than svdvals at 4096x11008)
    while the result is at most _GRAM_MAX_CONDITION, where it is accurate to about 1e-6 relative; otherwise, and
    for small matrices, from a dense float64 singular-value pass. Raises FloatingPointError on non-finite values,
    which have no spectrum (a diverged edit leaves them; torch would raise an opaque LinAlgError)."""
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError("non-finite values in the matrix: it has no condition number")
    if w.numel() > _DENSE_LIMIT:
        eig = torch.linalg.eigvalsh(_gram(w))
        lo, hi = float(eig[0]), float(eig[-1])
        if lo > 0 and hi <= lo * _GRAM_MAX_CONDITION**2:
            return math.sqrt(hi / lo)
    s = torch.linalg.svdvals(w.to(torch.float64))
    smin = float(s[-1])
    return float(s[0]) / smin if smin > 0 else float("inf")


class SmaxCache:
    """smax(W0) per parameter name: the threshold PRUNE compares against never changes during a sequence."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    def get(self, name: str, original: torch.Tensor) -> float:
        if name not in self._values:
            self._values[name] = largest_singular_value(original)
        return self._values[name]

    def cached(self, name: str) -> float | None:
        """The value recorded for `name`, or None when it has not been computed yet."""
        return self._values.get(name)

    def put(self, name: str, value: float) -> None:
        """Record a value already computed for this W0 (e.g. by a caller that timed the computation)."""
        self._values[name] = float(value)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def clear(self) -> None:
        self._values.clear()


@dataclass
class MatrixFigures(RestraintFigures):
    """What telemetry reports for one edited matrix after one edit (condition numbers may be None: not computed)."""

    name: str
    restrained: bool
    cond_before: float | None = None
    cond_after: float | None = None
    seconds: float = 0.0


def takes_krylov_route(weight: torch.Tensor) -> bool:
    """Whether largest_singular_value tries the certified Krylov estimate first for a matrix of this size."""
    return weight.numel() >= _KRYLOV_MIN
