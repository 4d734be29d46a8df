"""PRUNE's restraint: F itself, and the fast paths of both rank rules against float64 dense-SVD references
(the exact rule: the whole spectrum; the official rule: numpy's float32 rank truncation, literally)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_plugin.restraint import (
    OFFICIAL_BASES,
    parse_alpha,
    official_rank_tolerance,
    parse_rank_rule,
    restrain_delta,
    restrain_dense_reference,
    restrain_parameter,
    restrain_values,
)
from prune_plugin.spectrum import SmaxCache, condition_number, largest_singular_value

ALPHAS = [math.e, 2.0, 1.5, 1.2, "linear", 3.7]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_case(seed: int, m: int, n: int, rank: int, strength: float, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)).to(dtype)
    update = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    w = (w0.double() + strength * update / math.sqrt(rank)).to(dtype)
    return w0, w


class TestF:
    def test_values_below_smax_of_w0_are_left_alone(self):
        s = torch.tensor([0.5, 0.99], dtype=torch.float64)
        out, n, _ = restrain_values(s, 1.0, math.e)
        assert torch.equal(out, s) and n == 0

    def test_log_base_formula_matches_the_paper(self):
        s = torch.tensor([40.0, 10.0], dtype=torch.float64)
        out, n, _ = restrain_values(s, 8.0, 2.0, never_enlarge=False)
        expected = [math.log(40, 2) - math.log(8, 2) + 8, math.log(10, 2) - math.log(8, 2) + 8]
        assert n == 2 and out.tolist() == pytest.approx(expected, rel=1e-15)

    def test_linear_variant_halves_the_excess(self):
        out, _, _ = restrain_values(torch.tensor([30.0], dtype=torch.float64), 10.0, "linear")
        assert out.item() == pytest.approx(20.0)

    def test_f_is_continuous_at_the_threshold(self):
        out, _, _ = restrain_values(torch.tensor([7.0], dtype=torch.float64), 7.0, 1.2)
        assert out.item() == pytest.approx(7.0)

    def test_small_smax_with_base_1_2_would_enlarge_and_the_guard_prevents_it(self):
        # smax(W0) = 2 < 1/ln(1.2) = 5.48: F(3) = log_1.2(1.5) + 2 = 4.22 > 3
        s = torch.tensor([3.0], dtype=torch.float64)
        official, _, _ = restrain_values(s, 2.0, 1.2, never_enlarge=False)
        guarded, n, n_guarded = restrain_values(s, 2.0, 1.2, never_enlarge=True)
        assert official.item() > 3.0
        assert guarded.item() == 3.0 and n == 1 and n_guarded == 1

    @pytest.mark.parametrize("text,value", [("e", math.e), ("2", 2.0), ("1.5", 1.5), ("1.2", 1.2), ("linear", "linear"), (3, 3.0)])
    def test_alpha_accepts_the_official_names(self, text, value):
        assert parse_alpha(text) == value

    @pytest.mark.parametrize("bad", [1, 0.5, -2, "ln", float("nan"), True, None])
    def test_alpha_must_be_a_base_above_one(self, bad):
        with pytest.raises(ValueError):
            parse_alpha(bad)

    def test_official_bases_are_all_offered(self):
        assert set(OFFICIAL_BASES) == {"e", "2", "1.5", "1.2"}


class TestFastPathEqualsDenseReference:
    @settings(max_examples=25, deadline=None)
    @given(
        seed=st.integers(0, 10_000),
        m=st.integers(8, 80),
        n=st.integers(8, 120),
        rank=st.integers(1, 12),
        strength=st.floats(0.5, 30.0),
        alpha=st.sampled_from(ALPHAS),
        never_enlarge=st.booleans(),
        rule=st.sampled_from(["exact", "official"]),
    )
    def test_low_rank_updates(self, seed, m, n, rank, strength, alpha, never_enlarge, rule):
        w0, w = make_case(seed, m, n, min(rank, m, n), strength)
        smax0 = largest_singular_value(w0)
        delta = w - w0
        fast, _ = restrain_delta(delta, smax0, alpha, never_enlarge=never_enlarge, rank_rule=rule)
        reference = restrain_dense_reference(delta, smax0, alpha, never_enlarge=never_enlarge, rank_rule=rule)
        assert relative_error(delta.double() if fast is None else fast, reference) < 1e-5

    @settings(max_examples=10, deadline=None)
    @given(seed=st.integers(0, 10_000), m=st.integers(8, 60), n=st.integers(8, 60), alpha=st.sampled_from(ALPHAS))
    def test_full_rank_updates_official_rule(self, seed, m, n, alpha):
        w0, w = make_case(seed, m, n, min(m, n), 5.0)
        smax0 = largest_singular_value(w0)
        fast, info = restrain_delta(w - w0, smax0, alpha, rank_rule="official")
        reference = restrain_dense_reference(w - w0, smax0, alpha, never_enlarge=True)
        s = torch.linalg.svdvals((w - w0).double())  # numpy's rank rule: a square one can drop its smallest value
        assert info.rank == int((s > s[0] * max(m, n) * torch.finfo(torch.float32).eps).sum()) >= min(m, n) - 1
        assert relative_error(fast, reference) < 1e-5

    def test_embedded_model_shape_rank_ten_takes_the_sketch(self):
        w0, w = make_case(7, 576, 1536, 10, 8.0)
        smax0 = largest_singular_value(w0)
        for rule in ("exact", "official"):
            fast, info = restrain_delta(w - w0, smax0, 1.2, never_enlarge=False, rank_rule=rule)
            reference = restrain_dense_reference(w - w0, smax0, 1.2, rank_rule=rule)
            s = torch.linalg.svdvals((w - w0).double())
            assert info.path == "lowrank" and info.n_restrained == int((s >= smax0).sum()) > 0
            assert info.rank == (10 if rule == "official" else info.n_restrained)  # exact: only what F changes
            assert relative_error(fast, reference) < 1e-7

    def test_official_rank_truncation_drops_directions_below_numpys_tolerance(self):
        w0, w = make_case(3, 40, 70, 3, 10.0, dtype=torch.float64)
        g = torch.Generator().manual_seed(1)
        tiny = 1e-8 * torch.randn(40, 70, generator=g, dtype=torch.float64)  # far below s0 * max(m,n) * eps32
        delta = (w - w0) + tiny
        smax0 = largest_singular_value(w0)
        official, info = restrain_delta(delta, smax0, math.e, rank_rule="official", storage_dtype=torch.float64)
        assert info.rank == 3 and torch.linalg.matrix_rank(official).item() == 3
        assert relative_error(official, restrain_dense_reference(delta, smax0, math.e, never_enlarge=True)) < 1e-5
        # The exact rule keeps them: outside the restrained directions dW is left exactly as it is.
        exact, _ = restrain_delta(delta, smax0, math.e, storage_dtype=torch.float64)
        u, _, vt = torch.linalg.svd(delta)
        outside_u, outside_v = u[:, 3:] @ u[:, 3:].mT, vt[3:].mT @ vt[3:]
        assert relative_error(outside_u @ (exact - official) @ outside_v, outside_u @ tiny @ outside_v) < 1e-3

    def test_nothing_reaching_smax_leaves_the_matrix_alone(self):
        w0, w = make_case(5, 30, 50, 2, 0.01)
        for rule, rank in (("official", 2), ("exact", 0)):
            result, info = restrain_delta(w - w0, largest_singular_value(w0), math.e, rank_rule=rule)
            assert result is None and info.n_restrained == 0 and info.rank == rank

    def test_zero_update_is_a_no_op(self):
        result, info = restrain_delta(torch.zeros(5, 7), 1.0, 2.0)
        assert result is None and info.path == "zero"

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_input_is_a_clear_floating_point_error(self, bad):
        delta = torch.ones(6, 9)
        delta[2, 3] = bad
        with pytest.raises(FloatingPointError, match="non-finite values"):
            restrain_delta(delta, 1.0, math.e)
        w0 = torch.zeros(6, 9)
        weight = delta.clone()
        with pytest.raises(FloatingPointError, match="non-finite values"):
            restrain_parameter(weight, w0, 1.0, math.e)
        assert torch.equal(weight.view(torch.int32), delta.view(torch.int32))  # left as it was

    @pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
    def test_the_threshold_must_be_a_finite_positive_smax(self, bad):
        with pytest.raises(ValueError, match="smax"):
            restrain_delta(torch.ones(4, 5), bad, math.e)

    def test_restrained_spectrum_is_bounded_by_f_of_the_unrestrained_one(self):
        w0, w = make_case(11, 64, 96, 4, 20.0)
        smax0 = largest_singular_value(w0)
        restrained, info = restrain_delta(w - w0, smax0, 2.0)
        bound = restrain_values(torch.tensor([info.smax_delta], dtype=torch.float64), smax0, 2.0)[0].item()
        assert torch.linalg.svdvals(restrained)[0].item() <= max(bound, smax0) + 1e-9


class TestSpectrum:
    def test_largest_singular_value_matches_svd(self):
        w = torch.randn(50, 80, dtype=torch.float64)
        assert largest_singular_value(w) == pytest.approx(torch.linalg.svdvals(w)[0].item(), rel=1e-12)

    def test_large_matrices_go_through_the_gram_matrix_and_agree(self, monkeypatch):
        import prune_plugin.spectrum as spectrum

        w = torch.randn(60, 90, dtype=torch.float32)
        monkeypatch.setattr(spectrum, "_DENSE_LIMIT", 10)
        exact = torch.linalg.svdvals(w.double())[0].item()
        assert spectrum.largest_singular_value_dense(w) == pytest.approx(exact, rel=1e-10)

    @settings(max_examples=15, deadline=None)
    @given(seed=st.integers(0, 2**31 - 1), m=st.integers(20, 150), n=st.integers(20, 150),
           spikes=st.integers(0, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    def test_the_certified_krylov_smax_is_within_1e_minus_6(self, seed, m, n, spikes, dtype):
        from prune_plugin.spectrum import certified_largest_singular_value

        g = torch.Generator().manual_seed(seed)
        w = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        for i in range(spikes):  # outliers above the bulk, as trained weights have
            w += (3 - 0.4 * i) * torch.outer(torch.randn(m, generator=g, dtype=torch.float64) / math.sqrt(m),
                                             torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n))
        w = w.to(dtype)
        exact = torch.linalg.svdvals(w.double())[0].item()
        estimate = certified_largest_singular_value(w)
        if estimate is not None:  # when it answers, it is right
            assert abs(estimate - exact) <= 1e-6 * exact
        assert largest_singular_value(w) == pytest.approx(exact, rel=1e-6)

    def test_a_separated_top_value_is_certified(self):
        from prune_plugin.spectrum import certified_largest_singular_value

        g = torch.Generator().manual_seed(4)
        w = torch.randn(120, 300, generator=g, dtype=torch.float64) / math.sqrt(300)  # bulk edge about 1.6
        w += 5 * torch.outer(torch.randn(120, generator=g, dtype=torch.float64) / math.sqrt(120),
                             torch.randn(300, generator=g, dtype=torch.float64) / math.sqrt(300))
        estimate = certified_largest_singular_value(w.float())
        assert estimate is not None
        assert estimate == pytest.approx(torch.linalg.svdvals(w.float().double())[0].item(), rel=1e-6)

    @staticmethod
    def _certified(w: torch.Tensor) -> float:
        """The certified estimate of smax(w), asserted to exist and to lie within 1e-6 of float64 svdvals."""
        from prune_plugin.spectrum import certified_largest_singular_value

        exact = torch.linalg.svdvals(w.double())[0].item()
        estimate = certified_largest_singular_value(w)
        assert estimate is not None and abs(estimate - exact) <= 1e-6 * exact
        return estimate

    @staticmethod
    def _without_the_dense_route(w: torch.Tensor, monkeypatch) -> float:
        """largest_singular_value(w) with the Krylov route taken first and the dense one failing the test."""
        import prune_plugin.spectrum as spectrum

        monkeypatch.setattr(spectrum, "_KRYLOV_MIN", 10)
        monkeypatch.setattr(spectrum, "largest_singular_value_dense",
                            lambda _: pytest.fail("the dense route ran although the estimate certified"))
        return spectrum.largest_singular_value(w)

    @pytest.mark.parametrize("transposed", [False, True], ids=["wide", "tall"])
    def test_a_top_value_close_to_the_next_ones_is_certified_from_the_krylov_block(self, transposed, monkeypatch):
        """A trained down-projection's shape: four outliers (the second at 0.9 of the first) above a Gaussian bulk.
        The certificate deflates the outliers before bounding the rest; the dense route is never needed."""
        g = torch.Generator().manual_seed(11)
        m, n = 150, 400
        w = torch.randn(m, n, generator=g, dtype=torch.float64) * (5.0 / (math.sqrt(m) + math.sqrt(n)))
        for strength in (10.0, 9.0, 8.0, 7.0):
            w += strength * torch.outer(torch.randn(m, generator=g, dtype=torch.float64) / math.sqrt(m),
                                        torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n))
        w = (w.mT.contiguous() if transposed else w).float()
        assert self._without_the_dense_route(w, monkeypatch) == self._certified(w)

    @staticmethod
    def _matrix(values: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """A len(values) x n matrix (n >= len(values)) with exactly these singular values."""
        g = torch.Generator().manual_seed(seed)
        left, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(n, len(values), generator=g, dtype=torch.float64))
        return (left * values) @ right.mT

    @pytest.mark.parametrize("degree", [1, 2, 5, 6])
    @pytest.mark.parametrize("edge", [0.2, 1.0, 3.0], ids=["edge below the top", "edge at the bulk", "edge above"])
    @pytest.mark.parametrize("shape", ["wide", "tall"])
    def test_the_chebyshev_singular_bound_holds_whatever_the_edge(self, edge, degree, shape):
        """Outlying singular values above a bulk in [0, 1], odd and even degrees, X wide or tall: every edge gives
        an upper bound on ||X|| (it fails with probability 2.3e-10), over fresh probes and matrices."""
        from prune_plugin.spectrum import chebyshev_singular_bound

        for seed in range(20):
            g = torch.Generator().manual_seed(seed)
            values = torch.cat([torch.rand(146, generator=g, dtype=torch.float64),
                                torch.tensor([1.05, 1.2, 1.3, 2.0], dtype=torch.float64)[:seed % 5]])
            x = self._matrix(values, 230, seed)  # maps R^230 -> R^len(values)
            if shape == "tall":
                x = x.mT
            probes = torch.randn(x.shape[1], 16, generator=g, dtype=torch.float64)
            bound = chebyshev_singular_bound(lambda v: x @ v, lambda v: x.mT @ v, probes, edge, degree)
            assert bound >= float(values.max())

    @pytest.mark.parametrize("degree", [2, 5, 8])
    def test_the_chebyshev_singular_bound_is_within_its_reach_when_the_edge_covers_the_spectrum(self, degree):
        """With every singular value below the edge the filter lengthens no probe, so the bound stays within the
        reach the smax plan predicts from (spectrum._chebyshev_reach, in squared values), and it tightens with the
        degree."""
        import prune_plugin.spectrum as spectrum

        g = torch.Generator().manual_seed(degree)
        values = torch.rand(300, generator=g, dtype=torch.float64) * 0.9
        values[0] = 1.0
        x = self._matrix(values, 450, degree)
        probes = torch.randn(450, 16, generator=g, dtype=torch.float64)
        bound = spectrum.chebyshev_singular_bound(lambda v: x @ v, lambda v: x.mT @ v, probes, 1.0, degree)
        assert 1.0 <= bound ** 2 <= spectrum._chebyshev_reach(degree, 450)
        assert spectrum._chebyshev_reach(degree + 1, 450) < spectrum._chebyshev_reach(degree, 450)

    def test_the_chebyshev_singular_bound_can_start_from_products_the_caller_has(self):
        """`first` (X G, then X^T X G / edge) replaces the first two products and changes nothing else."""
        from prune_plugin.spectrum import chebyshev_singular_bound

        g = torch.Generator().manual_seed(2)
        x = self._matrix(torch.rand(60, generator=g, dtype=torch.float64) + 0.5, 90, 2)
        probes = torch.randn(90, 16, generator=g, dtype=torch.float64)
        calls = []

        def times_x(v):
            calls.append("X")
            return x @ v

        def times_xt(v):
            calls.append("X^T")
            return x.mT @ v

        plain = chebyshev_singular_bound(times_x, times_xt, probes, 1.2, 5)
        assert calls == ["X", "X^T", "X", "X^T", "X"]
        calls.clear()
        first = (x @ probes, x.mT @ (x @ probes) / 1.2)
        assert chebyshev_singular_bound(times_x, times_xt, probes, 1.2, 5, first=first) == \
            pytest.approx(plain, rel=1e-12)
        assert calls == ["X", "X^T", "X"]

    @pytest.mark.parametrize("enough", [0.0, math.inf], ids=["every reading", "the first reading"])
    @pytest.mark.parametrize("top", ["dominant", "flat", "zero"])
    def test_the_deflated_norm_bound_holds_over_fresh_matrices(self, top, enough):
        """restraint.deflated_norm_bound bounds ||(I - U U^T) d (I - V V^T)||_2 from above whichever reading it
        stops at (q = 3 when anything is enough, else the lowest of q = 3, 6, 10), and lies within the excess its
        docstring states for a dominant top value."""
        from prune_plugin.restraint import deflated_norm_bound

        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            values = torch.rand(60, generator=g, dtype=torch.float64)
            if top == "dominant":
                values[0] = 3.0
            elif top == "flat":
                values[:8] = 1.0
            else:
                values[:] = 0.0
            d = self._matrix(values, 150, seed)
            u, _, vt = torch.linalg.svd(d + 0.1 * torch.randn(60, 150, generator=g, dtype=torch.float64),
                                        full_matrices=False)
            u, vt = u[:, :5], vt[:5]  # deflate by directions near, not at, d's own
            e = d - u @ (u.mT @ d)
            e = e - (e @ vt.mT) @ vt
            exact = float(torch.linalg.matrix_norm(e, ord=2))
            bound = deflated_norm_bound(d, u, vt, g, enough=enough)
            assert bound >= exact
            if top == "dominant":
                assert bound <= exact * (1.5 if enough == math.inf else 1.2)

    @pytest.mark.parametrize("scale", [1e-156, 1e150])
    def test_the_deflated_norm_bound_holds_at_the_ends_of_float64(self, scale):
        """Float64 deltas of 1e150 or 1e-156 (the public API takes them): the power iteration's products are
        normalised after each half-step and its norms taken without squaring overflow, so the bound stays finite
        and above ||E|| (found in review: at 1e150 eigvalsh raised on NaN; near 1e-156 the iterates fell into
        subnormals and the bound came out low)."""
        from prune_plugin.restraint import deflated_norm_bound

        g = torch.Generator().manual_seed(3)
        d = self._matrix(torch.rand(50, generator=g, dtype=torch.float64) + 0.5, 120, 3) * scale
        u, _, vt = torch.linalg.svd(d, full_matrices=False)
        u, vt = u[:, :40], vt[:40]
        e = d - u @ (u.mT @ d)
        e = e - (e @ vt.mT) @ vt
        exact = float(torch.linalg.matrix_norm(e / scale, ord=2)) * scale
        for enough in (0.0, math.inf):
            bound = deflated_norm_bound(d, u, vt, g, enough=enough)
            assert math.isfinite(bound) and bound >= exact

    def test_the_deflated_norm_bound_stops_at_the_first_reading_below_enough(self, monkeypatch):
        """Three power steps (q = 3; two passes over d each) when the first reading is already below `enough`,
        ten when none is."""
        import prune_plugin.restraint as restraint

        g = torch.Generator().manual_seed(0)
        d = self._matrix(torch.rand(40, generator=g, dtype=torch.float64), 90, 0)
        none = torch.zeros(40, 0, dtype=torch.float64), torch.zeros(0, 90, dtype=torch.float64)
        passes = []
        real = restraint._apply_right
        monkeypatch.setattr(restraint, "_apply_right", lambda *a: passes.append(1) or real(*a))
        restraint.deflated_norm_bound(d, *none, g, enough=math.inf)
        assert len(passes) == 3
        passes.clear()
        restraint.deflated_norm_bound(d, *none, g, enough=0.0)
        assert len(passes) == 10

    @pytest.mark.parametrize("failure", [1e-1, 1e-3, 2.3e-10])
    def test_the_gaussian_norm_floor_is_a_chi_square_quantile_bound(self, failure):
        """P(chi2_r <= floor^2) <= failure, checked against the closed forms for 2 and 4 degrees of freedom, and
        not far below it (the bound drops only the density's exp(-x/2) factor)."""
        from prune_plugin.restraint import gaussian_norm_floor

        t2 = gaussian_norm_floor(2, failure) ** 2
        t4 = gaussian_norm_floor(4, failure) ** 2
        cdf2 = -math.expm1(-t2 / 2)
        cdf4 = -math.expm1(-t4 / 2) - t4 / 2 * math.exp(-t4 / 2)
        for cdf in (cdf2, cdf4):
            assert 0.5 * failure <= cdf <= failure * (1 + 1e-9)  # the slack: the closed forms' own rounding
        assert gaussian_norm_floor(16, failure) > gaussian_norm_floor(8, failure) > math.sqrt(t4)
        with pytest.raises(ValueError, match="probes >= 1"):
            gaussian_norm_floor(0, failure)

    def test_the_smax_certificate_rests_on_float64_products_not_on_the_search(self):
        """_certify_top recomputes everything it claims from the stored W: exact top vectors certify; vectors a
        float32 search could have got wrong (here slightly rotated) are refused, not trusted."""
        import prune_plugin.spectrum as spectrum

        g = torch.Generator().manual_seed(5)
        w = torch.randn(80, 200, generator=g, dtype=torch.float64) * (1 / (math.sqrt(80) + math.sqrt(200)))
        w += 4 * torch.outer(torch.randn(80, generator=g, dtype=torch.float64) / math.sqrt(80),
                             torch.randn(200, generator=g, dtype=torch.float64) / math.sqrt(200))
        u, s, _ = torch.linalg.svd(w)
        exact = float(s[0])
        edge = float(s[1]) ** 2
        good = spectrum._certify_top(w, False, u[:, :1].float(), edge, 4, 1e-6, g)
        assert good is not None and abs(good - exact) <= 1e-6 * exact
        rotated = u[:, :1] + 3e-3 * u[:, 1:2]
        assert spectrum._certify_top(w, False, rotated.float(), edge, 4, 1e-6, g) is None
        assert spectrum._certify_top(w.mT.contiguous(), True, u[:, :1].float(), edge, 4, 1e-6, g) == \
            pytest.approx(exact, rel=1e-12)  # a tall stored W: the same products, transposed

    @pytest.mark.parametrize("scale", [1e-25, 1e25])
    def test_values_far_beyond_float32_squares_are_searched_on_a_rescaled_copy(self, scale, monkeypatch):
        """The search runs in float32, where smax^2 of entries of 1e25 overflows and of 1e-25 underflows: it
        searches on W times a power of two (exact) and certifies from the stored values, without the dense route
        (stop 19 declined there; a W scaled to 1e-20 went to the dense route)."""
        w = self._spiked(40, 60, 3) * scale
        assert self._without_the_dense_route(w, monkeypatch) == self._certified(w)

    def test_non_finite_or_float32_overflowing_values_leave_the_search_to_the_dense_route(self, monkeypatch):
        """Entries beyond float32's range (1e300 stored in float64) or NaN: the search declines (None) instead of
        failing, and largest_singular_value still gives the float64 value of the finite matrix."""
        import prune_plugin.spectrum as spectrum

        w = torch.randn(40, 60, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e300
        assert spectrum.certified_largest_singular_value(w) is None
        monkeypatch.setattr(spectrum, "_KRYLOV_MIN", 10)
        assert spectrum.largest_singular_value(w) == pytest.approx(torch.linalg.svdvals(w)[0].item(), rel=1e-12)
        w[3, 4] = float("nan")
        assert spectrum.certified_largest_singular_value(w) is None

    def test_a_flat_top_spectrum_cannot_be_certified_and_falls_back_to_the_exact_value(self, monkeypatch):
        import prune_plugin.spectrum as spectrum

        q, _ = torch.linalg.qr(torch.randn(200, 80, dtype=torch.float64))
        w = 2.5 * q.mT  # all 80 singular values equal: no gap for any bound to prove
        assert spectrum.certified_largest_singular_value(w) is None
        monkeypatch.setattr(spectrum, "_KRYLOV_MIN", 10)  # take the Krylov route first, as large matrices do
        assert spectrum.largest_singular_value(w) == pytest.approx(2.5, rel=1e-12)

    @staticmethod
    def _spiked(m: int, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        return w + 4 * torch.outer(torch.randn(m, generator=g, dtype=torch.float64),
                                   torch.randn(n, generator=g, dtype=torch.float64)) / math.sqrt(m * n)

    @pytest.mark.parametrize("scale", [1e-14, 1e-12, 1e12, 1e18])
    def test_the_search_certifies_at_any_scale_float32_holds(self, scale):
        """The search runs in float32, where squares of entries beyond about 1e19 overflow and below 1e-22
        vanish: its norms are taken in float64, so a scaled matrix certifies as the unscaled one does (found in
        review: the residuals overflowed and the search ran to its depth for nothing)."""
        self._certified((self._spiked(200, 500, 5) * scale).float())

    @pytest.mark.parametrize("gap", [0.0, 1e-7, 1e-5])
    def test_a_top_value_repeated_or_nearly_repeated_is_certified(self, gap):
        """One vector's Krylov space picks up a second copy of the top value only through rounding, a few steps
        late: a failed try is followed by more search steps before the next, so the copy is found (found in
        review: three tries on consecutive steps all failed)."""
        g = torch.Generator().manual_seed(1)
        values = torch.cat([torch.tensor([1.0 + gap, 1.0], dtype=torch.float64),
                            0.6 * torch.rand(298, generator=g, dtype=torch.float64)])
        self._certified(self._matrix(values, 800, 1).float())

    def test_an_invariant_krylov_space_goes_on_into_the_rest(self):
        """W with a single non-zero entry: A q lies in the span after one step. The search goes on with a random
        direction outside it (QR of the zero vector would repeat e_1) and certifies."""
        from prune_plugin.spectrum import certified_largest_singular_value

        w = torch.zeros(30, 50)
        w[0, 0] = 2.5
        assert certified_largest_singular_value(w) == pytest.approx(2.5, rel=1e-12)

    def test_the_search_stops_after_its_last_failed_try(self, monkeypatch):
        """At most three certificate tries, at least _SMAX_RETRY_STEPS search steps apart, and no search step
        after the third has failed."""
        import prune_plugin.spectrum as spectrum

        steps, tries = [], []
        real_next = spectrum._next_lanczos_vector
        monkeypatch.setattr(spectrum, "_certify_top", lambda *args: tries.append(len(steps)))  # always fails
        monkeypatch.setattr(spectrum, "_next_lanczos_vector", lambda *a: steps.append(1) or real_next(*a))
        assert spectrum.certified_largest_singular_value(self._spiked(200, 500, 5).float()) is None
        assert len(tries) == spectrum._SMAX_BOUND_TRIES
        assert all(b - a >= spectrum._SMAX_RETRY_STEPS for a, b in zip(tries, tries[1:]))
        assert len(steps) == tries[-1]

    def test_condition_number_is_ratio_of_extreme_singular_values(self):
        w = torch.diag(torch.tensor([10.0, 2.0, 0.5]))
        assert condition_number(w) == pytest.approx(20.0)

    @pytest.mark.parametrize("seed", range(3))
    def test_condition_number_through_the_gram_matrix_matches_a_float64_svd(self, monkeypatch, seed):
        import prune_plugin.spectrum as spectrum

        g = torch.Generator().manual_seed(seed)
        w = torch.randn(70, 120, generator=g)  # fresh float32 input, well conditioned (kappa ~ 10)
        monkeypatch.setattr(spectrum, "_DENSE_LIMIT", 10)
        s = torch.linalg.svdvals(w.double())
        assert spectrum.condition_number(w) == pytest.approx((s[0] / s[-1]).item(), rel=1e-9)

    def test_ill_conditioned_matrices_fall_back_to_a_dense_svd(self, monkeypatch):
        import prune_plugin.spectrum as spectrum

        # kappa = 1e7: beyond what the Gram route resolves (it would lose smin to round-off)
        q1, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(90, 60, dtype=torch.float64))
        w = q1 @ torch.diag(torch.logspace(0, -7, 60, dtype=torch.float64)) @ q2.mT
        monkeypatch.setattr(spectrum, "_DENSE_LIMIT", 10)
        assert spectrum.condition_number(w) == pytest.approx(1e7, rel=1e-6)
        assert spectrum.condition_number(torch.zeros(40, 50)) == float("inf")

    def test_condition_number_of_non_finite_weights_is_a_clear_error(self):
        with pytest.raises(FloatingPointError, match="non-finite"):
            condition_number(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))

    def test_smax_cache_computes_once_per_name(self):
        cache = SmaxCache()
        w = torch.eye(3) * 4
        assert cache.get("a", w) == pytest.approx(4.0)
        assert cache.get("a", torch.eye(3)) == pytest.approx(4.0)  # cached: W0 never changes
        cache.put("b", 7.0)  # a value the caller already computed is used as is
        assert "b" in cache and cache.get("b", torch.eye(3)) == 7.0

    def test_official_rank_tolerance_is_numpys_float32_default(self):
        assert official_rank_tolerance(2.0, (10, 30)) == pytest.approx(2.0 * 30 * torch.finfo(torch.float32).eps)

    def test_rank_rule_names(self):
        assert parse_rank_rule(" Official") == "official" and parse_rank_rule("exact") == "exact"
        with pytest.raises(ValueError, match="exact, official"):
            parse_rank_rule("numpy")


# -- restrain_parameter: the lean in-place path an edit runs --------------------------------------------------------
def _case(m, n, rank, seed, dtype=torch.float32, strength=6.0):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)).to(dtype)
    update = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    w = (w0.double() + strength * update / math.sqrt(rank)).to(dtype)
    return w0, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,rank", [((40, 300), 3), ((300, 40), 7), ((60, 50), 50)])
def test_restrain_parameter_equals_w0_plus_restrain_delta(dtype, shape, rank):
    w0, w = _case(*shape, rank, seed=rank, dtype=dtype)
    smax0 = largest_singular_value(w0)
    delta, info = restrain_delta(w.double() - w0.double(), smax0, 2.0, storage_dtype=dtype,
                                 weight_norm=float(w.double().norm()), rank_hint=rank)
    assert info.n_restrained > 0
    expected = (w0.double() + delta).to(dtype)
    weight = w.clone()
    figures, wrote = restrain_parameter(weight, w0, smax0, 2.0, rank_hint=rank)
    assert wrote and figures.rank == info.rank and figures.path == info.path
    # Same factors; only float64 round-off of the blocked write-back differs, far below the storage precision.
    scale = max(float(w0.abs().max()), float(w.abs().max()))
    assert torch.allclose(weight.double(), expected.double(), rtol=0, atol=max(2 * torch.finfo(dtype).eps, 1e-13) * scale)
    reference = w0.double() + restrain_dense_reference(w.double() - w0.double(), smax0, 2.0, never_enlarge=True,
                                                       rank_rule="exact")
    rounding = float((reference.to(dtype).double() - reference).norm())
    assert float((weight.double() - reference).norm()) <= max(2 * rounding, 1e-12 * float(reference.norm()))


def test_restrain_parameter_leaves_w_alone_when_nothing_reaches_smax_or_write_is_off():
    w0, w = _case(30, 50, 2, seed=1, strength=0.01)
    weight = w.clone()
    figures, wrote = restrain_parameter(weight, w0, largest_singular_value(w0), math.e)
    assert not wrote and figures.n_restrained == 0 and torch.equal(weight, w)
    w0, w = _case(30, 50, 2, seed=1)
    weight = w.clone()
    figures, wrote = restrain_parameter(weight, w0, largest_singular_value(w0), math.e, write=False)
    assert not wrote and figures.n_restrained > 0 and torch.equal(weight, w)


def test_restrain_parameter_refuses_non_finite_edits_untouched():
    w0, w = _case(20, 30, 1, seed=2)
    w[3, 4] = float("inf")
    weight = w.clone()
    with pytest.raises(FloatingPointError):
        restrain_parameter(weight, w0, largest_singular_value(w0), math.e)
    assert torch.equal(weight, w)
