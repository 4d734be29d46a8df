"""The benchmark suite's smoke mode runs end to end and its results agree (speed is not asserted here; the product
code the benchmarks measure is tested in its own test files)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.editing import requires_easyeditor

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
        assert r["median_share"] >= 0 and math.isfinite(r["max_share"])  # a share, not a speed: no bound asserted
    plain, guarded = records
    assert plain["part_shares"]["guard"] == 0 < guarded["part_shares"]["guard"]


@requires_easyeditor  # the smoke run includes real ROME edits through easyeditor
def test_perplexity_scorers_include_lm_eval_and_agree_with_the_floor(smoke):
    records = smoke[0]["benchmarks"]["perplexity"]["records"]
    assert {r["scorer"] for r in records} == {"lm-eval collapse_ppl_paper", "sampler", "proposed scoring"}
    for r in records:
        assert r["seconds"] > 0 and r["floor_seconds"] > 0
        assert r["max_rel_diff"] < 1e-4, r
