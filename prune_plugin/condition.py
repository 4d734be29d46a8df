"""cond(W) of an edited matrix W = W0 + dW at a fraction of a dense pass, certified, with the exact route as fallback.

Telemetry records cond(W) before and after each restraint. The exact route (spectrum.condition_number) forms the
Gram matrix of W, m^2 n flops, every time. Here the eigendecomposition G0 = V0 L0 V0^T of W0's Gram matrix (on the
smaller side) is computed once per matrix and kept; an edit then costs passes over dW of its rank only:

1. A basis Q of dW's column space by a randomized range finder, and dW ~ Q R^T with R = dW^T Q. What it misses,
   E = dW - Q R^T, is known exactly in Frobenius norm (||dW||_F^2 - ||R||_F^2), and by Weyl every singular value of
   W is within ||E||_2 <= ||E||_F of the same singular value of W' = W0 + Q R^T.
2. W' W'^T = G0 + X Q^T + Q X^T + Q R^T R Q^T with X = W0 R: G0 plus a symmetric update of rank 2r, compressed to
   U diag(c) U^T (U orthonormal).
3. Sylvester's law of inertia counts the eigenvalues of G' = L0 + U~ diag(c) U~^T (U~ = V0^T U) below any shift t
   exactly, from a 2r x 2r matrix (Haynsworth): #{lambda(G') < t} = #{L0 < t} + n_pos(H(t)) - #{c > 0}, with
   H(t) = diag(1/c) + U~^T diag(1/(L0 - t)) U~. Bisection on that count brackets lambda_min(G') and lambda_max(G').
4. The brackets, widened by the float64 error of G0's eigendecomposition and of the update (Weyl; with the
   round-off bound a DeltaBasis carries, see below) and by ||E||_F, bound cond(W) from both sides; the estimate is
   returned when the two bounds are within 2 rtol of each other (so it is within rtol of the exact value),
   otherwise None and the caller takes the exact route. A sign of H(t)
   too close to zero to trust, a full-rank dW (the basis would need more than _MAX_BLOCK_FRACTION of the smaller
   side) or a nearly singular W all end in None.

Along a sequence each call hands the next a DeltaBasis: Q, R, and V0^T Q and V0^T W0 R, so that the next call pays
products with W0 (a pass over it) and V0 (s^2 flops per column) only for the numerical rank of the change in R (one
column for a ROME edit), not for all of R; the round-off those updates gather is bounded, counted in the certificate,
and the two are formed afresh once it reaches a sixteenth of what the certificate can spare.

Extra memory kept per matrix: V0 and L0, 8 s^2 + 8 s bytes for the smaller side s (128 MiB at 4096x11008), and the
DeltaBasis, 8 (3 s + l) r bytes for rank r (18 MiB at rank 100 there); while it runs, one float64 copy of dW (8 m n
bytes, like the restraint) and a few s x 2r and n x r blocks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .restraint import CapturedDelta, Delta, Update, _apply_right, _orthonormal_beside, _wide_svd, delta_of
from .spectrum import _gram, condition_number

#: Relative accuracy of the estimate; telemetry's figure needs no more.
COND_RTOL = 1e-3
#: From this many elements ConditionNumbers tries the estimate (below, the exact route costs about as little:
#: 60 ms at 576x1536).
_ESTIMATE_MIN = 1 << 22
#: The range finder gives up (and the exact route runs) beyond this share of the smaller side.
_MAX_BLOCK_FRACTION = 1 / 16
_OVERSAMPLE = 8
_MIN_BLOCK = 16
_EPS = torch.finfo(torch.float64).eps
#: Relative float64 round-off allowed for in ||dW||_F^2 - ||R||_F^2 (a difference of two accumulated sums).
_ROUNDOFF = 1e-13
#: An eigenvalue of H(t) below _SIGN_TOL (s + 2r) times its entries' scale has an untrusted sign (16 eps).
_SIGN_TOL = 16 * _EPS
_BISECTIONS = 80


@dataclass(frozen=True)
class DeltaBasis:
    """What an estimate learned of dW for the next one: an orthonormal basis q of dW's columns (on the smaller side),
    R = dW^T q as the estimate represented dW (dW ~ q R^T), and, in W0's eigenbasis, V0^T q and V0^T W0 R, so that
    the next estimate pays products with W0 and V0 only for the change in R. `drift` bounds the round-off the two
    have gathered from those updates (as a bound on the error they put into W' W'^T); `updates` counts the calls
    since they were last formed afresh; `eigen` is where the next estimate's bisections start."""

    q: torch.Tensor
    r: torch.Tensor
    vq: torch.Tensor
    vx: torch.Tensor
    drift: float = 0.0
    updates: int = 0
    eigen: tuple[float, float] | None = None  # (lambda_min, lambda_max) of W' W'^T the estimate bracketed
    missed: float = 0.0  # the bound on ||dW - q R^T||_F the estimate used

    @property
    def rank(self) -> int:
        return self.q.shape[1]


@dataclass
class GramSpectrum:
    """W0's Gram matrix on its smaller side as V0 diag(values) V0^T (float64), and a bound on the error of that."""

    values: torch.Tensor  # ascending
    vectors: torch.Tensor
    transposed: bool  # the Gram matrix is W0^T W0 (W0 taller than wide)
    error: float  # bound on ||V0 diag(values) V0^T - W0 W0^T||_2 (formation and eigendecomposition round-off)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.vectors.numel() * self.vectors.element_size()


def gram_spectrum(original: torch.Tensor) -> GramSpectrum:
    """The eigendecomposition of W0's smaller-side Gram matrix (m^2 n + one eigh, once per matrix)."""
    w = original.detach()
    transposed = w.shape[0] > w.shape[1]
    small, large = sorted(w.shape)
    values, vectors = torch.linalg.eigh(_gram(w))
    top = float(values.abs().max()) if values.numel() else 0.0
    # Forming the Gram matrix (sums of `large` products) and eigh (backward stable) each leave errors of a few
    # (dimension x eps x ||G||); counted generously, as 16 (small + large) eps ||G||.
    return GramSpectrum(values, vectors, transposed, 16 * (small + large) * _EPS * top)


class _Slicer:
    """Counts the eigenvalues of L0 + U~ diag(c) U~^T below a shift t (Sylvester's inertia, module docstring)."""

    def __init__(self, values: torch.Tensor, u_tilde: torch.Tensor, c: torch.Tensor) -> None:
        self.values, self.u, self.c = values, u_tilde, c
        self.inv_c = torch.diag(1.0 / c)
        self.u2 = u_tilde.square()  # for the round-off scale of every count
        self.n_pos_c = int((c > 0).sum())
        self.size = values.numel()

    def count(self, t: float) -> int | None:
        """#{eigenvalues < t}, or None when the computation cannot tell (t on a pole, or a sign too close to 0)."""
        gap = self.values - t
        if float(gap.abs().min()) <= 1e-13 * abs(t):  # on a pole (t = 0 is never one: L0 > 0 is required)
            return None
        below = int((gap < 0).sum())
        if self.c.numel() == 0:
            return below
        h = self.inv_c + (self.u / gap.unsqueeze(1)).mT @ self.u
        eig = torch.linalg.eigvalsh(h)
        # Round-off in H (and in U~ and L0 before it) is a few (s + 2r) eps times the largest diagonal of
        # |diag(1/c)| + U~^T |diag(1/gap)| U~, which bounds every entry's sum of magnitudes.
        scale = float((self.inv_c.diagonal().abs() + (self.u2 / gap.abs().unsqueeze(1)).sum(0)).max())
        if float(eig.abs().min()) <= _SIGN_TOL * (self.size + self.c.numel()) * scale:
            return None
        return below + int((eig > 0).sum()) - self.n_pos_c

    def robust_count(self, t: float) -> tuple[float, int] | None:
        """(t', count(t')) for t' = t or t nudged by up to 1e-6 relative, off a pole or an untrusted sign."""
        for nudge in (0.0, 1e-7, -1e-7, 1e-6, -1e-6):
            shifted = t * (1 + nudge) if t != 0 else nudge
            n = self.count(shifted)
            if n is not None:
                return shifted, n
        return None


#: A DeltaBasis is formed afresh (Q orthonormalised again, V0^T Q and V0^T W0 R recomputed) after this many updates
#: at the latest, whatever its drift bound says.
_MAX_UPDATES = 256
#: Half-width (relative) of the first bracket tried around the previous call's eigenvalue.
_WARM_WIDTH = 2e-3


#: Lanczos steps of _top_ritz, and the half-width of the bracket tried around its value (within it, no bisection
#: step is left: 2 x 1e-4 < rtol / 4).
_RITZ_STEPS = 48
_RITZ_WIDTH = 1e-4


def _top_ritz(values: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> float | None:
    """The largest Ritz value of L0 + U diag(c) U^T after _RITZ_STEPS Lanczos steps (full reorthogonalisation),
    a guess for its largest eigenvalue: each step is one product with the diagonal and the low-rank update
    (s x 2r flops), against an inertia count's s x (2r)^2. Only a guess: the counts around it certify."""
    s = values.numel()
    steps = min(_RITZ_STEPS, s)
    if steps < 2:
        return None
    generator = torch.Generator(device=values.device).manual_seed(0)
    x = torch.randn(s, dtype=values.dtype, device=values.device, generator=generator)
    basis = values.new_zeros(steps, s)
    alphas, betas = [], []
    x = x / x.norm()
    for j in range(steps):
        basis[j] = x
        y = values * x + u @ (c * (u.mT @ x))
        alphas.append(float(x @ y))
        for _ in range(2):
            y = y - basis[:j + 1].mT @ (basis[:j + 1] @ y)
        beta = float(y.norm())
        if j == steps - 1 or beta <= 1e-12 * max(abs(alphas[-1]), 1e-300):
            break
        betas.append(beta)
        x = y / beta
    t = torch.diag(torch.tensor(alphas, dtype=values.dtype))
    if betas:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=values.dtype)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(t)[-1])


def _bracket(slicer: _Slicer, lo: float, hi: float, index: int, rtol: float, guess: float | None = None,
             width: float = 0.0) -> tuple[float, float] | None:
    """[lo, hi] with #{eig < lo} <= index < #{eig < hi}, i.e. the (index+1)-th smallest eigenvalue in [lo, hi],
    narrowed by bisection to hi <= lo (1 + rtol); None when a count is not reliable or a bound does not hold.
    `guess` (the previous call's value: an edit moves it little; or a Ritz value) is tried first: two counts that
    bracket it within +-width (default _WARM_WIDTH) certify that bracket on their own and leave a few bisection
    steps."""
    width = width or _WARM_WIDTH
    if guess is not None and lo < guess < hi:
        below = slicer.robust_count(guess * (1 - width))
        above = slicer.robust_count(guess * (1 + width))
        if below is not None and above is not None and below[1] <= index < above[1]:
            return _bisect(slicer, below[0], above[0], index, rtol)
    start = slicer.robust_count(lo * (1 - 1e-9))  # widened off the poles the bounds often sit on
    end = slicer.robust_count(hi * (1 + 1e-9))
    if start is None or end is None:
        return None
    (lo, n_lo), (hi, n_hi) = start, end
    if not (n_lo <= index < n_hi):
        return None
    return _bisect(slicer, lo, hi, index, rtol)


def _bisect(slicer: _Slicer, lo: float, hi: float, index: int, rtol: float) -> tuple[float, float] | None:
    """Bisection of a bracket [lo, hi] of the (index+1)-th smallest eigenvalue down to hi <= lo (1 + rtol)."""
    for _ in range(_BISECTIONS):
        if hi <= lo * (1 + rtol):
            return lo, hi
        mid = math.sqrt(lo * hi) if lo > 0.25 * hi else 0.5 * (lo + hi)
        probe = slicer.robust_count(mid)
        if probe is None:
            return None
        mid, n = probe
        if n <= index:
            lo = mid
        else:
            hi = mid
    return None


def _oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.mT if transposed else t


#: Rows converted to float64 at a time (about 16 MiB), so that no float64 copy of W0 is made.
_BLOCK_ELEMENTS = 1 << 21


def _times(original: torch.Tensor, r: torch.Tensor, transposed: bool) -> torch.Tensor:
    """oriented(W0) @ r in float64, from row blocks of W0 converted one at a time."""
    m, n = original.shape
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    if transposed:  # W0^T r = sum over row blocks of W0[blk]^T r[blk]
        out = r.new_zeros(n, r.shape[1])
        for start in range(0, m, rows):
            out.addmm_(original[start:start + rows].to(r.device).to(torch.float64).mT, r[start:start + rows])
        return out
    out = r.new_empty(m, r.shape[1])
    for start in range(0, m, rows):
        block = original[start:start + rows].to(r.device).to(torch.float64)
        out[start:start + rows] = (r.mT @ block.mT).mT
    return out


def _start(basis: DeltaBasis | torch.Tensor | None, vectors: torch.Tensor, small: int, large: int,
           like: torch.Tensor) -> DeltaBasis:
    """The state an estimate starts from: the previous call's, a bare basis (nothing known along it yet), or none."""
    if isinstance(basis, DeltaBasis) and basis.q.shape[0] == small and basis.r.shape[0] == large:
        return dataclasses.replace(basis, q=basis.q.to(like), r=basis.r.to(like), vq=basis.vq.to(like),
                                   vx=basis.vx.to(like))
    q = like.new_zeros(small, 0)
    if isinstance(basis, torch.Tensor) and basis.ndim == 2 and basis.shape[0] == small and 0 < basis.shape[1] < small:
        q = torch.linalg.qr(basis.to(like))[0]  # a basis from elsewhere (float32, say): orthonormal in float64
    return DeltaBasis(q, like.new_zeros(large, q.shape[1]), vectors.mT @ q, like.new_zeros(small, q.shape[1]))


def _truncation(values: torch.Tensor, dropped2: float) -> tuple[int, float]:
    """(k, ||values[k:]||) for the fewest leading values (descending) whose dropped tail has squared norm at most
    `dropped2`."""
    tail = values.square().flip(0).cumsum(0).flip(0)  # tail[i] = sum of values[i:]^2
    keep = int((tail > dropped2).sum())
    return keep, math.sqrt(float(tail[keep])) if keep < len(values) else 0.0


def _compressed(r: torch.Tensor, budget: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """dW ~ Q R^T compressed to its numerical rank: (turn, sr, R turn, ||dropped||_F) with R^T = ur sr vrt and
    turn = ur[:, :keep] (Q and what is kept along it turn with R: R ur = vrt^T sr)."""
    ur, sr, vrt = _wide_svd(r.mT)
    keep, dropped = _truncation(sr, budget ** 2 / 4)
    return ur[:, :keep], sr[:keep], vrt[:keep].mT * sr[:keep], dropped


def _drift_step(r: torch.Tensor, r_old: torch.Tensor, vx: torch.Tensor, values: torch.Tensor) -> float:
    """Round-off one update adds to what a DeltaBasis carries, as error in W' W'^T (generously: dimension x eps x
    the sizes involved): to V0^T W0 R from W0 (change), V0^T of it and the sum, and to V0^T Q from turning it with
    Q; each enters twice."""
    small, large = vx.shape[0], r.shape[0]
    unit = 16 * (small + large) * _EPS
    w0_norm = math.sqrt(float(values[-1]))
    r_norm, x_norm = float(r.norm()), float(vx.norm())
    return 2 * unit * (w0_norm * (r_norm + float(r_old.norm())) + x_norm) + 2 * unit * (x_norm + r_norm ** 2)


def _afresh(state: DeltaBasis, r: torch.Tensor, values: torch.Tensor, rtol: float) -> bool:
    """Whether an estimate forms V0^T Q and V0^T W0 R afresh: no products kept yet, or their drift (with the
    next update's) near a sixteenth of what the certificate spares on lambda_min."""
    if not state.updates or state.r.shape[1] != r.shape[1] or state.updates >= _MAX_UPDATES:
        return True
    return 2 * (state.drift + _drift_step(r, state.r, state.vx, values)) > rtol * float(values[0]) / 16


def _not_low_rank(missed2: float, budget: float, fro2: float) -> bool:
    """Whether far more of dW lies outside a basis than the estimate's budget allows (then the exact route)."""
    return missed2 > max(9 * budget ** 2, 100 * _ROUNDOFF * fro2)


def certified_condition_number(
    weight: torch.Tensor, original: torch.Tensor, spectrum: GramSpectrum, *, rtol: float = COND_RTOL,
    basis: DeltaBasis | torch.Tensor | None = None, seed: int = 0, delta: Delta | None = None,
    captured: CapturedDelta | None = None,
) -> tuple[float | None, DeltaBasis | None]:
    """cond(W) within `rtol` relative, certified (module docstring), or None when it cannot be certified; and what
    it learned of dW = W - W0 (DeltaBasis: the orthonormal basis of dW's columns it worked with, rank = its width),
    None when dW is not low-rank. `spectrum` is gram_spectrum(original). `basis`, what a previous call returned for
    this matrix (or just a basis), starts the range finder: the restrained dW lies in the edited dW's column space,
    and the next edit adds a few columns to it, so only those cost new passes; and W0 R and V0^T W0 R, the
    costliest products besides the passes over dW, are then updated by the change in R alone (its numerical
    rank: one for a ROME edit, the restrained count for a restraint). `delta`: restraint.delta_of(weight, original)
    when the caller has formed it already (shared with the restraint); only read. `captured`: what the restraint's
    block found of this same dW (Restraint.captured), which replaces the range finder and the pass for R when
    `basis` is not a DeltaBasis (a first look)."""
    w = weight.detach()
    if w.shape != original.shape:
        raise ValueError(f"weight {tuple(w.shape)} and original {tuple(original.shape)} differ in shape")
    if delta is not None and delta.d.shape != w.shape:
        raise ValueError(f"delta {tuple(delta.d.shape)} and weight {tuple(w.shape)} differ in shape")
    delta = delta_of(w, original.detach()) if delta is None else delta
    d, fro2 = _oriented(delta.d, spectrum.transposed), delta.norm2
    small, large = d.shape
    if not math.isfinite(fro2):
        raise FloatingPointError("non-finite values in the matrix: it has no condition number")
    values, vectors = spectrum.values.to(w.device), spectrum.vectors.to(w.device)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    limit = max(_MIN_BLOCK, int(small * _MAX_BLOCK_FRACTION))
    # What the estimate may leave out of dW: a small share of the bound it has to meet on smin.
    if float(values[0]) <= 0:
        return None, None  # W0 is singular: no relative accuracy on smin from here
    # (the final check allows 2 rtol in all: 2 budget / smin here, rtol / 4 for each bisection)
    budget = rtol * math.sqrt(float(values[0])) / 3
    if captured is not None and not isinstance(basis, DeltaBasis):
        return _from_captured(original, spectrum, rtol, budget, captured, d, fro2, vectors)
    state = _start(basis, vectors, small, large, d)
    q, r_old, vq, vx = state.q, state.r, state.vq, state.vx
    r = (q.mT @ d).mT
    missed2 = fro2 - float(r.square().sum())
    if _afresh(state, r, values, rtol):  # V0^T Q is formed after compression, for the columns kept
        state = dataclasses.replace(state, updates=0)
        if q.shape[1]:  # and Q, turned many times, orthonormal again: q = Q' T, so R' = dW^T Q' = R T^-1
            q, turned = torch.linalg.qr(q)
            r = torch.linalg.solve_triangular(turned, r, upper=True, left=False)
            missed2 = fro2 - float(r.square().sum())
    block = q.shape[1] + max(_OVERSAMPLE, _MIN_BLOCK - q.shape[1])
    while fro2 > 0 and missed2 > max(budget ** 2, _ROUNDOFF * fro2):  # below that, cancellation: measured below
        add = min(block - q.shape[1], limit - q.shape[1])
        if add <= 0:
            return None, None  # dW is not low-rank enough: the exact route
        omega = torch.randn(add, large, dtype=d.dtype, device=d.device, generator=generator)
        qn = _orthonormal_beside(_apply_right(d, omega), q)
        rn = (qn.mT @ d).mT
        q, r = torch.cat([q, qn], 1), torch.cat([r, rn], 1)
        if state.updates:
            r_old = torch.cat([r_old, r_old.new_zeros(large, qn.shape[1])], 1)
            vq, vx = torch.cat([vq, vectors.mT @ qn], 1), torch.cat([vx, vx.new_zeros(small, qn.shape[1])], 1)
        previous, missed2 = missed2, fro2 - float(r.square().sum())
        block *= 2
        if missed2 > 0.9 * previous:
            break  # more columns hardly help: a full-rank rest (W's rounding, or a dense edit); judged below
    if _not_low_rank(missed2, budget, fro2):
        return None, None
    missed2 = max(missed2, 0.0) + _ROUNDOFF * fro2
    return _certify(original, spectrum, rtol, budget, state, q, r, r_old, vq, vx, missed2, d, fro2)


def _from_captured(original: torch.Tensor, spectrum: GramSpectrum, rtol: float, budget: float,
                   captured: CapturedDelta, d: torch.Tensor, fro2: float, vectors: torch.Tensor
                   ) -> tuple[float | None, DeltaBasis | None]:
    """A first look from the restraint's factors: dW = U S V^T + E, ||E||_F^2 <= missed2, so Q = U and R = V S on
    the smaller side when W is wide (U^T E = 0: the miss lies outside Q), Q = V and R = U S when it is tall (E V is
    the Ritz residual, not orthogonal to Q: the dropped parts then add by the triangle inequality)."""
    u, s, v = (t.to(d) for t in captured[:3])
    q, r = (v, u * s) if spectrum.transposed else (u, v * s)
    if q.shape[0] != d.shape[0] or r.shape[0] != d.shape[1]:
        raise ValueError(f"captured factors {tuple(u.shape)}, {tuple(v.shape)} do not fit dW {tuple(d.shape)}")
    missed2 = captured.missed2
    if _not_low_rank(missed2, budget, fro2):
        return None, None
    small, large = d.shape
    state = DeltaBasis(q.new_zeros(small, 0), q.new_zeros(large, 0), q.new_zeros(small, 0), q.new_zeros(small, 0))
    empty = q.new_zeros(large, q.shape[1])
    return _certify(original, spectrum, rtol, budget, state, q, r, empty, empty, empty, missed2, d, fro2,
                    orthogonal=not spectrum.transposed)


def _certify(original: torch.Tensor, spectrum: GramSpectrum, rtol: float, budget: float, state: DeltaBasis,
             q: torch.Tensor, r: torch.Tensor, r_old: torch.Tensor, vq: torch.Tensor, vx: torch.Tensor,
             missed2: float, d: torch.Tensor | None, fro2: float, orthogonal: bool = True
             ) -> tuple[float | None, DeltaBasis]:
    """Steps 2 to 4 of the module docstring for dW ~ q r^T, ||dW - q r^T||_F^2 <= missed2, starting from `state`
    (r_old, vq, vx: the state's R and products, padded to q's columns). `d` (oriented dW) lets the miss be measured
    where its bound is too coarse; without it (dW not formed) the bound stands. What the compressions drop lies in
    q's span: it adds to missed2 by Pythagoras when `orthogonal` (missed2 bounds the part of dW outside q), by the
    triangle inequality otherwise."""
    values, vectors = spectrum.values.to(q.device), spectrum.vectors.to(q.device)
    small, large = q.shape[0], r.shape[0]
    drift, updates = state.drift, state.updates
    inside = 0.0  # ||what the compressions below drop||_F, in q's span
    if r.shape[1] and not updates:
        # Afresh (a first look, or too much drift): compress dW ~ Q R^T to its numerical rank (dropped values join
        # what is missed), then X = W0 R and the V0^T products for the columns kept.
        turn, sr, r, inside = _compressed(r, budget)
        q = q @ turn
        vq, vx = vectors.mT @ q, vectors.mT @ _times(original.detach(), r, spectrum.transposed)
        drift, updates = 0.0, 1
    elif r.shape[1]:
        # V0^T W0 R from the change in R since the state, at its numerical rank (what is dropped of the change
        # leaves dW's representation, q R_kept^T, and joins what is missed).
        uc, sc, vct = _wide_svd((r - r_old).mT)  # change = vct^T diag(sc) uc^T
        keep, inside = _truncation(sc, budget ** 2 / 16)
        kept = (vct[:keep].mT * sc[:keep]) @ uc[:, :keep].mT
        w0_change = _times(original.detach(), vct[:keep].mT, spectrum.transposed) * sc[:keep]  # W0 (change)
        product = vectors.mT @ w0_change @ uc[:, :keep].mT
        r, vx, drift, updates = r_old + kept, vx + product, drift + _drift_step(r, r_old, vx, values), updates + 1
        # then compressed, with Q, V0^T Q and V0^T W0 R turning with R
        turn, sr, r, dropped = _compressed(r, budget)
        q, vq, vx, inside = q @ turn, vq @ turn, vx @ turn, inside + dropped
    missed2 = missed2 + inside ** 2 if orthogonal else (math.sqrt(missed2) + inside) ** 2
    rank = q.shape[1]

    def measured_miss() -> float:
        # ||dW - Q R^T||_F itself (one more pass), with the round-off of computing it: the difference of the
        # two sums above is too coarse next to a large dW.
        rows = max(1, _BLOCK_ELEMENTS // max(large, 1))
        direct2 = sum(float(torch.linalg.vector_norm(d[i:i + rows] - q[i:i + rows] @ r.mT)) ** 2
                      for i in range(0, small, rows))
        return math.sqrt(direct2) + 8 * _EPS * math.sqrt(large * fro2)

    measured = d is not None and rank > 0 and missed2 > budget ** 2
    missed = measured_miss() if measured else math.sqrt(missed2)
    learned = DeltaBasis(q, r, vq, vx, drift, updates, missed=missed)
    if rank:
        # W' W'^T - G0 = [Q X] M [Q X]^T (X = W0 R), in W0's eigenbasis: an orthonormal basis of V0^T [Q X]
        z, rz = torch.linalg.qr(torch.cat([vq, vx], 1))
        middle = torch.zeros(2 * rank, 2 * rank, dtype=torch.float64, device=q.device)
        middle[:rank, :rank] = torch.diag(sr.square())
        middle[:rank, rank:] = torch.eye(rank, dtype=torch.float64, device=q.device)
        middle[rank:, :rank] = torch.eye(rank, dtype=torch.float64, device=q.device)
        c, ec = torch.linalg.eigh(rz @ middle @ rz.mT)
        c_top = float(c.abs().max())
        keep_c = c.abs() > 1e-12 * c_top
        update_error = 16 * (small + large) * _EPS * c_top + float(c[~keep_c].abs().sum()) + drift
        c, u_tilde = c[keep_c], z @ ec[:, keep_c]
    else:
        c = values.new_zeros(0)
        u_tilde = values.new_zeros(small, 0)
        update_error = 0.0
    slicer = _Slicer(values, u_tilde, c)
    error = spectrum.error + update_error
    n_pos, n_neg = int((c > 0).sum()), int((c < 0).sum())
    c_max, c_min = (float(c.max()), float(c.min())) if c.numel() else (0.0, 0.0)
    # Brackets from Weyl and interlacing (a rank-p update with p+ positive and p- negative values moves the
    # smallest eigenvalue at most to L0[p+] and the largest at least to L0[s - 1 - p-]); an inner end sits halfway
    # to the next eigenvalue of W0 (off the pole, where H(t)'s signs are easiest to trust).
    lam_rtol = rtol / 4
    v = [float(x) for x in values[[0, min(n_pos, small - 1), min(n_pos + 1, small - 1), max(small - 2 - n_neg, 0),
                                   max(small - 1 - n_neg, 0), small - 1]]]
    low_hi = 0.5 * (v[1] + v[2]) if n_pos + 1 < small else v[5] + max(c_max, 0.0)
    high_lo = 0.5 * (v[3] + v[4]) if n_neg + 1 < small else max(v[0] + min(c_min, 0.0), 0.0)
    previous = state.eigen if state.updates else None
    low = _bracket(slicer, max(v[0] + min(c_min, 0.0), 0.0), low_hi, 0, lam_rtol, previous and previous[0])
    # lambda_max: a Ritz value guesses it within 1e-4 in 48 cheap steps, where an edit may have moved it far
    top = _top_ritz(values, u_tilde, c) if c.numel() else None
    high = (_bracket(slicer, high_lo, v[5] + max(c_max, 0.0), small - 1, lam_rtol, top, _RITZ_WIDTH)
            if top is not None else
            _bracket(slicer, high_lo, v[5] + max(c_max, 0.0), small - 1, lam_rtol, previous and previous[1]))
    if low is None or high is None:
        return None, learned
    learned = dataclasses.replace(learned, eigen=(math.sqrt(low[0] * low[1]), math.sqrt(high[0] * high[1])))

    def certified(missed: float) -> float | None:
        smin_lo = math.sqrt(max(low[0] - error, 0.0)) - missed
        smax_lo = math.sqrt(max(high[0] - error, 0.0)) - missed
        if smin_lo <= 0 or smax_lo <= 0:
            return None
        cond_lo = smax_lo / (math.sqrt(low[1] + error) + missed)
        cond_hi = (math.sqrt(high[1] + error) + missed) / smin_lo
        return math.sqrt(cond_lo * cond_hi) if cond_hi <= cond_lo * (1 + 2 * rtol) else None

    value = certified(missed)
    if value is None and d is not None and rank and not measured and certified(0.0) is not None:
        missed = measured_miss()  # smin(W) well below smin(W0): the miss measured, not bounded
        value, learned = certified(missed), dataclasses.replace(learned, missed=missed)
    return value, learned


def condition_after_update(weight: torch.Tensor, original: torch.Tensor, spectrum: GramSpectrum, before: DeltaBasis,
                           update: Update, *, rtol: float = COND_RTOL) -> tuple[float | None, DeltaBasis | None]:
    """cond(W) right after a restraint wrote `update` into W, from what the estimate of cond(W) before it learned
    (`before`), with no pass over dW: the restrained dW is dW + U diag(values) V^T (exact rule) or U diag(values)
    V^T (official rule), so R moves by the update's part along q, and what the update has outside q joins what is
    missed, with the rounding of writing W in its dtype (at most unit round-off x ||W||_F). As
    certified_condition_number otherwise; None when that cannot certify (the caller then takes the full route)."""
    w = weight.detach()
    values = spectrum.values.to(w.device)
    if float(values[0]) <= 0 or before.rank == 0:
        return None, None
    small = before.q.shape[0]
    budget = rtol * math.sqrt(float(values[0])) / 3
    # the update in the estimate's orientation, a diag(vals) b^T with a on the smaller side
    a, b = (update.vt.mT, update.u) if spectrum.transposed else (update.u, update.vt.mT)
    a, b, vals = a.to(before.q), b.to(before.q), update.values.to(before.q)
    if a.shape[0] != small or b.shape[0] != before.r.shape[0]:
        raise ValueError(f"update of shape {tuple(update.u.shape)} x {tuple(update.vt.shape)} does not fit the "
                         f"estimate's basis {tuple(before.q.shape)}")
    along = before.q.mT @ a  # r x k
    outside = float(((a - before.q @ along) * vals).norm())
    # W was written as fl(W + update) (float64 sum, then rounded to its dtype): unit round-off of the result, and
    # the sum's own float64 round-off, (k + 2) eps (|W| + sum_i |value_i| |u_i| |v_i|^T)
    w_norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    unit = torch.finfo(w.dtype).eps / 2
    rounding = 1.01 * unit * w_norm + (len(vals) + 2) * _EPS * (w_norm + float(vals.abs().sum()))
    base, missed = (before.r, before.missed) if update.keeps_delta else (torch.zeros_like(before.r), 0.0)
    r = base + (b * vals) @ along.mT
    missed = missed + outside + rounding
    return _certify(original, spectrum, rtol, budget, before, before.q, r, before.r, before.vq, before.vx,
                    missed * missed, None, 0.0, orthogonal=False)


class ConditionNumbers:
    """cond(W) of edited matrices, by name: the certified estimate from W0's kept Gram spectrum for large matrices,
    the exact route (spectrum.condition_number) for small ones and whenever the estimate cannot certify itself."""

    def __init__(self, min_elements: int | None = None) -> None:
        self.min_elements = _ESTIMATE_MIN if min_elements is None else min_elements
        self._spectra: dict[str, GramSpectrum] = {}
        self._bases: dict[str, DeltaBasis] = {}
        self._full_rank: set[str] = set()  # matrices whose dW was found full rank (FT): the exact route from then on
        self.estimated = 0  # how many values came from the estimate (the rest from the exact route)
        self.exact = 0
        self._current: set[str] = set()  # names whose kept DeltaBasis describes W as it is (set by get())
        self.from_factors = 0  # how many of the estimated values after_restraint took from a restraint's factors

    def estimates(self, name: str, weight: torch.Tensor) -> bool:
        """Whether get() tries the estimate for this matrix (which then needs dW: see its `delta`)."""
        return weight.numel() >= self.min_elements and weight.ndim == 2 and name not in self._full_rank

    def get(self, name: str, weight: torch.Tensor, original: torch.Tensor, *, delta: Delta | None = None,
            start: torch.Tensor | None = None, captured: CapturedDelta | None = None) -> float:
        """cond(W) of matrix `name`. `delta`: restraint.delta_of(weight, original) if the caller has it;
        `start`: a basis of dW's columns from elsewhere (the restraint's captured basis), where the estimate starts
        when it has learned nothing of this matrix yet (a first look, a resumed run) and W is wide (the estimate
        works on the smaller side); `captured`: what the restraint found of this dW (Restraint.captured with
        `capture`), which spares such a first look its range finder, either orientation."""
        w = weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("non-finite values in the matrix: it has no condition number")
        if self.estimates(name, w):
            if name not in self._spectra:
                self._spectra[name] = gram_spectrum(original.to(w.device))
            basis = self._bases.get(name)
            if basis is None and start is not None and w.shape[0] <= w.shape[1]:
                basis = start
            value, basis = certified_condition_number(w, original, self._spectra[name], basis=basis, delta=delta,
                                                      captured=captured)
            if basis is None:
                self._full_rank.add(name)  # its edits are dense (or W0 singular): no use trying again every call
                self._bases.pop(name, None)
                self._current.discard(name)
            else:
                self._bases[name] = basis
                self._current.add(name)
            if value is not None:
                self.estimated += 1
                return value
        self._current.discard(name)
        self.exact += 1
        return condition_number(w)

    def after_restraint(self, name: str, weight: torch.Tensor, original: torch.Tensor, update: Update | None,
                        *, delta: Delta | None = None) -> float:
        """cond(W) right after a restraint wrote `update` into W, when get() measured this W just before it:
        from what that estimate learned and the update's factors, with no pass over dW
        (condition_after_update); otherwise, or when that does not certify, as get()."""
        state = self._bases.get(name)
        if update is not None and state is not None and name in self._current and name in self._spectra:
            self._current.discard(name)
            value, learned = condition_after_update(weight.detach(), original, self._spectra[name], state, update)
            if value is not None:
                self._bases[name] = learned
                self._current.add(name)
                self.estimated += 1
                self.from_factors += 1
                return value
        return self.get(name, weight, original, delta=delta)

    def keep_spectrum(self, name: str, spectrum: GramSpectrum) -> None:
        """Use `spectrum` as W0's Gram spectrum for `name` (computed once elsewhere, e.g. for several sessions).
        What earlier estimates learned goes: their V0^T products belong to the eigenbasis they were made in."""
        self._spectra[name] = spectrum
        self._bases.pop(name, None)
        self._current.discard(name)

    def basis(self, name: str) -> DeltaBasis | None:
        """What the latest estimate for `name` learned of dW (its basis, .q; the next estimate starts from it)."""
        return self._bases.get(name)

    def start_afresh(self, name: str, basis: DeltaBasis | torch.Tensor | None = None, *, current: bool = False) -> None:
        """Forget what earlier calls learned about `name`'s dW (its basis, a full-rank verdict), and start the next
        estimate from `basis` if given; `current`: that DeltaBasis is what get() learned of W as it is now (so
        after_restraint may update it by a restraint's factors)."""
        self._full_rank.discard(name)
        self._current.discard(name)
        self._bases.pop(name, None)
        if basis is not None:
            self._bases[name] = basis
            if current and isinstance(basis, DeltaBasis):
                self._current.add(name)

    def nbytes(self) -> int:
        """Bytes kept between calls: the Gram spectra of W0 and what the latest estimates learned of dW."""
        kept = [t for b in self._bases.values() if isinstance(b, DeltaBasis) for t in (b.q, b.r, b.vq, b.vx)]
        return sum(s.nbytes for s in self._spectra.values()) + sum(t.numel() * t.element_size() for t in kept)

    def clear(self) -> None:
        self._spectra.clear()
        self._bases.clear()
        self._full_rank.clear()
        self._current.clear()
