"""Optional: the plugin against a current EasyEdit source checkout (GitHub zjunlp/EasyEdit).

Set PRUNE_EASYEDIT_SRC to the checkout's root (the folder holding easyeditor/ and hparams/); skipped otherwise.
It runs in subprocesses, because the suite's other tests import the packaged 0.0.1.dev0 as `easyeditor`:

    PRUNE_EASYEDIT_SRC=~/src/EasyEdit pytest tests/test_easyedit_current.py

Last run against zjunlp/EasyEdit 14cea82 (2026-07-14) with transformers 4.55.4 (that commit does not import with
transformers 5.24: its UNKE imports transformers.modeling_attn_mask_utils, which 5.24 no longer has).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = os.environ.get("PRUNE_EASYEDIT_SRC")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SOURCE, reason="set PRUNE_EASYEDIT_SRC to a current EasyEdit checkout")]


def test_sequential_rome_with_prune_through_the_current_easyedit(tmp_path):
    script = Path(__file__).parent / "scripts" / "current_easyedit_rome.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PRUNE_PLUGIN_AUTOLOAD": "0"}
    done = subprocess.run([sys.executable, str(script), SOURCE, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rejected_without_plugin"]  # EasyEdit's own TypeError for unknown keys, before activation
    assert result["smax_unrestrained"] > result["bound"]  # the restraint had something to do
    assert result["smax_after"] <= result["bound"] * (1 + 1e-5)
    assert result["others_unchanged"] and result["restored"]


# In-place methods run through the current EasyEdit with the checkout's own hparams YAML (sizes changed for a tiny
# Llama), covariance statistics from the plugin's helper, downloads forbidden. KN names its matrices with
# prune_targets; the others are found from their rewrite_module_tmp(s) and layers.
METHODS = ["ROME", "R-ROME", "MEMIT", "MEMIT-FE", "PMET", "EMMET", "EAMET", "AlphaEdit", "SPHERE", "KN"]
# Methods that keep a sum over past edits' keys beside the weights (cache_c): without the plugin's reset in
# session.restore(), a second sequence would still be held to edits that were undone.
KEEP_EDIT_STATE = {"AlphaEdit", "SPHERE"}


@pytest.fixture(scope="module")
def method_results(tmp_path_factory) -> dict[str, dict]:
    workdir = tmp_path_factory.mktemp("current-methods")
    script = Path(__file__).parent / "scripts" / "current_easyedit_methods.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PRUNE_PLUGIN_AUTOLOAD": "0"}
    done = subprocess.run([sys.executable, str(script), SOURCE, str(workdir), ",".join(METHODS)], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"method"')]
    return {result["method"]: result for result in lines}


@pytest.mark.parametrize("method", METHODS)
def test_sequential_editing_with_prune_equals_the_official_formula(method_results, method):
    result = method_results[method]
    assert result["restraint_had_work"]  # some singular value of dW passed smax(W0)
    assert result["formula_error"] < 1e-5  # W - W0 = U F(S) Vᵀ of the unrestrained dW, dense float64 reference
    assert result["others_unchanged"] and result["restored"]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("ROME", "R-ROME", "KN")])
def test_covariance_statistics_are_found_where_this_easyedit_looks(method_results, method):
    result = method_results[method]  # the script forbids downloads: a statistics file not found would fail it
    assert result["stats_where_layer_stats_looks"]
    assert all(path.startswith("stats/tiny-llama/wikipedia_stats/") for path in result["stats"])


@pytest.mark.parametrize("method", METHODS)
def test_a_second_sequence_after_restore_equals_the_first(method_results, method):
    result = method_results[method]
    assert result["second_sequence_equal"]
    assert result["stale_state_changes_a_second_sequence"] == (method in KEEP_EDIT_STATE)
