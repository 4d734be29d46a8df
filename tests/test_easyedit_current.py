"""Optional: the plugin against a current EasyEdit source checkout (GitHub zjunlp/EasyEdit).

Set PRUNE_EASYEDIT_SRC to the checkout's root (the folder holding easyeditor/); skipped otherwise. It runs in a
subprocess, because the suite's other tests import the packaged 0.0.1.dev0 as `easyeditor`:

    PRUNE_EASYEDIT_SRC=~/src/EasyEdit pytest tests/test_easyedit_current.py
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
