"""The exact rank rule against an independent dense float64 reference, through EditSession as users call it.

The reference is the official formula applied in float64 to the stored W0 and W over the whole spectrum of dW
(a full SVD, F on every value >= smax(W0)), written back in the weight's dtype. The plugin must meet it within
1e-6 relative for float32/float64 weights, and within twice the dtype's own rounding of the reference for
float16/bfloat16 -- on fresh random inputs: low and full rank dW, ill-conditioned dW, both regimes of F
(smax(W0) above and below 1/ln a), every entry point (after_edit in online mode, end() in final mode,
restrain_now()).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_plugin.config import PruneConfig
from prune_plugin.plugins import edit_session

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ALPHAS = [math.e, 2.0, 1.2, "linear"]


def reference_restrained(w0: torch.Tensor, w: torch.Tensor, alpha, never_enlarge: bool) -> torch.Tensor:
    """Written out independently of the package: float64 SVD of the stored dW, F on the whole spectrum."""
    d = w.double() - w0.double()
    smax0 = torch.linalg.svdvals(w0.double())[0].item()
    u, s, vt = torch.linalg.svd(d, full_matrices=False)
    if alpha == "linear":
        f = (s + smax0) / 2
    else:
        f = (torch.log(s.clamp_min(smax0)) - math.log(smax0)) / math.log(alpha) + smax0
    f = torch.where(s >= smax0, f, s)
    if never_enlarge:
        f = torch.minimum(f, s)
    return w0.double() + (u * f) @ vt


def random_original(g, m, n, smax0, dtype):
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return (w0 * (smax0 / torch.linalg.svdvals(w0)[0])).to(dtype)


def random_delta(g, m, n, kind, rank, smax0):
    """dW of the given kind, in float64 (the caller adds it to W0 and rounds to the dtype)."""
    p = min(m, n)
    if kind == "low rank":
        a = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
        b = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        strength = smax0 * torch.logspace(math.log10(6.0), math.log10(0.3), rank, dtype=torch.float64)
        return (a * strength) @ b.mT
    if kind == "full rank":  # FT-like: a dense bulk below smax(W0) plus a few large directions
        bulk = torch.randn(m, n, generator=g, dtype=torch.float64)
        bulk *= 0.4 * smax0 / torch.linalg.svdvals(bulk)[0]
        a = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
        b = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        return bulk + (a * smax0 * torch.linspace(4.0, 1.1, rank, dtype=torch.float64)) @ b.mT
    # ill-conditioned: singular values over 12 orders of magnitude, the largest a few times smax(W0)
    a = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0]
    return (a * 4 * smax0 * torch.logspace(0, -12, p, dtype=torch.float64)) @ b.mT


def one_matrix_model(w0: torch.Tensor) -> torch.nn.Module:
    model = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=w0.dtype)
    with torch.no_grad():
        model.weight.copy_(w0)
    return model


def restrain_through_the_session(w0, w, entry, alpha, never_enlarge):
    """The edited matrix W written by an 'editor', then restrained the way `entry` says."""
    model = one_matrix_model(w0)
    mode = "online" if entry == "after_edit" else "final"
    config = PruneConfig(prune=True, prune_alpha=alpha, prune_mode=mode, prune_never_enlarge=never_enlarge)
    session = edit_session(model, config, ["weight"])
    session.before_edit()
    with torch.no_grad():
        model.weight.copy_(w)
    if entry == "restrain_now":  # an editing loop of its own that restrains when it chooses
        session.restrain_now()
    else:
        session.after_edit({"prompt": "edit"})
        session.end()
    return model.weight.detach(), session


def assert_meets_reference(result: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    assert result.dtype == dtype and bool(torch.isfinite(result).all())
    error = float((result.double() - reference).norm())
    if dtype in (torch.float32, torch.float64):
        assert error <= 1e-6 * float(reference.norm()), error / float(reference.norm())
    else:
        rounding = float((reference.to(dtype).double() - reference).norm())
        assert error <= 2 * rounding, (error, rounding)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(6, 72),
    n=st.integers(6, 72),
    kind=st.sampled_from(["low rank", "full rank", "ill-conditioned"]),
    rank=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    alpha=st.sampled_from(ALPHAS),
    enlarging_regime=st.booleans(),
    never_enlarge=st.booleans(),
    entry=st.sampled_from(["after_edit", "end", "restrain_now"]),
)
def test_restrained_weights_meet_the_float64_reference_in_every_dtype(
        seed, m, n, kind, rank, dtype, alpha, enlarging_regime, never_enlarge, entry):
    g = torch.Generator().manual_seed(seed)
    # F enlarges values when smax(W0) < 1/ln a: draw smax(W0) on either side of it.
    pivot = 4.0 if alpha == "linear" else 1 / math.log(alpha)
    smax0 = pivot * (0.4 if enlarging_regime else 2.5)
    w0 = random_original(g, m, n, smax0, dtype)
    w = (w0.double() + random_delta(g, m, n, kind, min(rank, m, n), smax0)).to(dtype)
    reference = reference_restrained(w0, w, alpha, never_enlarge)
    result, session = restrain_through_the_session(w0, w, entry, alpha, never_enlarge)
    assert_meets_reference(result, reference, dtype)
    session.restore()
    assert torch.equal(session.model.weight, w0)  # restorable bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", ["low rank", "full rank"])
def test_the_certified_top_k_path_is_taken_and_exact_on_larger_matrices(dtype, kind):
    """At 160x400 the top-k sketch (not the dense fallback) restrains both a rank-5 and a full-rank dW."""
    g = torch.Generator().manual_seed(7)
    w0 = random_original(g, 160, 400, 3.0, dtype)
    w = (w0.double() + random_delta(g, 160, 400, kind, 5, 3.0)).to(dtype)
    reference = reference_restrained(w0, w, math.e, True)
    result, session = restrain_through_the_session(w0, w, "restrain_now", math.e, True)
    figures = session.last_restraint["weight"]
    above = int((torch.linalg.svdvals(w.double() - w0.double()) >= figures.smax_original).sum())
    assert figures.path == "lowrank" and figures.rank == figures.n_restrained == above > 0
    assert_meets_reference(result, reference, dtype)


def test_a_dw_whose_bulk_reaches_smax_of_w0_falls_back_to_the_dense_svd_and_stays_exact():
    """No certificate is possible when dW has many values around smax(W0): the dense float64 SVD decides."""
    g = torch.Generator().manual_seed(3)
    w0 = random_original(g, 120, 300, 3.0, torch.float32)
    bulk = torch.randn(120, 300, generator=g, dtype=torch.float64)
    w = (w0.double() + bulk * (3.3 / torch.linalg.svdvals(bulk)[0])).to(torch.float32)
    reference = reference_restrained(w0, w, 2.0, True)
    result, session = restrain_through_the_session(w0, w, "restrain_now", 2.0, True)
    assert session.last_restraint["weight"].path == "dense"
    assert_meets_reference(result, reference, torch.float32)


def test_float64_weights_keep_the_directions_the_float32_rank_rule_would_drop():
    """The official rule truncates at s_1 max(m, n) eps32; on an ill-conditioned float64 dW that drops real
    edit directions. The exact rule keeps them; the official one is still available."""
    g = torch.Generator().manual_seed(5)
    w0 = random_original(g, 60, 150, 2.0, torch.float64)
    w = w0 + random_delta(g, 60, 150, "ill-conditioned", 0, 2.0)
    reference = reference_restrained(w0, w, math.e, True)
    exact, _ = restrain_through_the_session(w0, w, "restrain_now", math.e, True)
    rel = float((exact - reference).norm() / (reference - w0).norm())
    assert rel < 1e-9

    model = one_matrix_model(w0)
    session = edit_session(model, PruneConfig(prune=True, prune_rank_rule="official"), ["weight"])
    session.begin()
    with torch.no_grad():
        model.weight.copy_(w)
    figures = session.restrain_now()["weight"]
    official_rel = float((model.weight.detach() - reference).norm() / (reference - w0).norm())
    assert figures.rank < 60 and official_rel > 1e3 * max(rel, 1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_edit_is_refused_with_a_clear_error_and_w_left_as_written(bad):
    g = torch.Generator().manual_seed(1)
    w0 = random_original(g, 20, 30, 3.0, torch.float32)
    w = (w0.double() + random_delta(g, 20, 30, "low rank", 2, 3.0)).to(torch.float32)
    w[4, 7] = bad
    model = one_matrix_model(w0)
    session = edit_session(model, PruneConfig(prune=True, prune_mode="online"), ["weight"])
    session.before_edit()
    with torch.no_grad():
        model.weight.copy_(w)
    with pytest.raises(FloatingPointError, match="weight: the edit left non-finite values"):
        session.after_edit({})
    assert torch.equal(model.weight.detach().view(torch.int32), w.view(torch.int32))  # bit patterns: NaN != NaN


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_each_restraint_of_an_online_sequence_meets_the_reference_when_it_starts_from_the_previous_basis(dtype):
    """Online mode keeps the basis each restraint captured and starts the next one from it, with only a few fresh
    random columns for what the edits since added: single directions (ROME), a batch of twelve at once (more
    than the fresh columns) and one below smax(W0). Every restraint still meets the float64 reference."""
    g = torch.Generator().manual_seed(11)
    m, n, smax0 = 160, 400, 3.0
    w0 = random_original(g, m, n, smax0, dtype)
    model = one_matrix_model(w0)
    config = PruneConfig(prune=True, prune_alpha=math.e, prune_mode="online", prune_never_enlarge=True)
    session = edit_session(model, config, ["weight"])
    directions = [1, 1, 12, 1, 1, 1]
    for step, count in enumerate(directions):
        session.before_edit()
        strength = smax0 * (0.5 if step == 4 else 2.0 + step)
        with torch.no_grad():
            edit = random_delta(g, m, n, "low rank", count, strength / 6)
            model.weight.copy_((model.weight.double() + edit).to(dtype))
        before = model.weight.detach().clone()
        figures = session.after_edit({"prompt": f"edit {step}"}).figures["weight"]
        assert figures.path == "lowrank"
        assert_meets_reference(model.weight.detach(), reference_restrained(w0, before, math.e, True), dtype)
        basis = session.bases["weight"]
        assert basis.dtype == torch.float32 and basis.shape[0] == m and basis.shape[1] >= figures.rank
    assert session.bases["weight"].shape[1] <= sum(directions) + 8  # the captured rank, not a growing block


def test_any_start_basis_gives_the_certified_result_and_a_wrong_shape_is_refused():
    """The start basis only sets where the iteration starts: a random one (nothing to do with dW) gives the
    same restrained matrix as none, to the requested accuracy, and one with the wrong number of rows is refused."""
    from prune_plugin.restraint import restrain_factors

    g = torch.Generator().manual_seed(5)
    w0 = random_original(g, 120, 300, 3.0, torch.float64)
    d = random_delta(g, 120, 300, "low rank", 6, 3.0)
    smax0 = float(torch.linalg.svdvals(w0)[0])
    reference = reference_restrained(w0, w0 + d, math.e, True) - w0

    def restrained(start):
        update, figures = restrain_factors(d, smax0, math.e, start_basis=start, accuracy=1e-10 * float(d.norm()))
        return d + (update.u * update.values) @ update.vt, figures

    unrelated = torch.linalg.qr(torch.randn(120, 10, generator=g, dtype=torch.float64))[0].float()
    for start in (None, unrelated):
        result, figures = restrained(start)
        assert figures.rank == figures.n_restrained == int((torch.linalg.svdvals(d) >= smax0).sum()) > 0
        assert float((result - reference).norm()) <= 1e-9 * float(reference.norm())
    with pytest.raises(ValueError, match="start_basis is \\(119, 10\\): it needs 120 rows"):
        restrain_factors(d, smax0, math.e, start_basis=unrelated[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
def test_values_just_above_and_just_below_smax_of_w0_are_counted_from_the_captured_block(dtype):
    """Online PRUNE leaves restrained values just above smax(W0), and an edit can leave one just below it, far
    closer than the storage rounding of W that the block cannot capture. The count is still certified from the
    block alone (s_{k+1}(dW)^2 <= s_{k+1}(B)^2 + ||dW - Q B||^2), so the restraint keeps its basis for the next one."""
    from prune_plugin.restraint import restrain_parameter

    g = torch.Generator().manual_seed(3)
    m, n = 160, 400
    w0 = random_original(g, m, n, 3.0, dtype)
    smax0 = float(torch.linalg.svdvals(w0.double())[0])
    a = torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))[0]
    values = smax0 * torch.tensor([3.0, 1 + 1e-6, 1 + 1e-7, 1 - 1e-8], dtype=torch.float64)
    w = (w0.double() + (a * values) @ b.mT).to(dtype)
    s = torch.linalg.svdvals(w.double() - w0.double())
    # closer than what the block cannot capture: W's storage rounding, and float64 round-off in ||dW||_F^2
    missed = math.hypot(float((w.double() - w0.double() - (a * values) @ b.mT).norm()), 3e-7 * float(s.norm()))
    assert float(s[3]) < smax0 <= float(s[2]) and smax0 - float(s[3]) < missed
    reference = reference_restrained(w0, w, math.e, True)
    figures, wrote = restrain_parameter(w, w0, smax0, math.e)
    assert wrote and figures.path == "lowrank" and figures.rank == figures.n_restrained == 3
    assert figures.next_basis is not None and figures.next_basis.shape == (m, 4)
    assert_meets_reference(w, reference, dtype)
