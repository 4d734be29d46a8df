"""Benchmark 4a (placeholder): per-edit overhead of the plugin in a real ROME run on the embedded model.

What it will measure once the EasyEdit integration can run ROME on the embedded model here: for each edit of a
sequence, the plugin's time (step.seconds: restraint, plus telemetry and the guard when on) as a share of the
edit's own time (ROME's compute of the update, measured by the editor), median over the sequence after the first
edit (which also pays the one-off smax(W0)). Target: < 2 %.

Until then `run` reports the benchmark as pending and measures nothing: no number is made up. The pieces it will
use already exist: EditSession.after_edit records step.seconds['restraint'] (and 'guard'); the sequential
benchmark times the same per-edit bookkeeping on synthetic rank-one edits at the Llama-2-7B down_proj shape.
"""
from __future__ import annotations

from typing import Any

NAME = "rome_overhead"
PENDING = ("per-edit overhead in a real ROME run (restraint + telemetry time / the edit's own time, target < 2%): "
           "pending until EasyEdit's ROME runs on the embedded model here; the lead adds it "
           "(hook: benchmarks/bench_rome_overhead.py, measure())")


def measure(args) -> dict[str, Any]:
    """To be written with the EasyEdit integration: run N ROME edits through the patched editor with prune: true,
    online mode, telemetry on and off; return per-edit {'edit_seconds', 'restraint_seconds', 'telemetry_seconds'}."""
    raise NotImplementedError(PENDING)


def run(args) -> dict[str, Any]:
    print(f"### ROME per-edit overhead\n\n- {PENDING}\n", flush=True)
    return {"name": NAME, "records": [], "checks": [], "pending": [PENDING], "table": f"pending: {PENDING}"}
