"""Spectral figures of weight matrices: smax(W0) (computed once per matrix), condition numbers, and the figures
reported per edited matrix."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .restraint import RestraintFigures, _apply_right, _orthonormal_beside, gaussian_norm_floor

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
#: Most steps of the float32 Lanczos search that finds the top Ritz vectors (one vector per step: a step is two
#: matrix-vector passes, ~10 ms each at 4096x11008 on one thread, where a 16-column block pass takes ~50 ms).
_SMAX_DEPTH = 96
#: The bound on the deflated rest: Gaussian probes, and the chance that the bound fails on one try (4^-16, as
#: restraint's deflated_norm_bound).
_SMAX_PROBES = 16
_SMAX_FAILURE = 4.0 ** -16
#: Chebyshev degrees (in the singular values) of that bound, fewest first. A degree is one float64 product with the
#: probes; the first two ride along with the Ritz vectors' two passes, so degree 2 costs nothing extra.
_SMAX_DEGREES = range(2, 21)
#: Most certificate tries per call (each fails with probability at most _SMAX_FAILURE, so a call with at most
#: 3 x 2.3e-10 = 6.9e-10), and the search steps between two tries: a try fails when the rest lies above what the
#: plan predicted (often a near-copy of the top that one vector's Krylov space picks up only after a few steps).
_SMAX_BOUND_TRIES = 3
_SMAX_RETRY_STEPS = 4
#: Most search steps added while converged residuals would allow a lower degree than the current plan (a step
#: costs about a quarter of what a degree costs).
_SMAX_PATIENCE = 8
#: Most Ritz vectors deflated (they ride along in the certificate's two passes as extra columns).
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
    - search, in float32 (no claim rests on it): Lanczos on A with full reorthogonalisation, one vector per step
      and two matrix-vector passes per step (z = W^T q, y = W z = A q; Q^T A Q = Z^T Z and Y gives the
      residuals), until its Ritz values and residuals predict that the certificate below succeeds. One vector per
      step rather than a block: a pass over W costs about as much for one vector as for four, and a single
      vector's Krylov space reaches the top values in fewer passes;
    - certificate, in float64 from the stored values (_certify_top): the first c Ritz vectors, made orthonormal in
      float64, give theta_1 <= smax^2 (a Rayleigh quotient) and the residual R of A U_c; the rest C = (I - U_c
      U_c^T) A (I - U_c U_c^T) is bounded by a Chebyshev filter of 16 Gaussian probes (chebyshev_singular_bound,
      fails with probability 2.3e-10 a try, three tries at most); then smax^2 <= theta_1 + ||R||^2 / (theta_1 - ||C||) (the eigenvalue
      bound for a Hermitian block matrix of C.-K. Li and R.-C. Li, 2005), and sqrt(theta_1) is returned once that
      is within rtol of it.
    The bound is quadratic in R, so float32 Ritz vectors are accurate enough; only the certificate's passes (as many
    as the filter's degree, at least two) are float64. Memory: a float32 copy of W for other dtypes, and three
    vectors per search step.
    """
    stored = weight.detach()
    transposed = stored.shape[0] > stored.shape[1]  # the Krylov vectors live on the smaller side
    w32 = stored.to(torch.float32)
    w = w32.mT if transposed else w32
    m, n = w.shape
    if m == 0 or n == 0:
        return 0.0
    depth = min(_SMAX_DEPTH, m - 1)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    basis = w.new_zeros(m, depth + 1)  # Q; columns written as the search goes
    images = w.new_zeros(n, depth + 1)  # Z = W^T Q
    products = w.new_zeros(m, depth + 1)  # Y = A Q
    projected = torch.zeros(depth + 1, depth + 1, dtype=torch.float64, device=w.device)  # Z^T Z, grown by a row
    start = _apply_right(w, torch.randn(1, n, dtype=w.dtype, device=w.device, generator=generator))
    length = float(torch.linalg.vector_norm(start, dtype=torch.float64))  # about ||W||_F for a Gaussian start
    if not math.isfinite(length):
        return None  # float32 overflowed (entries near 1e38) or W is not finite: the dense route decides
    scale = 1.0
    if length > 0.0 and not 2.0 ** -30 < length < 2.0 ** 30:
        # Far from 1, float32 squares of the search's numbers over- or underflow: search on W times a power of
        # two (exact; the same Ritz vectors) and scale the edge back for the certificate, which uses the stored W.
        scale = 2.0 ** -round(math.log2(length))
        w, start, length = w * scale, start * scale, length * scale
    q = start / max(length, torch.finfo(w.dtype).tiny)
    tries, min_degree, waited, next_try = 0, _SMAX_DEGREES[0], 0, 0
    for k in range(depth + 1):
        basis[:, k:k + 1] = q
        z = images[:, k:k + 1] = (q.mT @ w).mT
        products[:, k:k + 1] = _apply_right(w, z.mT)
        row = (z.mT @ images[:, :k + 1]).to(torch.float64)
        projected[k, :k + 1], projected[:k + 1, k] = row[0], row[0]
        h = projected[:k + 1, :k + 1]
        if not bool(torch.isfinite(row).all()):
            return None  # float32 overflowed (smax above ~1e19) or W is not finite: the dense route decides
        theta, g = torch.linalg.eigh(h)
        theta, g = theta.flip(0), g.flip(1)  # largest first
        top = float(theta[0])
        if top <= 0.0:
            return 0.0 if bool((stored == 0).all()) else None
        q_k, y_k = basis[:, :k + 1], products[:, :k + 1]
        g32, theta32 = g.to(w.dtype), theta.to(w.dtype)
        # in float64: squares of float32 residuals overflow above ~1e19 and vanish below ~1e-22
        residuals = torch.linalg.vector_norm(y_k @ g32 - q_k @ (g32 * theta32), dim=0, dtype=torch.float64)
        plan = _smax_plan(theta, residuals, m, rtol, min_degree) if k >= next_try else None
        can_grow = k < depth
        if plan is not None and can_grow and waited < _SMAX_PATIENCE:
            ideal = _smax_plan(theta, residuals, m, rtol, min_degree, converged=plan[0])
            if ideal is not None and ideal[1] < plan[1]:
                # Converged top vectors would allow a lower degree: another float32 step costs less than the
                # float64 product a degree costs.
                waited, plan = waited + 1, None
        if plan is not None:
            c, degree = plan
            tries, min_degree, next_try = tries + 1, degree + 1, k + _SMAX_RETRY_STEPS
            edge = _rest_top(theta, residuals, c) / (scale * scale)
            value = _certify_top(stored, transposed, q_k @ g32[:, :c], edge, degree, rtol, generator)
            if value is not None:
                return value
            if tries >= _SMAX_BOUND_TRIES:
                return None
        if not can_grow:
            return None  # the space would fill the whole side (the dense route is as cheap) or is at its depth
        q = _next_lanczos_vector(products[:, k:k + 1], q_k, generator)
    return None


def _next_lanczos_vector(product: torch.Tensor, basis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The part of A q outside the span of the basis, normalised; a random direction outside it when A q lies
    inside (the Krylov space is invariant: an exactly low-rank W), so the search goes on into the rest instead of
    filling the basis with copies of one vector."""
    outside = product - basis @ (basis.mT @ product)
    length = float(torch.linalg.vector_norm(outside, dtype=torch.float64))  # float32 squares over/underflow
    if length <= 1e3 * torch.finfo(product.dtype).eps * float(torch.linalg.vector_norm(product, dtype=torch.float64)):
        fresh = torch.randn(product.shape, dtype=product.dtype, device=product.device, generator=generator)
        return _orthonormal_beside(fresh, basis)
    return _orthonormal_beside(outside, basis)


def chebyshev_singular_bound(times_x: Callable[[torch.Tensor], torch.Tensor],
                             times_xt: Callable[[torch.Tensor], torch.Tensor], probes: torch.Tensor, edge: float,
                             degree: int, *, failure: float = _SMAX_FAILURE,
                             first: tuple[torch.Tensor, ...] = ()) -> float:
    """An upper bound on ||X|| for a matrix X (m -> n, given as x -> X x and y -> X^T y) from Gaussian `probes`
    (m x r, drawn independently of X, edge and degree), holding with probability >= 1 - failure.

    The Chebyshev filter of the singular values by the three-term recurrence v_0 = G, v_1 = X G / edge,
    v_j = 2 X_j v_(j-1) / edge - v_(j-2) (X_j = X for odd j, X^T for even j: `degree` products in all; `first`
    holds X v_0 and then X^T v_1 when the caller has them) gives v_degree = M G for a fixed M whose singular values
    are |T_degree(s_i / edge)| (T_degree(0) on the rest), so ||M|| >= T_degree(||X|| / edge) once ||X|| > edge.
    With u, v the top singular vectors of M, ||M G|| >= ||u^T M G|| = ||M|| ||v^T G||, and ||v^T G||^2 is
    chi-square with r degrees: ||M|| <= K = ||M G|| / gaussian_norm_floor(r, failure) except with probability
    `failure`, so ||X|| <= edge cosh(acosh(K) / degree) (edge itself when K <= 1). Any positive edge gives a
    valid bound; one at the top of X's bulk a tight one, as the filter then damps the bulk and magnifies what lies
    above it. Even degrees are the filter T_(degree/2)(2 X^T X / edge^2 - I) of the Gram matrix. inf when the
    filtered probes overflow."""
    if not (edge > 0 and degree >= 1):
        raise ValueError(f"chebyshev_singular_bound needs edge > 0 and degree >= 1, got {edge!r}, {degree!r}")
    previous, current = None, probes
    for j in range(1, degree + 1):
        image = first[j - 1] if j <= len(first) else (times_x if j % 2 else times_xt)(current)
        previous, current = current, (image / edge if previous is None else 2.0 * image / edge - previous)
    gram = current.mT @ current
    k = math.sqrt(max(float(torch.linalg.eigvalsh(0.5 * (gram + gram.mT))[-1]), 0.0))
    k /= gaussian_norm_floor(probes.shape[1], failure)
    if not math.isfinite(k):
        return math.inf
    return edge * math.cosh(math.acosh(max(k, 1.0)) / degree)


def _chebyshev_reach(degree: int, size: int) -> float:
    """lambda / edge for the largest lambda = ||C|| that _certify_top's bound allows when every value of the rest
    lies below `edge` (then ||M G|| <= ||G||, about sqrt(size) + sqrt(probes)); edge and lambda in squared singular
    values, as the plan sees them."""
    k = (math.sqrt(size) + math.sqrt(_SMAX_PROBES) + 2.0) / gaussian_norm_floor(_SMAX_PROBES, _SMAX_FAILURE)
    return math.cosh(math.acosh(k) / degree) ** 2


def _rest_top(theta: torch.Tensor, residuals: torch.Tensor, c: int) -> float:
    """What the search predicts for the top of the rest once c Ritz vectors are deflated: the (c+1)-th Ritz value
    plus its residual (Ritz values rise towards the eigenvalues they converge to; one within its residual of the
    next is where the search has not settled yet). Also the Chebyshev filter's edge, which must be positive."""
    top = float(theta[0])
    return max(float(theta[c]) + float(residuals[c]), _SMAX_FLOAT32_FLOOR * top)


def _smax_plan(theta: torch.Tensor, residuals: torch.Tensor, size: int, rtol: float, min_degree: int, *,
               converged: int = 0) -> tuple[int, int] | None:
    """(c, degree) for _certify_top when the float32 Ritz values and each one's residual predict that it succeeds
    (using half the accuracy budget): the fewest degrees, then the fewest deflated vectors; None while they do not
    (iterate further). `converged`: take the first that many residuals as zero (what waiting could bring), for
    deflating no more vectors than that."""
    values, misses2 = theta.tolist(), residuals.square().cumsum(0).tolist()
    top = values[0]
    floor2 = (_SMAX_FLOAT32_FLOOR * top) ** 2
    most = min(len(values) - 1, _SMAX_MAX_DEFLATE, converged or _SMAX_MAX_DEFLATE)
    for degree in _SMAX_DEGREES:
        if degree < min_degree:
            continue
        reach = _chebyshev_reach(degree, size)
        for c in range(1, most + 1):
            rest = reach * _rest_top(theta, residuals, c)
            miss2 = floor2 if converged else max(misses2[c - 1], floor2)
            if rest < top and miss2 / (top - rest) <= rtol * top:
                return c, degree  # (1 + rtol)^2 - 1 ~ 2 rtol: the plan leaves half of it to spare
    return None


def _certify_top(stored: torch.Tensor, transposed: bool, ritz: torch.Tensor, edge: float, degree: int, rtol: float,
                 generator: torch.Generator) -> float | None:
    """sqrt(theta_1) for the Rayleigh-Ritz values of A on the span of `ritz` (m x c, float32 Ritz vectors of the
    search), when float64 products certify it within rtol of smax(W); None otherwise.

    One pair of float64 passes carries U (orthonormal `ritz`) and the probes together: W^T [U, P G] and
    W [W^T U, W^T P G], P = I - U U^T. From U: Theta = eig(U^T A U) (theta_1 <= smax^2) and R = A U G_c - U G_c
    Theta; from G the first two products of chebyshev_singular_bound on X = W^T P (||X||^2 = ||C||, C = P A P),
    whose further degrees cost one pass each. U, edge and degree are fixed before G is drawn, as that bound needs.
    `edge` is in squared singular values (the plan's theta)."""
    u, _ = torch.linalg.qr(ritz.to(torch.float64))
    c, m = u.shape[1], u.shape[0]

    def project(x: torch.Tensor) -> torch.Tensor:
        return x - u @ (u.mT @ x)

    def times_x(x: torch.Tensor) -> torch.Tensor:  # W^T P x
        return _times64(stored, project(x), transpose=not transposed)

    def times_xt(y: torch.Tensor) -> torch.Tensor:  # P W y
        return project(_times64(stored, y, transpose=transposed))

    probes = torch.randn(m, _SMAX_PROBES, dtype=torch.float64, device=u.device, generator=generator)
    z = _times64(stored, torch.cat([u, project(probes)], 1), transpose=not transposed)  # W^T [U, P G]
    y = _times64(stored, z, transpose=transposed)
    h = z[:, :c].mT @ z[:, :c]
    theta, g = torch.linalg.eigh(0.5 * (h + h.mT))
    top = float(theta[-1])
    if not top > 0.0:
        return None
    residual = float((y[:, :c] @ g - u @ (g * theta)).norm())
    edge_s = math.sqrt(edge)
    first = (z[:, c:], project(y[:, c:]) / edge_s)  # X G, then X^T (X G / edge): from the passes above
    rest = chebyshev_singular_bound(times_x, times_xt, probes, edge_s, degree, first=first) ** 2
    if not rest < top:
        return None
    upper2 = top + residual * residual / (top - rest)
    return math.sqrt(top) if math.sqrt(upper2 / top) - 1 <= rtol else None


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
