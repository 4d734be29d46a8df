"""PRUNE's restraint F and its application to the accumulated edit dW = W - W0. Pure torch.

PRUNE (arXiv 2405.16821) takes the SVD dW = U S V^T and replaces every singular value s >= smax(W0) by

    F(s) = log_a(s) - log_a(smax(W0)) + smax(W0)        (or (s + smax(W0)) / 2 for the 'linear' variant)

Two rank rules (``rank_rule``, the YAML key ``prune_rank_rule``):

- ``"exact"`` (default): the formula in float64 on the stored W and W0 over the whole spectrum. F leaves every
  value below smax(W0) unchanged, so that is W + U_k (F(S_k) - S_k) V_k^T over the k values >= smax(W0): only the
  top-k triplets of dW are needed, never its full spectrum, whatever the rank of dW (ROME's rank one per edit, FT's
  dense updates). They come from randomized subspace iteration with Rayleigh-Ritz, accepted only with a
  certificate: the residuals of the k triplets bound the error of the correction below a small fraction of the
  storage dtype's rounding of W, and a bound on the (k+1)-th singular value proves that no value >= smax(W0) was
  missed (exact from Frobenius norms when the block captures dW, otherwise a randomized norm bound that fails with
  probability below 2.3e-10). Without a certificate the block grows, and a dense float64 SVD is the fallback.
- ``"official"``: the released code's numbers digit for digit: W0 + U_r F(S_r) V_r^T truncated to numpy's float32
  numerical rank of dW (r = #{s > s_1 max(m, n) eps32}). That truncation also drops the directions of dW below
  the tolerance, which for float32 weights is float32 noise but for float64 (or a dW far below W's scale) are real
  edit directions.

Everything runs in float64 on the matrix's own device and is written back in the parameter's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple, Union

import torch

Alpha = Union[float, Literal["linear"]]
RankRule = Literal["exact", "official"]
RANK_RULES: tuple[str, ...] = ("exact", "official")

#: The bases the official code ships, by the names its configs use.
OFFICIAL_BASES: dict[str, float] = {"e": math.e, "2": 2.0, "1.5": 1.5, "1.2": 1.2}

_OVERSAMPLE = 8
_POWER_ESTIMATE_STEPS = 8
#: Subspace iterations per block size before the block grows (each costs two passes over dW).
_MAX_ITERATIONS = 24
#: A block whose last Ritz value is above this fraction of the k-th converges slowly (the error shrinks by about
#: the ratio squared per iteration): it grows at once instead.
_SLOW_RATIO = 0.7
#: Subspace iterations on the k restrained triplets alone, once the count is certified (low-rank dW: the storage
#: rounding of W is the only thing below them, so one step is enough).
_REFINE_STEPS = 2
#: Relative float64 round-off allowed for in ||dW||_F^2 - ||B||_F^2 (a difference of two accumulated sums).
_ROUNDOFF = 1e-13
#: The randomized norm bound on the deflated rest (deflated_norm_bound): Gaussian probes, the power steps q at
#: which it is read (fewest first: it stops at the first reading low enough), and the chance that any reading is
#: wrong, 4^-16 = 2.3e-10 over all of them (a union bound: each reading gets a third).
_NORM_PROBES = 16
_NORM_POWERS = (3, 6, 10)
_NORM_FAILURE = 4.0 ** -16


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


def parse_rank_rule(value: object) -> RankRule:
    """'exact' or 'official' (any case); raise ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() in RANK_RULES:
        return value.strip().lower()  # type: ignore[return-value]
    raise ValueError(f"must be one of {', '.join(RANK_RULES)}, got {value!r}")


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


def correction_lipschitz(smax_original: float, alpha: Alpha) -> float:
    """A bound on |d/ds (F(s) - s)| for s >= smax(W0) (also for min(F(s), s) - s): how much an error in a
    singular value or vector of dW moves the correction."""
    if alpha == "linear":
        return 0.5
    return max(1.0, abs(1.0 / (smax_original * math.log(alpha)) - 1.0))


def official_rank_tolerance(s0: float, shape: tuple[int, int]) -> float:
    """numpy's matrix_rank default on the float32 delta the official code builds: s0 * max(m, n) * eps32."""
    return s0 * max(shape) * torch.finfo(torch.float32).eps


def storage_accuracy(dtype: torch.dtype) -> float:
    """Relative Frobenius error the exact rule allows itself on the restrained W: 1/32 of the dtype's unit
    round-off (so the written matrix is the reference rounded to the dtype, up to a few last-bit ties), and
    1e-10 for float64 (well inside the 1e-6 asked of it)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(eps / 32, 1e-10)


@dataclass
class RestraintFigures:
    """The scalar figures of restraining one matrix (what telemetry reports of it).

    rank: the singular triplets of dW the restraint used: with rank_rule 'exact' the k values >= smax(W0) (the
    only ones F changes), with 'official' the numerical rank of dW. smax_delta: the largest singular value of dW
    (for 'exact' with k = 0, the best estimate the certificate needed; it is below smax(W0)).
    """

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
    """Outcome of restraining one matrix: its figures, and the computed spectrum of dW before and after F."""

    singular_values: torch.Tensor  # the singular values of dW used (see `rank`), float64, descending
    restrained_values: torch.Tensor  # F applied to them
    next_rank_hint: int = 0  # the rank_hint that sizes the next restraint of this matrix best
    # Orthonormal columns (float32) spanning what a block that captured dW found of it (None otherwise): the next
    # restraint's start_basis, so that it draws only _OVERSAMPLE fresh columns for what the edits since added.
    next_basis: torch.Tensor | None = None
    # What restrain_parameter wrote into W (None when it wrote nothing): telemetry's cond(W) after the restraint
    # updates its picture of dW by it (condition.condition_after_update)
    written: Update | None = None
    # dW as the block that captured it found it (only when asked for: `capture`; None otherwise): telemetry's first
    # cond(W) of a matrix starts from it instead of a range finder of its own
    captured: CapturedDelta | None = None


class CapturedDelta(NamedTuple):
    """dW = U diag(S) V^T + E with ||E||_F^2 <= missed2 (U and V orthonormal, float64): what a block that captured a
    low-rank dW found of it (the Ritz triplets above the miss), E including the round-off of that Frobenius bound.
    U^T E = 0: E is what lies outside the block, and the values dropped below the miss lie in it beside U."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    missed2: float


class Update(NamedTuple):
    """The restrained matrix as base + U diag(values) V^T, base = W (keeps_delta) or W0.

    exact rule: W + U_k diag(F(S_k) - S_k) V_k^T; official rule: W0 + U_r diag(F(S_r)) V_r^T."""

    u: torch.Tensor
    values: torch.Tensor
    vt: torch.Tensor
    keeps_delta: bool


def _check_finite_delta(d: torch.Tensor, fro: float) -> None:
    if not math.isfinite(fro) and not bool(torch.isfinite(d).all()):
        raise FloatingPointError("the edit left non-finite values in the weights; nothing was restrained")


def _check_threshold(smax_original: float) -> None:
    if not (isinstance(smax_original, (int, float)) and math.isfinite(smax_original) and smax_original > 0):
        raise ValueError(f"smax(W0) must be a finite positive number, got {smax_original!r}")


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


def _apply_right(d: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """d @ x_t^T for a short wide x_t (r x n). Formed as (x_t d^T)^T: the same product, but BLAS runs it two to
    three times faster than a tall-times-skinny product on a row-major d."""
    return (x_t @ d.mT).mT


def _orthonormal_beside(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns for the part of x outside the span of `basis` (orthonormal columns): projected out,
    orthonormalised, projected out once more and orthonormalised again (twice is enough: Kahan-Parlett)."""
    x, _ = torch.linalg.qr(x - basis @ (basis.mT @ x))
    x, _ = torch.linalg.qr(x - basis @ (basis.mT @ x))
    return x


def gaussian_norm_floor(probes: int, failure: float) -> float:
    """sqrt(t) for which a chi-square variable with `probes` degrees of freedom lies below t with probability at most
    `failure`: the length of the projection of `probes` Gaussian vectors on any fixed unit vector, ||v^T G||, is
    below this only that rarely. From P(chi2_r <= t) <= (t/2)^(r/2) / Gamma(r/2 + 1) (the density without its
    exp(-x/2) factor), so t = 2 (failure Gamma(r/2 + 1))^(2/r). With M G for a fixed M and u, v M's top singular
    vectors, ||M G||_2 >= ||u^T M G|| = ||M|| ||v^T G||: so ||M|| <= ||M G||_2 / floor except with that chance."""
    if not (probes >= 1 and 0.0 < failure < 1.0):
        raise ValueError(f"gaussian_norm_floor needs probes >= 1 and 0 < failure < 1, got {probes!r}, {failure!r}")
    half = 0.5 * probes
    return math.sqrt(2.0 * math.exp((math.log(failure) + math.lgamma(half + 1.0)) / half))


def _column_norms(x: torch.Tensor) -> torch.Tensor:
    """Each column's 2-norm, taken after dividing by its largest entry (x.norm squares the entries: past about
    1e154 they overflow float64, below about 1e-154 they vanish), and at least 1e-300 so a zero column divides and
    logs safely."""
    peak = x.abs().amax(dim=0).clamp_min(1e-300)
    return ((x / peak).norm(dim=0) * peak).clamp_min(1e-300)


def deflated_norm_bound(
    d: torch.Tensor, u: torch.Tensor, vt: torch.Tensor, generator: torch.Generator, enough: float = 0.0
) -> float:
    """An upper bound on ||E||_2, E = (I - U U^T) d (I - V V^T), that holds with probability >= 1 - 2.3e-10.

    Power iteration on E^T E from _NORM_PROBES Gaussian vectors G, read after q = 3, 6 and 10 steps: ||E||^(2q) =
    ||(E^T E)^q|| <= ||(E^T E)^q G||_2 / gaussian_norm_floor (each reading fails with probability at most a third
    of 2.3e-10). It returns the lowest reading so far once one is below `enough` (the caller's threshold: fewer
    passes over d when the rest lies well below it), else after the last. For a dominant top value the readings
    lie about 36 %, 17 % and 10 % above ||E||. The per-step norms are kept as logarithms, so neither a large nor a
    vanishing E overflows. U may have no columns (no left deflation)."""
    n = d.shape[1]
    x = torch.randn(n, _NORM_PROBES, dtype=d.dtype, device=d.device, generator=generator)
    log_norm = torch.zeros(_NORM_PROBES, dtype=d.dtype, device=d.device)
    log_floor = math.log(gaussian_norm_floor(_NORM_PROBES, _NORM_FAILURE / len(_NORM_POWERS)))
    bound = math.inf
    for step in range(1, _NORM_POWERS[-1] + 1):
        x = x - vt.mT @ (vt @ x)
        y = _apply_right(d, x.mT)
        y = y - u @ (u.mT @ y)
        y_norms = _column_norms(y)  # normalised after each half-step, so no product leaves float64's range
        log_norm += y_norms.log()
        y = y / y_norms
        x = (y.mT @ d).mT
        x = x - vt.mT @ (vt @ x)
        norms = _column_norms(x)
        log_norm += norms.log()
        x = x / norms
        if not bool(torch.isfinite(log_norm).all()):
            return math.inf  # d holds inf or nan: no finite bound (the caller takes the dense route)
        if step in _NORM_POWERS:
            # (E^T E)^q G = X diag(exp(log_norm)), X = x with unit columns: its spectral norm, scaled by the largest
            scaled = x * (log_norm - log_norm.max()).exp()
            gram = scaled.mT @ scaled
            top = float(torch.linalg.eigvalsh(0.5 * (gram + gram.mT))[-1])
            log_top = float(log_norm.max()) + 0.5 * math.log(max(top, 1e-300))
            bound = min(bound, math.exp((log_top - log_floor) / (2 * step)))
            if bound < enough:
                break
    return bound


def _refine_top(
    d: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor, threshold: float, lipschitz: float,
    accuracy: float, missed: float | None = None, steps: int = _REFINE_STEPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The k triplets made accurate by subspace iteration on them alone (k-column passes, no longer the whole
    block), or None when that does not reach the accuracy in `steps` steps. Used once the count is certified:
    Ritz values of d stay lower bounds of its singular values, so they must stay >= threshold.

    `missed` (a bound on ||E||_F, E = d - Q Q^T d, for the block Q the triplets came from) allows a one-sided
    correction without a further pass: as Q^T E = 0, d^T d = B^T B + E^T E, so the right Ritz vectors V_k are off
    by O(||E||^2) only. The SVD y = d V_k = U' S' W'^T gives triplets (U', S', V_k W') with d V' = U' S' exactly
    and d^T U' - V' S' = (I - V_k V_k^T) E^T E V_k W' S'^-1, of norm at most missed ||E V_k||_F / s'_k, where
    E V_k = y - U_k S_k: the first-order error the first check measures becomes second order."""
    y = _apply_right(d, vt)
    for step in range(steps + 1):
        residual = float((y - u * s).norm())
        if lipschitz * residual <= accuracy / 2:
            return u, s, vt
        if step == 0 and missed is not None:
            uy, sy, wt = torch.linalg.svd(y, full_matrices=False)
            if float(sy[-1]) >= threshold and lipschitz * missed * residual / float(sy[-1]) <= accuracy / 2:
                return uy, sy, wt @ vt
        if step == steps:
            return None
        q, _ = torch.linalg.qr(y)
        ub, s, vt = _wide_svd(q.mT @ d)
        if float(s[-1]) < threshold:
            return None
        u = q @ ub
        y = _apply_right(d, vt)
    return None


def _top_triplets(
    d: torch.Tensor, threshold: float, lipschitz: float, accuracy: float, block: int, generator: torch.Generator,
    fro2: float, start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int, torch.Tensor | None, CapturedDelta | None] | None:
    """(U_k, S_k, V_k^T, s_1, block size used, captured basis or None, what that block found of d or None) for the
    k singular values of d >= threshold, certified, or None (then a dense SVD decides).

    `start` (orthonormal columns, the previous restraint's captured basis) replaces all but _OVERSAMPLE of the
    first block's random columns: a sequence of edits adds few directions to dW between two restraints, and those
    the fresh columns catch. It only sets where the iteration starts; every certificate below is the same.

    With Q the block's orthonormal basis, B = Q^T d = Ub S Vt and the Ritz triplets (s_i, Q ub_i, v_i), the
    residuals r_i = d v_i - s_i Q ub_i satisfy d^T (Q ub_i) = s_i v_i exactly, and:
    - the correction's error is about lipschitz * ||R_k||_F (first order; angles times |F(s) - s|, which is at
      most lipschitz times the gap to the values below the threshold), required <= accuracy / 2;
    - s_i(d) >= s_i(B) >= threshold for i <= k (interlacing), and s_{k+1}(d) <= max(s_{k+1}(B), ||E_c||_2) +
      ||R_c||_F for the first c >= k Ritz triplets and E_c = d deflated by them (Weyl): below the threshold,
      exactly k values reach it.
    When the block captures d (low rank: ||d - Q B||_F^2 = ||d||_F^2 - ||B||_F^2, below the threshold^2) the count
    needs no residuals: s_{k+1}(d)^2 <= s_{k+1}(B)^2 + ||d - Q B||^2. Otherwise ||E_c||_F^2 = ||d||_F^2 -
    sum_{i<=c} s_i^2 - ||R_c||_F^2 may settle it, and deflated_norm_bound does when it does not.
    The block grows (keeping what it has found) when it is saturated or its last Ritz value is too close to the
    k-th for the iteration to converge quickly: more columns then capture a low-rank dW whole.
    """
    m, n = d.shape
    limit = min(m, n) // 2
    if start is not None and 0 < start.shape[1] <= limit - _OVERSAMPLE:
        fresh = _apply_right(d, torch.randn(_OVERSAMPLE, n, dtype=d.dtype, device=d.device, generator=generator))
        y = torch.cat([start.to(d), fresh], dim=1)
        block = y.shape[1]
    elif block > limit:
        return None
    else:
        y = _apply_right(d, torch.randn(block, n, dtype=d.dtype, device=d.device, generator=generator))
    iterations = 0
    while True:
        q, _ = torch.linalg.qr(y)
        ub, s, vt = _wide_svd(q.mT @ d)
        k = int((s >= threshold).sum())
        slow = k > 0 and float(s[-1]) > _SLOW_RATIO * float(s[k - 1])
        if k > block - _OVERSAMPLE // 2 or slow or iterations >= _MAX_ITERATIONS:
            # Saturated, or a spectrum that continues too close below the k-th value, or no convergence: a
            # larger block (the current one plus fresh random columns) or, past the limit, the dense SVD.
            if 2 * block > limit:
                return None
            extra = _apply_right(d, torch.randn(block, n, dtype=d.dtype, device=d.device, generator=generator))
            y = torch.cat([q, extra / extra.norm(dim=0).clamp_min(1e-300)], dim=1)
            block, iterations = 2 * block, 0
            continue
        iterations += 1
        top = float(s[0])
        below = float(s[k])
        # When the block captures d (low rank), the Frobenius norm of what it misses bounds both the residuals
        # and the rest: the count is certified without a further pass, and the correction's accuracy needs at
        # most the residuals of the k restrained triplets (a k-column pass).
        missed = math.sqrt(max(fro2 - float(s.square().sum()), 0.0) + _ROUNDOFF * fro2)
        # d^T d = B^T B + R^T R (Q^T R = 0, R = d - Q B), so by Weyl s_{k+1}(d)^2 <= below^2 + ||R||^2: second
        # order in the miss, which matters online, where F has left values just above smax(W0) and others at it.
        if math.hypot(below, missed) < threshold:
            # The next block need only hold d's numerical rank (what it captured above the miss) and the margin.
            found = int((s > missed).sum())
            captured = min(block, found + _OVERSAMPLE)
            keep = max(found, k)
            left = q @ ub[:, :keep]
            basis = left.to(torch.float32)
            whole = CapturedDelta(left, s[:keep], vt[:keep].mT,
                                  max(fro2 - float(s[:keep].square().sum()), 0.0) + _ROUNDOFF * fro2)
            if lipschitz * missed <= accuracy / 2:
                return q @ ub[:, :k], s[:k], vt[:k], top, captured, basis, whole
            refined = _refine_top(d, q @ ub[:, :k], s[:k], vt[:k], threshold, lipschitz, accuracy, missed)
            if refined is not None:
                return (*refined, top, captured, basis, whole)
        y = _apply_right(d, vt)  # d V = d d^T U S^-1: the residuals now, and the next subspace iterate
        ritz_u = q @ ub
        r = y - ritz_u * s
        res = r.square().sum(0)
        res_k = math.sqrt(float(res[:k].sum()))
        slack = threshold - below
        if lipschitz * res_k > accuracy / 2 or res_k > slack / 4:
            # Not converged yet: iterate with d d^T - mu I, mu = s_b^2 / 2, which maps the values the block
            # cannot resolve, [0, s_b^2], onto [-mu, mu] and so damps them about twice as fast per step.
            y = y * s - (0.5 * float(s[-1]) ** 2) * ritz_u
            continue
        # Deflate by every leading Ritz triplet that has converged well inside the slack.
        cumulative = res.cumsum(0).sqrt()
        c = max(k, int((cumulative <= slack / 4).sum()))
        res_c = float(cumulative[c - 1]) if c else 0.0
        rest = math.sqrt(max(fro2 - float(s[:c].square().sum()) - res_c ** 2, 0.0) + _ROUNDOFF * fro2)
        if max(below, rest) + res_c >= threshold and below + res_c < threshold:
            rest = deflated_norm_bound(d, ritz_u[:, :c], vt[:c], generator, enough=threshold - res_c)
        if max(below, rest) + res_c < threshold:
            return ritz_u[:, :k], s[:k], vt[:k], top, block, None, None
        iterations = _MAX_ITERATIONS  # too much of d near the threshold for this block: grow it


def _exact_update(
    d: torch.Tensor, smax_original: float, alpha: Alpha, never_enlarge: bool, accuracy: float, block: int,
    generator: torch.Generator, fro: float, start: torch.Tensor | None, capture: bool,
) -> tuple[Update | None, Restraint]:
    lipschitz = correction_lipschitz(smax_original, alpha)
    found = _top_triplets(d, smax_original, lipschitz, accuracy, block, generator, fro * fro, start)
    path: Literal["lowrank", "dense"] = "lowrank"
    if found is None:
        path = "dense"
        u, s, vt = torch.linalg.svd(d, full_matrices=False)
        k = int((s >= smax_original).sum())
        found = (u[:, :k], s[:k], vt[:k], float(s[0]), 0, None, None)
        del u, vt
    u, s, vt, top, block_used, basis, whole = found
    new_s, n_restrained, n_guarded = restrain_values(s, smax_original, alpha, never_enlarge)
    figures = Restraint(
        smax_original=smax_original, smax_delta=top, delta_fro=fro, rank=len(s), n_restrained=n_restrained,
        n_guarded=n_guarded, path=path, singular_values=s, restrained_values=new_s,
        next_rank_hint=max(block_used - _OVERSAMPLE, len(s)), next_basis=basis, captured=whole if capture else None,
    )
    change = new_s - s
    if n_restrained == 0 or not bool((change != 0).any()):
        return None, figures
    return Update(u, change, vt, keeps_delta=True), figures


def _official_update(
    d: torch.Tensor, smax_original: float, alpha: Alpha, never_enlarge: bool, rank_hint: int,
    generator: torch.Generator, fro: float,
) -> tuple[Update | None, Restraint]:
    m, n = d.shape

    def tol_of(s0: float) -> float:
        return official_rank_tolerance(s0, (m, n))

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
        next_rank_hint=len(s),
    )
    if n_restrained == 0:
        return None, figures
    return Update(u, new_s, vt, keeps_delta=False), figures


def restrain_factors(
    delta: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    rank_rule: RankRule = "exact",
    accuracy: float | None = None,
    rank_hint: int = 0,
    start_basis: torch.Tensor | None = None,
    seed: int = 0,
    fro: float | None = None,
    capture: bool = False,
) -> tuple[Update | None, Restraint]:
    """The restraint as an Update (None when nothing changes), and its figures.

    The restrained matrix is base + U diag(values) V^T (see Update); keeping it factored lets a caller write it
    in row blocks instead of materialising another m x n float64 matrix. `accuracy` is the absolute Frobenius
    error the exact rule may make on the restrained matrix (default: storage_accuracy(float32) * ||delta||_F);
    `rank_hint` is the rank found last time for this matrix, which sizes the first block; `start_basis` (the
    exact rule only) is the basis it captured then (Restraint.next_basis), from which the first block starts;
    `fro` is ||delta||_F when the caller already has it; `capture` keeps what a block that captured a low-rank
    delta found of it in Restraint.captured (exact rule; telemetry's first cond(W) starts from it). Raises
    FloatingPointError on a non-finite delta.
    """
    rank_rule = parse_rank_rule(rank_rule)
    _check_threshold(smax_original)
    if start_basis is not None and (start_basis.ndim != 2 or start_basis.shape[0] != delta.shape[0]):
        raise ValueError(f"start_basis is {tuple(start_basis.shape)}: it needs {delta.shape[0]} rows, one per row "
                         "of delta (the next_basis of this matrix's previous restraint)")
    d = delta.to(torch.float64)
    if fro is None:
        fro = float(torch.linalg.vector_norm(d))
    _check_finite_delta(d, fro)
    if fro == 0.0:
        empty = d.new_zeros(0)
        return None, Restraint(smax_original, 0.0, 0.0, 0, 0, 0, "zero", empty, empty)
    generator = torch.Generator(device=d.device).manual_seed(seed)
    if rank_rule == "official":
        return _official_update(d, smax_original, alpha, never_enlarge, rank_hint, generator, fro)
    if accuracy is None:
        accuracy = storage_accuracy(torch.float32) * fro
    block = max(rank_hint + _OVERSAMPLE, 2 * _OVERSAMPLE)
    return _exact_update(d, smax_original, alpha, never_enlarge, accuracy, block, generator, fro, start_basis, capture)


def restrain_delta(
    delta: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    rank_rule: RankRule = "exact",
    storage_dtype: torch.dtype = torch.float32,
    weight_norm: float | None = None,
    rank_hint: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor | None, Restraint]:
    """Restrain dW. Returns (restrained dW in float64, or None when nothing changes, figures).

    `storage_dtype` and `weight_norm` (||W||_F; default ||delta||_F) size the exact rule's accuracy
    (storage_accuracy(storage_dtype) * weight_norm); `rank_hint` the rank found last time for this matrix, which
    sizes the first block. Raises FloatingPointError on a non-finite delta.
    """
    d = delta.to(torch.float64)
    fro = float(torch.linalg.vector_norm(d))
    _check_finite_delta(d, fro)
    accuracy = storage_accuracy(storage_dtype) * (weight_norm if weight_norm is not None else fro)
    update, figures = restrain_factors(
        d, smax_original, alpha, never_enlarge=never_enlarge, rank_rule=rank_rule, accuracy=accuracy,
        rank_hint=rank_hint, seed=seed, fro=fro,
    )
    if update is None:
        return None, figures
    low_rank = (update.u * update.values) @ update.vt
    return (d + low_rank if update.keeps_delta else low_rank), figures


#: Row blocks of restrain_parameter (W - W0 in, the restrained W out): about 16 MiB of float64. Much smaller
#: blocks starve the write-back GEMM (23-row blocks of a 4096x11008 matrix: 0.9 s at rank 100, 7.7 s at rank 1000,
#: against 0.3 s and 2.4 s for 256-row blocks).
_BLOCK_ELEMENTS = 1 << 21


class Delta(NamedTuple):
    """dW = W - W0 in float64 with the two norms its users need, as delta_of forms them."""

    d: torch.Tensor
    weight_norm2: float  # ||W||_F^2
    norm2: float  # ||dW||_F^2 (inf or nan when dW has a non-finite entry)


@torch.no_grad()
def delta_of(weight: torch.Tensor, original: torch.Tensor) -> Delta:
    """dW = W - W0 in float64 on W's device, with ||W||_F^2 and ||dW||_F^2, formed in row blocks of about 16 MiB:
    an op between float64 and float32 tensors would first make a float64 copy of the whole of W0, block by block
    that copy stays in cache (and W0 may sit on another device: it is moved in its own dtype); the norms are summed
    while each block is in cache, so no consumer needs a pass of its own over dW for them."""
    m, n = weight.shape
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    w = weight.detach()
    d = torch.empty((m, n), dtype=torch.float64, device=w.device)
    w_norm2 = d_norm2 = 0.0
    for start in range(0, m, rows):
        block = d[start:start + rows]
        block.copy_(w[start:start + rows])
        w_norm2 += float(torch.linalg.vector_norm(block)) ** 2
        block.sub_(original[start:start + rows].to(w.device).to(torch.float64))
        d_norm2 += float(torch.linalg.vector_norm(block)) ** 2
    return Delta(d, w_norm2, d_norm2)


@torch.no_grad()
def plan_restraint(
    weight: torch.Tensor,
    original: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    rank_rule: RankRule = "exact",
    rank_hint: int = 0,
    start_basis: torch.Tensor | None = None,
    seed: int = 0,
    delta: Delta | None = None,
    capture: bool = False,
) -> tuple[Update | None, Restraint]:
    """What restrain_parameter would write into W (None when nothing changes) and its figures, W untouched.

    dW is formed here (and freed on return) unless `delta`, delta_of(weight, original), comes from a caller that
    has formed it already; it is only read. The accuracy asked of the exact rule is storage_accuracy(W's dtype) x
    ||W||_F. `capture`: as restrain_factors. Raises FloatingPointError when dW has a non-finite entry."""
    d, w_norm2, d_norm2 = delta_of(weight, original) if delta is None else delta
    fro = math.sqrt(d_norm2)
    _check_finite_delta(d, fro)
    accuracy = storage_accuracy(weight.dtype) * math.sqrt(w_norm2)
    return restrain_factors(
        d, smax_original, alpha, never_enlarge=never_enlarge, rank_rule=rank_rule, accuracy=accuracy,
        rank_hint=rank_hint, start_basis=start_basis, seed=seed, fro=fro, capture=capture,
    )


@torch.no_grad()
def write_update(weight: torch.Tensor, original: torch.Tensor, update: Update) -> None:
    """W <- base + U diag(values) V^T in place (base = W or W0, as update.keeps_delta says), in row blocks of
    about 16 MiB, each summed in float64 and written directly in W's dtype (W0 moved block by block)."""
    m, n = weight.shape
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    us = update.u * update.values
    for start in range(0, m, rows):
        base = weight[start:start + rows] if update.keeps_delta else original[start:start + rows].to(weight.device)
        weight[start:start + rows].copy_(torch.addmm(base.to(torch.float64), us[start:start + rows], update.vt))


def write_planned(weight: torch.Tensor, original: torch.Tensor, update: Update | None, figures: Restraint,
                  write: bool = True) -> bool:
    """Write what plan_restraint planned into W (write_update) and record it in figures.written, unless `write` is
    False or the plan changes nothing. Returns whether W was written."""
    if not write or update is None:
        return False
    write_update(weight, original, update)
    figures.written = update
    return True


@torch.no_grad()
def restrain_parameter(
    weight: torch.Tensor,
    original: torch.Tensor,
    smax_original: float,
    alpha: Alpha,
    *,
    never_enlarge: bool = True,
    rank_rule: RankRule = "exact",
    rank_hint: int = 0,
    start_basis: torch.Tensor | None = None,
    seed: int = 0,
    write: bool = True,
    delta: Delta | None = None,
) -> tuple[Restraint, bool]:
    """Restrain one weight matrix in place. Returns (figures, whether W was written).

    exact rule: W <- W + U_k (F(S_k) - S_k) V_k^T; official rule: W <- W0 + U_r F(S_r) V_r^T (module docstring).
    The lean form of ``W0 + restrain_delta(W - W0)``: plan_restraint, then write_planned. The only m x n float64
    buffer is dW itself (freed before the write-back); dW is formed and the restrained matrix written back in row
    blocks of about 16 MiB, directly in W's dtype. W0 may live on another device than W (it is moved block by
    block, in its own dtype: once for the exact rule, twice for the official one). `delta` is delta_of(weight,
    original), for a caller that has formed dW already (telemetry's condition number before the restraint); it is
    only read. Raises FloatingPointError, leaving W untouched, when dW has a
    non-finite entry.
    """
    update, figures = plan_restraint(
        weight, original, smax_original, alpha, never_enlarge=never_enlarge, rank_rule=rank_rule,
        rank_hint=rank_hint, start_basis=start_basis, seed=seed, delta=delta,
    )
    return figures, write_planned(weight, original, update, figures, write)


def restrain_dense_reference(
    delta: torch.Tensor, smax_original: float, alpha: Alpha, *, never_enlarge: bool = False,
    rank_rule: RankRule = "official",
) -> torch.Tensor:
    """The restrained dW from a full float64 SVD: F on every value >= smax(W0), and with rank_rule 'official'
    numpy's float32 rank truncation (the official recipe, literally), with 'exact' the whole spectrum.

    Slow (a dense SVD of the whole matrix); the test suite compares the fast paths against it.
    """
    d = delta.to(torch.float64)
    u, s, vt = torch.linalg.svd(d, full_matrices=False)
    rank = len(s)
    if parse_rank_rule(rank_rule) == "official":
        rank = int((s > official_rank_tolerance(float(s[0]), d.shape)).sum())
    new_s, _, _ = restrain_values(s, smax_original, alpha, never_enlarge)
    return (u[:, :rank] * new_s[:rank]) @ vt[:rank]
