"""The benchmark suite's smoke mode runs end to end and its results agree (speed is not asserted here), plus the
lean restraint path the benchmarks measure (restrain_parameter) against restrain_delta."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edit_fixtures import requires_easyeditor
from prune_plugin.originals import fingerprint
from prune_plugin.restraint import restrain_delta, restrain_dense_reference, restrain_parameter
from prune_plugin.spectrum import largest_singular_value

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_smoke_runs_every_benchmark_and_prints_its_table(smoke):
    results, stdout = smoke
    assert set(results["benchmarks"]) == {"restraint", "spectrum", "condition", "memory", "sequential", "perplexity",
                                          "rome_overhead", "generation", "checkpoint"}
    assert results["machine"]["threads"] == 1
    for title in ("Restraint cost per matrix", "smax(W0)", "Condition numbers for telemetry", "Memory per edited matrix", "sequence of rank-one edits",
                  "perplexity scoring throughput", "ROME per-edit overhead", "prune_general generation throughput",
                  "Checkpoint cost", "Online restraint per edit along a long run"):
        assert title in stdout


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_plugin_and_official_baseline_agree(smoke):
    records = smoke[0]["benchmarks"]["restraint"]["records"]
    assert records and any(r["path"] == "dense" for r in records) and any(r["path"] == "lowrank" for r in records)
    for r in records:
        assert r["n_restrained"] == r["official_n_restrained"] and r["rank_found"] == r["n_restrained"], r
        assert r["err_dw_plugin_vs_reference"] < 1e-6, r  # the float64 exact reference
        assert r["err_dw_vs_official"] < 1e-5 + 2 * r["err_dw_official_vs_reference"], r  # official: its truncation
        assert r["err_previous_vs_plugin"] < 1e-7 and r["err_today_vs_official"] < 1e-5, r
    assert any(r["kind"].startswith("ft") and r["path"] == "lowrank" for r in records)  # full rank, top-k path
    assert sum(r["n_restrained"] for r in records) > 0  # the restraint really acted


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_every_agreement_check_passed(smoke):
    for bench in smoke[0]["benchmarks"].values():
        for check in bench["checks"]:
            if check["kind"] == "agreement":
                assert check["ok"], check["text"]


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_memory_probes_report_kept_and_peak_bytes(smoke):
    (record,) = smoke[0]["benchmarks"]["memory"]["records"]
    size = record["begin"]["matrix_bytes"]
    assert record["begin"]["kept_w0_bytes"] == size and record["begin"]["kept_state_bytes"] < 1024
    for probe in ("restrain_matrices", "previous_path", "official", "fingerprint", "smax"):
        assert record[probe]["peak_extra"] is None or record[probe]["peak_extra"] >= 0


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_sequential_ranks_grow_with_the_edits(smoke):
    bench = smoke[0]["benchmarks"]["sequential"]
    ranks = [r["rank"] for r in bench["records"]]  # the exact rule: the values >= smax(W0), restrained
    assert ranks == sorted(ranks) and ranks[-1] > ranks[0] > 0
    assert all(r["rank"] == r["n_restrained"] <= r["edits"] for r in bench["records"])
    assert bench["sequence"]["restrained_edits"] == bench["sequence"]["edits"]


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_rome_overhead_times_real_rome_edits_with_and_without_the_guard(smoke):
    records = smoke[0]["benchmarks"]["rome_overhead"]["records"]
    assert len(records) == 2 and all(r["edits"] == 3 and r["restrained"] > 0 for r in records)
    for r in records:
        # the wrapped call contains ROME: the plugin's extra time is what lies between them
        assert all(w >= o > 0 for w, o in zip(r["wrapped_seconds"], r["own_seconds"]))
        assert 0 <= r["median_share"] < 10 and math.isfinite(r["max_share"])
    plain, guarded = records
    assert plain["part_shares"]["guard"] == 0 < guarded["part_shares"]["guard"]


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_perplexity_scorers_include_lm_eval_and_agree_with_the_floor(smoke):
    records = smoke[0]["benchmarks"]["perplexity"]["records"]
    assert {r["scorer"] for r in records} == {"lm-eval collapse_ppl_paper", "sampler", "proposed scoring"}
    for r in records:
        assert r["seconds"] > 0 and r["floor_seconds"] > 0
        assert r["max_rel_diff"] < 1e-4, r


# -- the lean in-place restraint ---------------------------------------------------------------------------------
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


def test_fingerprint_sees_any_single_bit_and_ignores_copies():
    w = torch.randn(64, 96)
    base = fingerprint(w)
    assert fingerprint(w.clone()) == base and fingerprint(w.t().contiguous().t()) == base
    flipped = w.clone()
    flipped.view(torch.int32)[10, 20] ^= 1
    assert fingerprint(flipped) != base
    swapped = w.clone()
    swapped[0, 0], swapped[0, 1] = w[0, 1].item(), w[0, 0].item()
    assert fingerprint(swapped) != base
    assert fingerprint(w.bfloat16()) != fingerprint(w.bfloat16().clone().fill_(0))
