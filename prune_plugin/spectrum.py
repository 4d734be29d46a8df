"""Spectral figures of weight matrices: smax(W0) (computed once per matrix), condition numbers, and the figures
reported per edited matrix."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .restraint import RestraintFigures, _apply_right, _orthonormal_beside

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
#: Columns per block and the most blocks of the float32 Krylov space that finds the top Ritz vectors.
_SMAX_BLOCK = 16
_SMAX_DEPTH = 12
#: The bound on the deflated rest: Gaussian probes and the constant of the Halko-Martinsson-Tropp lemma
#: (||B|| <= ALPHA sqrt(2/pi) max_i ||B w_i|| fails with probability ALPHA^-PROBES: 4^-16 = 2.3e-10 per try).
_SMAX_PROBES = 16
_SMAX_ALPHA = 4.0
#: Chebyshev degrees of that bound, fewest first (each degree costs two float64 passes), and the most tries.
_SMAX_DEGREES = range(1, 11)
_SMAX_BOUND_TRIES = 3
#: Most float32 blocks added while converged residuals would allow a lower degree than the current plan.
_SMAX_PATIENCE = 3
#: Most Ritz vectors deflated (they ride along in the bound's first two passes as extra columns).
_SMAX_MAX_DEFLATE = 24
#: Planning does not trust a float32 Ritz residual below this fraction of theta_1 (the float32 products' own
#: rounding); the certificate recomputes every residual in float64.
_SMAX_FLOAT32_FLOOR = 1e-5
#: Row blocks of W0 converted to float64 for the certificate's passes (~6 MiB, which stay in cache: at 4096x11008
#: such a pass takes 75-80 ms on one thread, less than the same product over a float64 copy of W0).
_SMAX_CHUNK_ELEMENTS = 3 << 18
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


def _times64(stored: torch.Tensor, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """stored @ x, or stored^T @ x with `transpose`, in float64 from float64 row blocks of `stored` converted one at
    a time (exact products of its stored values, without a float64 copy of the whole matrix)."""
    if stored.dtype == torch.float64:
        return (x.mT @ stored).mT if transpose else _apply_right(stored, x.mT)
    p, s = stored.shape
    rows = max(1, _SMAX_CHUNK_ELEMENTS // max(s, 1))
    if transpose:  # stored^T x = sum over row blocks of block^T x[block], kept as its transpose (k x s)
        out_t = x.new_zeros(x.shape[1], s)
        for start in range(0, p, rows):
            out_t.addmm_(x[start:start + rows].mT, stored[start:start + rows].to(torch.float64))
        return out_t.mT
    out = x.new_empty(p, x.shape[1])
    x_t = x.mT.contiguous()
    for start in range(0, p, rows):
        out[start:start + rows] = _apply_right(stored[start:start + rows].to(torch.float64), x_t)
    return out


def certified_largest_singular_value(weight: torch.Tensor, rtol: float = SMAX_RTOL, seed: int = 0) -> float | None:
    """smax(W) to `rtol` relative, certified, or None when it cannot certify that (then the dense route decides).

    Two stages, with W oriented wide (m <= n) and A = W W^T:
    - search, in float32 (no claim rests on it): a block Krylov space of A, 16 columns per block, two passes per
      block (Z = W^T Q, Y = W Z = A Q, so Q^T A Q = Z^T Z and Y the residuals), until its Ritz values and residuals
      predict that the certificate below succeeds;
    - certificate, in float64 from the stored values (_certify_top): the first c Ritz vectors, made orthonormal in
      float64, give theta_1 <= smax^2 (a Rayleigh quotient) and the residual R of A U_c; the rest C = (I - U_c
      U_c^T) A (I - U_c U_c^T) is bounded by a Chebyshev filter of 16 Gaussian probes (fails with probability
      2.3e-10); then smax^2 <= theta_1 + ||R||^2 / (theta_1 - ||C||) (the eigenvalue bound for a Hermitian block
      matrix of C.-K. Li and R.-C. Li, 2005), and sqrt(theta_1) is returned once that is within rtol of it.
    The bound is quadratic in R, so float32 Ritz vectors are accurate enough; only the certificate's 2 x degree
    passes are float64. Memory: a float32 copy of W for other dtypes, and a few m (or n) x 16 vectors per block.
    """
    stored = weight.detach()
    transposed = stored.shape[0] > stored.shape[1]  # the Krylov vectors live on the smaller side
    w32 = stored.to(torch.float32)
    w = w32.mT if transposed else w32
    m, n = w.shape
    if m == 0 or n == 0:
        return 0.0
    b = min(_SMAX_BLOCK, m)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    # W z and W^T q as short-wide times row-major products (restraint._apply_right): two to three times faster.
    q, _ = torch.linalg.qr(_apply_right(w, torch.randn(b, n, dtype=w.dtype, device=w.device, generator=generator)))
    blocks: list[torch.Tensor] = []
    images: list[torch.Tensor] = []  # Z_j = W^T Q_j
    products: list[torch.Tensor] = []  # Y_j = A Q_j
    tries, min_degree, waited = 0, _SMAX_DEGREES[0], 0
    for _ in range(_SMAX_DEPTH):
        z = (q.mT @ w).mT
        blocks.append(q)
        images.append(z)
        products.append(_apply_right(w, z.mT))
        basis, zs, ys = torch.cat(blocks, 1), torch.cat(images, 1), torch.cat(products, 1)
        projected = (zs.mT @ zs).to(torch.float64)
        if not bool(torch.isfinite(projected).all()):
            return None  # float32 overflowed (smax above ~1e19) or W is not finite: the dense route decides
        theta, g = torch.linalg.eigh(0.5 * (projected + projected.mT))
        theta, g = theta.flip(0), g.flip(1)  # largest first
        top = float(theta[0])
        if top <= 0.0:
            return 0.0 if bool((stored == 0).all()) else None
        g32, theta32 = g.to(w.dtype), theta.to(w.dtype)
        residuals = (ys @ g32 - basis @ (g32 * theta32)).to(torch.float64).square().sum(0).cumsum(0).sqrt()
        plan = _smax_plan(theta, residuals, m, rtol, min_degree) if tries < _SMAX_BOUND_TRIES else None
        can_grow = basis.shape[1] + b <= m and len(blocks) < _SMAX_DEPTH
        if plan is not None and can_grow and waited < _SMAX_PATIENCE:
            ideal = _smax_plan(theta, torch.zeros_like(residuals), m, rtol, min_degree)
            if ideal is not None and ideal[1] < plan[1]:
                # Converged residuals would allow a lower degree: another float32 block costs less than the two
                # float64 passes a degree costs.
                waited, plan = waited + 1, None
        if plan is not None:
            c, degree = plan
            tries, min_degree = tries + 1, degree + 1
            edge = max(float(theta[c]), _SMAX_FLOAT32_FLOOR * top)  # the filter needs a positive edge
            value = _certify_top(stored, transposed, basis @ g32[:, :c], edge, degree, rtol, generator)
            if value is not None:
                return value
        if not can_grow:
            return None  # the space would fill the whole side (the dense route is as cheap) or is at its depth
        q = _orthonormal_beside(products[-1], basis)
    return None


def _chebyshev_reach(degree: int, size: int) -> float:
    """x / edge for the largest x the Chebyshev bound of _certify_top allows when every value of the rest lies
    below `edge` (so each probe's filtered norm is at most its own, about sqrt(size))."""
    k = _SMAX_ALPHA * math.sqrt(2 / math.pi) * (math.sqrt(size) + 3.0)
    return 0.5 * (1.0 + math.cosh(math.acosh(k) / degree))


def _smax_plan(theta: torch.Tensor, residuals: torch.Tensor, size: int, rtol: float, min_degree: int
               ) -> tuple[int, int] | None:
    """(c, degree) for _certify_top when the float32 Ritz values and residuals predict that it succeeds (using half
    the accuracy budget): the fewest degrees, then the fewest deflated vectors; None while they do not (iterate
    further). The rest's top is predicted at the (c+1)-th Ritz value, which is also the Chebyshev filter's edge."""
    values, misses = theta.tolist(), residuals.tolist()
    top = values[0]
    floor = _SMAX_FLOAT32_FLOOR * top
    for degree in _SMAX_DEGREES:
        if degree < min_degree:
            continue
        reach = _chebyshev_reach(degree, size)
        for c in range(1, min(len(values) - 1, _SMAX_MAX_DEFLATE) + 1):
            rest = reach * max(values[c], 0.0)
            miss = max(misses[c - 1], floor)
            if rest < top and miss * miss / (top - rest) <= rtol * top:
                return c, degree  # (1 + rtol)^2 - 1 ~ 2 rtol: the plan leaves half of it to spare
    return None


def _certify_top(stored: torch.Tensor, transposed: bool, ritz: torch.Tensor, edge: float, degree: int, rtol: float,
                 generator: torch.Generator) -> float | None:
    """sqrt(theta_1) for the Rayleigh-Ritz values of A on the span of `ritz` (m x c, float32 Ritz vectors of the
    search), when float64 products certify it within rtol of smax(W); None otherwise.

    One pair of float64 passes carries U (orthonormal `ritz`) and the probes together: W^T [U, P G] and A [U, P G],
    P = I - U U^T. From U: Theta = eig(U^T A U) (theta_1 <= smax^2) and R = A U G_c - U G_c Theta; from G the
    first step of chebyshev_norm_bound on C = P A P, whose further steps cost two passes each. U, edge and degree
    are fixed before G is drawn, as that bound needs."""
    u, _ = torch.linalg.qr(ritz.to(torch.float64))
    c, m = u.shape[1], u.shape[0]

    def project(x: torch.Tensor) -> torch.Tensor:
        return x - u @ (u.mT @ x)

    def times_a(x: torch.Tensor) -> torch.Tensor:  # W W^T x
        return _times64(stored, _times64(stored, x, transpose=not transposed), transpose=transposed)

    probes = torch.randn(m, _SMAX_PROBES, dtype=torch.float64, device=u.device, generator=generator)
    z = _times64(stored, torch.cat([u, project(probes)], 1), transpose=not transposed)  # W^T [U, P G]
    y = _times64(stored, z, transpose=transposed)
    h = z[:, :c].mT @ z[:, :c]
    theta, g = torch.linalg.eigh(0.5 * (h + h.mT))
    top = float(theta[-1])
    if not top > 0.0:
        return None
    residual = float((y[:, :c] @ g - u @ (g * theta)).norm())
    first = project(y[:, c:])  # C G, from the pass above
    rest = chebyshev_norm_bound(lambda x: project(times_a(project(x))), probes, edge, degree, first=first)
    if not rest < top:
        return None
    upper2 = top + residual * residual / (top - rest)
    return math.sqrt(top) if math.sqrt(upper2 / top) - 1 <= rtol else None


def chebyshev_norm_bound(times_c: Callable[[torch.Tensor], torch.Tensor], probes: torch.Tensor, edge: float,
                         degree: int, *,
                         alpha: float = _SMAX_ALPHA, first: torch.Tensor | None = None) -> float:
    """An upper bound on ||C|| for a symmetric positive semi-definite C (given as x -> C x) from Gaussian `probes`
    (m x r, drawn independently of C, edge and degree), holding with probability >= 1 - alpha^-r.

    B = T_degree(2 C / edge - I) (the Chebyshev polynomial, by its three-term recurrence: `degree` products with C;
    `first` = C probes when the caller has it) has ||B|| >= |T_degree(2 lambda / edge - 1)| for lambda = ||C||, and
    ||B|| <= K = alpha sqrt(2/pi) max_i ||B g_i|| except with probability alpha^-r (Halko, Martinsson and Tropp
    2011, lemma 4.1, which holds for any fixed matrix). |T| <= 1 on [-1, 1] and it grows beyond, so ||C|| <= edge
    (1 + cosh(acosh(K) / degree)) / 2 (edge itself when K <= 1). Any positive edge gives a valid bound; one at the
    top of C's bulk a tight one, as the filter then damps the bulk and magnifies what lies above it. inf when the
    filtered probes overflow."""
    if not (edge > 0 and degree >= 1):
        raise ValueError(f"chebyshev_norm_bound needs edge > 0 and degree >= 1, got {edge!r}, {degree!r}")
    scale = 2.0 / edge
    previous = probes
    current = scale * (times_c(probes) if first is None else first) - probes  # T_0 and T_1
    for _ in range(degree - 1):
        previous, current = current, 2.0 * (scale * times_c(current) - current) - previous
    k = alpha * math.sqrt(2 / math.pi) * float(current.norm(dim=0).max())
    if not math.isfinite(k):
        return math.inf
    return 0.5 * edge * (1.0 + math.cosh(math.acosh(max(k, 1.0)) / degree))


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
