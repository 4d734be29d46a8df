"""The hook contract proven from outside the package: examples/rect (RECT, arXiv 2401.04700) is a separate
distribution that uses only the public hookspecs, declares its own prune_* keys, and is found through the
``prune_plugin`` entry-point group once installed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.editing import requires_easyeditor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rect"
SCRIPT = Path(__file__).parent / "scripts" / "rect_beside_prune.py"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """examples/rect installed with pip into a folder of its own (no index, no build isolation: offline)."""
    target = tmp_path_factory.mktemp("rect-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True, text=True)
    return target


@pytest.fixture
def rect(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    import prune_rect

    return prune_rect


def test_the_installed_distribution_registers_rect_in_the_prune_plugin_group(installed):
    from importlib.metadata import distributions

    found = [ep for dist in distributions(path=[str(installed)]) for ep in dist.entry_points
             if ep.group == "prune_plugin"]
    assert [(ep.name, ep.value) for ep in found] == [("rect", "prune_rect:plugin")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rectify_keeps_the_largest_relative_changes_and_resets_the_rest_exactly(rect, dtype):
    gen = torch.Generator().manual_seed(1)
    before = torch.randn(24, 40, generator=gen).to(dtype)
    after = (before.float() + 0.1 * torch.randn(24, 40, generator=gen)).to(dtype)
    out, kept = rect.rectify(before, after, 0.25)
    keep = math.ceil(0.25 * before.numel())
    assert kept == keep and out.dtype == dtype
    from_after = (out == after) & (after != before)
    assert int(from_after.sum()) == keep
    assert torch.equal(torch.where(from_after, before, out), before)  # every other entry is its pre-edit bits
    rel = ((after.float() - before.float()).abs() / before.float().abs())
    assert rel[from_after].min() >= rel[~from_after & (after != before)].max()


def test_rectify_keeps_entries_that_were_zero_first_and_changes_nothing_it_need_not(rect):
    before = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    after = torch.tensor([[0.5, 1.5, 2.0, 4.4]])
    out, kept = rect.rectify(before, after, 0.5)
    assert kept == 2 and torch.equal(out, torch.tensor([[0.5, 1.5, 2.0, 4.0]]))
    same, kept = rect.rectify(before, after, 1.0)
    assert kept == 3 and torch.equal(same, after)


@requires_easyeditor
@pytest.mark.slow
def test_rect_runs_from_an_easyedit_yaml_beside_prune_and_before_it(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    k = result["kept_per_edit"]

    alone = result["rect_alone"]
    assert alone["session"] and [d["kept"] for d in alone["decisions"]] == [k, k]
    assert 0 < alone["changed_entries"] <= 2 * k < alone["entries"]  # two rectified edits, most entries at W0
    assert alone["restored_bit_exact"]

    both, prune = result["rect_then_prune"], result["prune_alone"]
    assert prune["prune_wrote"] == [True] and both["prune_wrote"] == [True]
    assert [d["kept"] for d in both["decisions"]] == [k]
    # PRUNE recomposed the rectified update (W0 + U F(S) V^T is dense): had RECT run after PRUNE, at most k
    # entries would differ from W0.
    assert both["changed_entries"] > k and both["restored_bit_exact"]

    assert result["neither"] == {"session": False}  # installed but not mentioned in the YAML: inert
    assert result["bad_ratio_error"] is not None
    assert f"bad.yaml:{result['bad_ratio_line']}: prune_rect_ratio: must be a fraction in (0, 1], got 2" in \
        result["bad_ratio_error"]
