"""Telemetry's cond(W) from W0's kept Gram spectrum and a low-rank dW, against a float64 SVD of W on fresh inputs.

The estimate must be within 1e-3 relative of the exact value whenever it returns one, must return one for the
low-rank edits it is built for (well- and ill-conditioned W0, wide and tall, float32 and float64 weights), and must
decline (None: the exact route runs) where it cannot certify itself: a full-rank dW, a nearly singular W.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_plugin import condition
from prune_plugin.condition import ConditionNumbers, certified_condition_number, gram_spectrum
from prune_plugin.config import PruneConfig
from prune_plugin.plugins.telemetry import read_telemetry
from prune_plugin.plugins import edit_session


def exact_condition(w: torch.Tensor) -> float:
    s = torch.linalg.svdvals(w.detach().double())
    return float(s[0] / s[-1])


def random_original(g, m, n, kappa):
    """W0 with singular values log-spaced from 10 down to 10 / kappa (random singular vectors)."""
    p = min(m, n)
    a = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0]
    return (a * torch.logspace(1, 1 - math.log10(kappa), p, dtype=torch.float64)) @ b.mT


def low_rank_delta(g, m, n, rank, strength):
    a = torch.randn(m, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, n, generator=g, dtype=torch.float64)
    scales = strength * torch.logspace(0, -1, rank, dtype=torch.float64)
    return (a / a.norm(dim=0) * scales) @ (b / b.norm(dim=1, keepdim=True))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(120, 300), (300, 120), (200, 200)]),
    kappa=st.sampled_from([3.0, 30.0, 300.0]),
    rank=st.integers(1, 6),
    strength=st.sampled_from([0.05, 1.0, 30.0]),  # x smax(W0) / 10: below, near and far above the spectrum
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_the_estimate_is_certified_within_1e_3_of_a_float64_svd(seed, shape, kappa, rank, strength, dtype):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    w0 = random_original(g, m, n, kappa).to(dtype)
    w = (w0.double() + low_rank_delta(g, m, n, rank, strength * 10)).to(dtype)
    estimate, basis = certified_condition_number(w, w0, gram_spectrum(w0))
    s = torch.linalg.svdvals(w.double())
    exact = float(s[0] / s[-1])
    # It must certify when W is well conditioned and W's own rounding (full rank: no low-rank basis holds it) is
    # far below smin(W); beyond that it may decline, never be wrong.
    rounding = torch.finfo(dtype).eps * float(w.double().norm())
    if exact <= 1e3 and rounding <= 1e-5 * float(s[-1]):
        assert estimate is not None, f"no certificate (exact cond {exact:.4g})"
        assert basis.rank == rank  # dW's rank, its float32 rounding left out
    if estimate is not None:
        assert math.isfinite(estimate)
        assert abs(estimate / exact - 1) <= 1e-3


@pytest.mark.parametrize("transposed", [False, True], ids=["wide", "tall"])
def test_an_unedited_matrix_gives_cond_of_w0(transposed):
    g = torch.Generator().manual_seed(3)
    w0 = random_original(g, 80, 150, 20.0).float()
    w0 = w0.mT.contiguous() if transposed else w0
    estimate, basis = certified_condition_number(w0.clone(), w0, gram_spectrum(w0))
    assert basis.rank == 0
    assert estimate == pytest.approx(exact_condition(w0), rel=1e-3)


def test_a_full_rank_edit_is_left_to_the_exact_route(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w0 = random_original(g, 300, 500, 10.0).float()
    w = (w0.double() + 0.3 * torch.randn(300, 500, generator=g, dtype=torch.float64) / math.sqrt(500)).float()
    estimate, basis = certified_condition_number(w, w0, gram_spectrum(w0))
    assert estimate is None and basis is None
    numbers = ConditionNumbers(min_elements=1)
    tried = []
    monkeypatch.setattr(condition, "certified_condition_number",
                        lambda *a, **k: tried.append(1) or certified_condition_number(*a, **k))
    for _ in range(2):  # the second call knows the matrix's edits are dense and goes straight to the exact route
        assert numbers.get("w", w, w0) == pytest.approx(exact_condition(w), rel=1e-6)
    assert (numbers.estimated, numbers.exact, len(tried)) == (0, 2, 1)


def test_a_nearly_singular_edited_matrix_is_left_to_the_exact_route():
    g = torch.Generator().manual_seed(5)
    w0 = random_original(g, 100, 240, 5.0)
    u, s, vt = torch.linalg.svd(w0, full_matrices=False)
    w = w0 - s[-1] * (1 - 1e-9) * torch.outer(u[:, -1], vt[-1])  # rank one edit that nearly kills smin
    estimate, _ = certified_condition_number(w, w0, gram_spectrum(w0))
    assert estimate is None
    assert ConditionNumbers(min_elements=1).get("w", w, w0) == pytest.approx(exact_condition(w), rel=1e-4)


def test_non_finite_weights_are_a_clear_error():
    w0 = torch.eye(40, 60)
    w = w0.clone()
    w[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        ConditionNumbers(min_elements=1).get("w", w, w0)


def test_the_kept_spectrum_is_one_gram_eigendecomposition_per_matrix():
    g = torch.Generator().manual_seed(6)
    w0 = random_original(g, 64, 128, 10.0).float()
    numbers = ConditionNumbers(min_elements=1)
    for i in range(3):
        w = (w0.double() + low_rank_delta(g, 64, 128, i + 1, 5.0)).float()
        assert numbers.get("w", w, w0) == pytest.approx(exact_condition(w), rel=1e-3)
    assert numbers.estimated == 3
    rank = numbers.basis("w").rank  # and what the last estimate learned of dW: Q, R, V0^T Q, V0^T W0 R
    assert rank == 3 and numbers.nbytes() == 8 * (64 * 64 + 64) + 8 * (3 * 64 + 128) * rank


def test_a_spectrum_kept_anew_drops_what_was_learned_in_the_old_eigenbasis():
    """The same Gram matrix with another valid eigenbasis (signs flipped, as another device's eigh may give):
    the V0^T products an earlier estimate kept belong to the old basis, so they go, and the value stays right."""
    g = torch.Generator().manual_seed(14)
    w0 = random_original(g, 100, 220, 10.0).float()
    spectrum = gram_spectrum(w0)
    numbers = ConditionNumbers(min_elements=1)
    numbers.keep_spectrum("w", spectrum)
    w = (w0.double() + low_rank_delta(g, 100, 220, 1, 8.0)).float()
    assert numbers.get("w", w, w0) == pytest.approx(exact_condition(w), rel=1e-3)
    signs = torch.where(torch.rand(100, generator=g) < 0.5, -1.0, 1.0).double()
    numbers.keep_spectrum("w", condition.GramSpectrum(spectrum.values, spectrum.vectors * signs,
                                                      spectrum.transposed, spectrum.error))
    assert numbers.basis("w") is None
    w = (w.double() + low_rank_delta(g, 100, 220, 1, 8.0)).float()
    assert numbers.get("w", w, w0) == pytest.approx(exact_condition(w), rel=1e-3)


def test_a_previous_basis_starts_the_next_estimate():
    """The restrained dW, and the next edit on top of it, mostly lie in the basis the last call found."""
    g = torch.Generator().manual_seed(8)
    w0 = random_original(g, 100, 220, 10.0).float()
    spectrum = gram_spectrum(w0)
    w = (w0.double() + low_rank_delta(g, 100, 220, 3, 8.0)).float()
    _, basis = certified_condition_number(w, w0, spectrum)
    w_next = (w.double() + low_rank_delta(g, 100, 220, 1, 8.0)).float()
    estimate, grown = certified_condition_number(w_next, w0, spectrum, basis=basis)
    assert estimate == pytest.approx(exact_condition(w_next), rel=1e-3)
    assert grown.rank == 4
    same, kept = certified_condition_number(w_next, w0, spectrum, basis=grown)
    assert same == pytest.approx(exact_condition(w_next), rel=1e-3) and kept.rank == 4


def test_along_a_sequence_only_the_change_in_r_costs_products_with_w0(monkeypatch):
    """Each estimate hands the next what it learned of dW: a rank-one edit then costs a one-column product with W0,
    a restraint one of the restrained count, and every value stays within 1e-3 of a float64 SVD; with too much
    round-off carried (drift), the products are formed afresh from the whole R."""
    import dataclasses

    from prune_plugin.restraint import restrain_parameter

    g = torch.Generator().manual_seed(9)
    w0 = random_original(g, 100, 220, 10.0).float()
    spectrum = gram_spectrum(w0)
    smax0 = float(torch.linalg.svdvals(w0.double())[0])
    widths = []
    times = condition._times
    monkeypatch.setattr(condition, "_times", lambda o, r, t: widths.append(r.shape[1]) or times(o, r, t))
    w, state = w0.clone(), None
    for step in range(6):
        w = (w.double() + low_rank_delta(g, 100, 220, 1, 3 * smax0)).float()
        estimate, state = certified_condition_number(w, w0, spectrum, basis=state)
        assert estimate == pytest.approx(exact_condition(w), rel=1e-3) and widths[-1] == 1
        figures, wrote = restrain_parameter(w, w0, smax0, math.e)
        assert wrote and figures.n_restrained > 0
        estimate, state = certified_condition_number(w, w0, spectrum, basis=state)
        assert estimate == pytest.approx(exact_condition(w), rel=1e-3) and widths[-1] == figures.n_restrained
    assert state.updates == 12 and 0 < state.drift
    estimate, fresh = certified_condition_number(w, w0, spectrum, basis=dataclasses.replace(state, drift=1.0))
    assert estimate == pytest.approx(exact_condition(w), rel=1e-3)
    assert widths[-1] == fresh.rank == state.rank and fresh.updates == 1 and fresh.drift == 0.0


def test_telemetry_condition_numbers_through_the_session(tmp_path, monkeypatch):
    """Online PRUNE with telemetry: cond before/after each restraint from the estimate, equal to a float64 SVD of
    the matrix as it was then; the restrained weights are bit-identical to a run without condition numbers."""
    monkeypatch.setattr(condition, "_ESTIMATE_MIN", 1)  # the tiny test matrix takes the route large ones take
    from_factors = []
    after_update = condition.condition_after_update
    monkeypatch.setattr(condition, "condition_after_update",
                        lambda *a, **k: from_factors.append(1) or after_update(*a, **k))
    first_looks = []
    from_captured = condition._from_captured
    monkeypatch.setattr(condition, "_from_captured", lambda *a: first_looks.append(1) or from_captured(*a))
    g = torch.Generator().manual_seed(7)
    w0 = random_original(g, 96, 160, 8.0).float()
    edits = [low_rank_delta(g, 96, 160, 1, 40.0).float() for _ in range(3)]
    results = {}
    for with_cond in (True, False):
        model = torch.nn.Linear(160, 96, bias=False)
        with torch.no_grad():
            model.weight.copy_(w0)
        path = tmp_path / f"{with_cond}.jsonl"
        config = PruneConfig(prune=True, prune_mode="online", prune_telemetry=str(path),
                             prune_telemetry_condition=with_cond)
        session = edit_session(model, config, ["weight"])
        before = []
        for edit in edits:
            session.before_edit()
            with torch.no_grad():
                model.weight += edit
            before.append(exact_condition(model.weight))
            session.after_edit({})
        session.end()
        results[with_cond] = model.weight.detach().clone()
        if with_cond:
            figures = [r["figures"][0] for r in read_telemetry(path) if r["event"] == "edit"]
            assert [f["cond_before"] for f in figures] == pytest.approx(before, rel=1e-3)
            assert figures[-1]["cond_after"] == pytest.approx(exact_condition(model.weight), rel=1e-3)
            assert session.conditions.estimated == 6 and session.conditions.exact == 0
            assert len(from_factors) == 3  # every 'after' from the restraint's factors, no pass over dW
            assert len(first_looks) == 1  # the first 'before' from what the restraint's block captured
    assert torch.equal(results[True], results[False])


@pytest.mark.parametrize("shape", [(100, 220), (220, 100)], ids=["wide", "tall"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rule", ["exact", "official"])
def test_cond_after_a_restraint_comes_from_its_factors_without_a_pass(shape, dtype, rule, monkeypatch):
    """Right after a restraint, cond(W) comes from what the estimate before it learned and the factors the
    restraint wrote (no new pass over dW: delta_of is not called), within 1e-3 of a float64 SVD."""
    from prune_plugin.restraint import restrain_parameter

    g = torch.Generator().manual_seed(12)
    m, n = shape
    w0 = random_original(g, m, n, 10.0).to(dtype)
    spectrum = gram_spectrum(w0)
    smax0 = float(torch.linalg.svdvals(w0.double())[0])
    w = (w0.double() + low_rank_delta(g, m, n, 4, 3 * smax0)).to(dtype)
    before, state = certified_condition_number(w, w0, spectrum)
    assert before == pytest.approx(exact_condition(w), rel=1e-3)
    figures, wrote = restrain_parameter(w, w0, smax0, math.e, rank_rule=rule)
    assert wrote and figures.written is not None
    monkeypatch.setattr(condition, "delta_of", lambda *a: pytest.fail("dW formed again"))
    after, learned = condition.condition_after_update(w, w0, spectrum, state, figures.written)
    assert after == pytest.approx(exact_condition(w), rel=1e-3) and after < before
    assert learned.rank == state.rank and learned.missed >= state.missed * (rule == "exact")


@pytest.mark.parametrize("shape", [(100, 220), (220, 100)], ids=["wide", "tall"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rank", [1, 5])
def test_a_first_look_starts_from_what_the_restraint_captured_without_a_range_finder(shape, dtype, rank,
                                                                                     monkeypatch):
    """The restraint's block already holds dW (Restraint.captured, asked for with `capture`): telemetry's first
    cond(W) of the matrix takes Q and R from it, with no range finder of its own, within 1e-3 of a float64 SVD and
    of the estimate that runs its own range finder; the restraint itself is the same with or without capture."""
    from prune_plugin.restraint import delta_of, plan_restraint

    g = torch.Generator().manual_seed(13 + rank)
    m, n = shape
    w0 = random_original(g, m, n, 10.0).to(dtype)
    spectrum = gram_spectrum(w0)
    smax0 = float(torch.linalg.svdvals(w0.double())[0])
    w = (w0.double() + low_rank_delta(g, m, n, rank, 3 * smax0)).to(dtype)
    delta = delta_of(w, w0)
    update, figures = plan_restraint(w, w0, smax0, math.e, delta=delta, capture=True)
    plain_update, plain = plan_restraint(w, w0, smax0, math.e, delta=delta)
    assert plain.captured is None and figures.captured is not None
    assert torch.equal(update.u, plain_update.u) and torch.equal(update.values, plain_update.values)
    own, _ = certified_condition_number(w, w0, spectrum, delta=delta)
    monkeypatch.setattr(condition, "_orthonormal_beside", lambda *a: pytest.fail("the range finder ran"))
    first, learned = certified_condition_number(w, w0, spectrum, delta=delta, captured=figures.captured)
    assert first == pytest.approx(exact_condition(w), rel=1e-3) and first == pytest.approx(own, rel=2e-3)
    assert learned.rank >= rank and learned.updates == 1  # its products formed afresh, kept for the next edit


def test_captured_factors_that_do_not_fit_the_matrix_are_a_clear_error():
    from prune_plugin.restraint import CapturedDelta

    g = torch.Generator().manual_seed(2)
    w0 = random_original(g, 60, 90, 5.0)
    w = w0 + low_rank_delta(g, 60, 90, 1, 20.0)
    wrong = CapturedDelta(torch.zeros(90, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                          torch.zeros(60, 1, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="captured factors"):
        certified_condition_number(w, w0, gram_spectrum(w0), captured=wrong)


def test_the_lanczos_guess_of_the_largest_eigenvalue_is_a_lower_bound_within_1e_4():
    """lambda_max of L0 + U diag(c) U^T is guessed by cheap Lanczos steps (the inertia counts then certify a
    bracket of +-1e-4 around the guess): a Ritz value never exceeds it, and here it is within 1e-4."""
    g = torch.Generator().manual_seed(13)
    values = torch.linspace(0.5, 100.0, 300, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(300, 6, generator=g, dtype=torch.float64))[0]
    c = torch.tensor([400.0, 50.0, 3.0, -2.0, -20.0, -90.0], dtype=torch.float64)
    exact = float(torch.linalg.eigvalsh(torch.diag(values) + (u * c) @ u.mT)[-1])
    guess = condition._top_ritz(values, u, c)
    assert guess <= exact * (1 + 1e-12) and guess >= exact * (1 - 1e-4)
