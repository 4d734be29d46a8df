"""Spectral figures of weight matrices: smax(W0) (computed once per matrix), condition numbers, and the figures
reported per edited matrix."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .restraint import RestraintFigures, _apply_right, _orthonormal_beside, deflated_norm_bound, norm_bound_factor

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
#: Block size and the most blocks of the Krylov space certified_largest_singular_value builds.
_SMAX_BLOCK = 8
_SMAX_DEPTH = 16
#: The randomized bound on the deflated rest is tried at most this often (each try costs 2 x power passes).
_SMAX_BOUND_TRIES = 3
#: Power steps of that bound, fewest first (each costs two passes): the bound lies up to (ALPHA sqrt(2/pi))^(1/2q)
#: above the rest's norm, more for a flat top (restraint.norm_bound_factor: 1.38x for q = 4, 1.14x for q = 10),
#: and only has to stay clear of smax.
_SMAX_POWERS = range(3, 11)
#: From this many elements largest_singular_value takes the certified Krylov estimate first (the Gram route's
#: m^2 n flops are then the larger cost: 13 to 16 s at 4096x11008 on one CPU thread).
_KRYLOV_MIN = 1 << 23


def largest_singular_value_dense(weight: torch.Tensor) -> float:
    """smax(W) in float64 from the full spectrum (small matrices) or the Gram matrix of the smaller side (m^2 n and
    one eigvalsh: exact to float64 round-off for the largest value, several times cheaper than a dense SVD)."""
    w = weight.detach()
    if w.numel() <= _DENSE_LIMIT:
        return float(torch.linalg.svdvals(w.to(torch.float64))[0])
    return float(torch.linalg.eigvalsh(_gram(w))[-1].clamp_min(0).sqrt())


def certified_largest_singular_value(weight: torch.Tensor, rtol: float = SMAX_RTOL, seed: int = 0) -> float | None:
    """smax(W) to `rtol` relative from a block Krylov space in float64, or None when it cannot certify that.

    With W oriented wide (m <= n) and A = W W^T, the space is spanned by orthonormal blocks Q_0, Q_1, ... (Q_0 from
    W times Gaussian vectors, each next one A Q_j made orthonormal to the others). Every block costs two passes,
    Z_j = W^T Q_j and Y_j = W Z_j = A Q_j, and nothing more is needed: with Q, Z, Y the blocks side by side,
    Q^T A Q = Z^T Z gives the Ritz pairs (theta_i, Q g_i), theta_1 <= smax^2, and A Q g_i = Y g_i their residuals.
    For the first c Ritz vectors U_c, A = [[Theta_c, R^T], [R, C]] in the basis (U_c, U_c-perp) with ||R|| <=
    ||Y G_c - U_c Theta_c||_F and ||C|| = ||(I - U_c U_c^T) W||^2 <= beta^2 (restraint.deflated_norm_bound, failing
    with probability < 2.3e-10); if beta^2 < theta_1, smax^2 <= theta_1 + ||R||^2 / (theta_1 - beta^2) (the
    eigenvalue bound for a Hermitian block matrix of C.-K. Li and R.-C. Li, 2005). The estimate sqrt(theta_1) is
    returned once that bound is within rtol of it. c is chosen where the Ritz values drop enough for the bound
    to stay clear of theta_1: a top value close to the next few needs those deflated too, which the block holds.
    Memory: one float64 copy of W (8 m n bytes) while it runs, and 3 m (or n) x 8 vectors per block.
    """
    w = weight.detach().to(torch.float64)
    if w.shape[0] > w.shape[1]:
        w = w.mT  # the Krylov vectors live on the smaller side
    m, n = w.shape
    if m == 0 or n == 0:
        return 0.0
    b = min(_SMAX_BLOCK, m)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    # W z and W^T q as short-wide times row-major products (restraint._apply_right): at 4096x11008 with 8 columns
    # 0.13 s for the pair against 1.0 s for the transposed skinny products.
    q, _ = torch.linalg.qr(_apply_right(w, torch.randn(b, n, dtype=w.dtype, device=w.device, generator=generator)))
    blocks: list[torch.Tensor] = []
    images: list[torch.Tensor] = []  # Z_j = W^T Q_j
    products: list[torch.Tensor] = []  # Y_j = A Q_j
    tries = 0
    for _ in range(_SMAX_DEPTH):
        z = (q.mT @ w).mT
        blocks.append(q)
        images.append(z)
        products.append(_apply_right(w, z.mT))
        basis, zs, ys = torch.cat(blocks, 1), torch.cat(images, 1), torch.cat(products, 1)
        projected = zs.mT @ zs
        theta, g = torch.linalg.eigh(0.5 * (projected + projected.mT))
        theta, g = theta.flip(0), g.flip(1)  # largest first
        top = float(theta[0])
        if top <= 0.0:
            return 0.0 if float(zs.abs().max()) == 0.0 else None
        residuals = (ys @ g - basis @ (g * theta)).square().sum(0).cumsum(0).sqrt()  # ||R_c||_F, c = 1, 2, ...
        plan = _smax_plan(theta, residuals, m, rtol) if tries < _SMAX_BOUND_TRIES else None
        if plan is not None:
            c, power = plan
            tries += 1
            beta = deflated_norm_bound(w, basis @ g[:, :c], w.new_zeros(0, n), generator, power=power)
            if beta * beta < top:
                upper2 = top + float(residuals[c - 1]) ** 2 / (top - beta * beta)
                if math.sqrt(upper2 / top) - 1 <= rtol:
                    return math.sqrt(top)
        if basis.shape[1] + b > m:
            return None  # the space would fill the whole side: the dense route is as cheap
        q = _orthonormal_beside(products[-1], basis)
    return None


def _smax_plan(theta: torch.Tensor, residuals: torch.Tensor, size: int, rtol: float) -> tuple[int, int] | None:
    """(c, power) for the bound of certified_largest_singular_value when the Ritz values and residuals predict it
    succeeds (using half the accuracy budget), fewest power steps first; None while they do not (iterate further).
    The deflated rest is predicted at the (c+1)-th Ritz value times the bound's largest excess over it: its factor
    and a flat top of up to `size` values (restraint.norm_bound_factor)."""
    values, misses = theta.tolist(), residuals.tolist()
    top = values[0]
    for power in _SMAX_POWERS:
        excess2 = (norm_bound_factor(power) * size ** (1 / (4 * power))) ** 2
        for c in range(1, len(values)):
            rest2 = excess2 * values[c]
            if rest2 < top and misses[c - 1] ** 2 / (top - rest2) <= rtol * top:
                return c, power  # (1 + rtol)^2 - 1 ~ 2 rtol: the plan leaves half of it to spare
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
