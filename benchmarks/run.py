"""Run the prune-plugin benchmark suite and print one table per benchmark.

    python -m benchmarks.run                    # the recorded run (tens of minutes to hours: see docs/benchmarks.md)
    python -m benchmarks.run --smoke            # CI: small shapes, checks that everything runs and agrees (< 1 min)
    python -m benchmarks.run --only restraint --only memory
    python -m benchmarks.run --threads 1 --json results.json

Threads: --threads N (or OMP_NUM_THREADS) fixes torch's and numpy's BLAS threads before either is imported;
with neither, 1 thread is used. Exit status 1 when an agreement check fails (speed targets are reported, and a
missed one is stated in the output, but it does not fail the run).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

# name -> module; the order is the order of the report.
BENCHMARKS = {
    "restraint": "benchmarks.bench_restraint",
    "spectrum": "benchmarks.bench_spectrum",
    "condition": "benchmarks.bench_condition",
    "memory": "benchmarks.bench_memory",
    "sequential": "benchmarks.bench_sequential",
    "perplexity": "benchmarks.bench_perplexity",
    "rome_overhead": "benchmarks.bench_rome_overhead",
    "generation": "benchmarks.bench_generation",
    "checkpoint": "benchmarks.bench_checkpoint",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small shapes, few repeats: checks that the suite works and agrees")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this benchmark (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads (default: $OMP_NUM_THREADS, else 1)")
    p.add_argument("--repeats", type=int, default=None, help="measured repeats after one warm-up (default 5; smoke 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds one timed case may take in all; a slower case is measured once (default 300; smoke 10)")
    p.add_argument("--full-rank-large", action="store_true", help="also run full-rank dW at 4096x11008 (very slow)")
    p.add_argument("--reference-large", action="store_true", help="also compute the float64 dense reference at 4096x11008")
    p.add_argument("--shape", action="append", default=None, metavar="MxN",
                   help="restrict 'restraint', 'condition', 'spectrum' and 'memory' to these shapes, e.g. --shape 576x1536 (repeatable)")
    p.add_argument("--dw", action="append", default=None, metavar="KIND",
                   help="restrict 'restraint' and 'condition' to these dW kinds: a rank (1, 10, 100), ftK (full rank, K values above "
                        "smax(W0)) or full (repeatable)")
    p.add_argument("--max-edits", type=int, default=None, help="largest number of rank-one edits in 'sequential' (default 1000)")
    p.add_argument("--general-tasks", default=None,
                   help="prune_general subtasks timed in 'generation', comma-separated (default: all four)")
    p.add_argument("--general-limit", type=int, default=None,
                   help="prompts per prune_general subtask in 'generation' (default 16; the official counts are 358/149/261/299)")
    p.add_argument("--prune-tasks-dir", default=None,
                   help="folder with PRUNE's official task files for 'generation' (default: $PRUNE_TASKS_DIR, "
                        "../shared/data/prune-tasks, else the shipped sets)")
    p.add_argument("--json", type=Path, default=None, help="also write all measured records to this JSON file")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    if args.budget is None:
        args.budget = 10.0 if args.smoke else 300.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import machine_summary, pin_threads

    args.threads = pin_threads(args.threads)  # before torch and numpy are imported
    import torch

    torch.set_num_threads(args.threads)
    machine = machine_summary()
    print(f"# prune-plugin benchmarks{' (smoke)' if args.smoke else ''}\n")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()) + "\n", flush=True)
    results = {"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "benchmarks": {}}
    failed = []
    for name in args.only or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        t0 = time.perf_counter()
        out = module.run(args)
        out["seconds"] = time.perf_counter() - t0
        results["benchmarks"][name] = out
        failed += [c["what"] for c in out.get("checks", []) if c.get("kind") == "agreement" and not c["ok"]]
        print(f"({name}: {out['seconds']:.0f} s)\n", flush=True)
    targets = [c for out in results["benchmarks"].values() for c in out.get("checks", []) if c.get("kind") == "target"]
    if targets:
        print("## Targets\n")
        for c in targets:
            print(f"- {c['text']}")
        print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=_jsonable))
    if failed:
        print("AGREEMENT CHECKS FAILED: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
