"""Before/after timing of the restraint core against an older revision of its files (not part of benchmarks.run).

    git show cdcc14b:prune_plugin/restraint.py > /tmp/old_restraint.py
    git show cdcc14b:prune_plugin/originals.py > /tmp/old_originals.py
    git show cdcc14b:prune_plugin/spectrum.py  > /tmp/old_spectrum.py
    OMP_NUM_THREADS=1 python -m benchmarks.compare_revisions --restraint /tmp/old_restraint.py \\
        --originals /tmp/old_originals.py --spectrum /tmp/old_spectrum.py [--shape 576x1536 ...] [--repeats 3]

Times the same calls on the same inputs with the old files and the current ones, and checks the results agree:
restrain_delta (no rank hint, and with the hint), fingerprint, largest_singular_value, condition_number.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path


def load(path: str, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CASES = [(576, 1536, 1), (576, 1536, 100), (576, 1536, 400), (576, 1536, 576),
         (6400, 1600, 100), (6400, 1600, 1600), (4096, 11008, 1), (4096, 11008, 100)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--restraint")
    p.add_argument("--originals")
    p.add_argument("--spectrum")
    p.add_argument("--shape", action="append")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import pin_threads

    threads = pin_threads(args.threads)
    import torch

    from benchmarks.common import fmt_ratio, fmt_seconds, make_original, make_update, print_table, relative_difference, timed
    from prune_plugin import originals as new_originals
    from prune_plugin import restraint as new_restraint
    from prune_plugin import spectrum as new_spectrum

    cases = [c for c in CASES if not args.shape or f"{c[0]}x{c[1]}" in args.shape]
    rows = []
    originals_cache: dict = {}
    for m, n, r in cases:
        big = m * n > 1_000_000
        if (m, n) not in originals_cache:
            originals_cache.clear()
            w0 = make_original(m, n, seed=0)
            originals_cache[(m, n)] = (w0, new_spectrum.largest_singular_value(w0))
            if args.spectrum:
                old = load(args.spectrum, "old_spectrum")
                t_old, s_old = timed(lambda: old.largest_singular_value(w0), repeats=1 if big else args.repeats, warmup=0 if big else 1)
                t_new, s_new = timed(lambda: new_spectrum.largest_singular_value(w0), repeats=1 if big else args.repeats, warmup=0 if big else 1)
                rows.append([f"{m}x{n}", "-", "largest_singular_value", fmt_seconds(t_old.median), fmt_seconds(t_new.median),
                             fmt_ratio(t_old.median / t_new.median), f"{abs(s_old / s_new - 1):.0e}"])
                t_old, c_old = timed(lambda: old.condition_number(w0), repeats=1 if big else args.repeats, warmup=0 if big else 1)
                t_new, c_new = timed(lambda: new_spectrum.condition_number(w0), repeats=1 if big else args.repeats, warmup=0 if big else 1)
                rows.append([f"{m}x{n}", "-", "condition_number", fmt_seconds(t_old.median), fmt_seconds(t_new.median),
                             fmt_ratio(t_old.median / t_new.median), f"{abs(c_old / c_new - 1):.0e}"])
            if args.originals:
                old = load(args.originals, "old_originals")
                t_old, _ = timed(lambda: old.fingerprint(w0), repeats=args.repeats, warmup=1)
                t_new, _ = timed(lambda: new_originals.fingerprint(w0), repeats=args.repeats, warmup=1)
                rows.append([f"{m}x{n}", "-", "fingerprint", fmt_seconds(t_old.median), fmt_seconds(t_new.median),
                             fmt_ratio(t_old.median / t_new.median), "-"])
        w0, smax0 = originals_cache[(m, n)]
        if not args.restraint:
            continue
        old = load(args.restraint, "old_restraint")
        r = min(r, m, n)
        w = make_update(m, n, r, smax0, seed=r).add_(w0).to(torch.float32)
        delta = w.double() - w0.double()
        scale = max(float(w0.abs().max()), float(w.abs().max()))
        for hint in (0, r):
            kw = dict(never_enlarge=False, storage_dtype=torch.float32, scale=scale, rank_hint=hint)
            reps = 1 if (big and r > 200) else args.repeats
            t_old, (d_old, f_old) = timed(lambda: old.restrain_delta(delta, smax0, math.e, **kw), repeats=reps, warmup=0 if reps == 1 else 1, collect=big)
            t_new, (d_new, f_new) = timed(lambda: new_restraint.restrain_delta(delta, smax0, math.e, **kw), repeats=reps, warmup=0 if reps == 1 else 1, collect=big)
            agree = relative_difference(d_new, d_old) if d_old is not None and d_new is not None else 0.0
            rows.append([f"{m}x{n}", r, f"restrain_delta hint={hint} ({f_old.path}/{f_new.path})", fmt_seconds(t_old.median),
                         fmt_seconds(t_new.median), fmt_ratio(t_old.median / t_new.median), f"{agree:.0e}"])
        del w, delta
    print_table(f"Old revision vs current (OMP_NUM_THREADS={threads})",
                ["matrix", "rank dW", "call (path old/new)", "old", "current", "speed-up", "rel diff"], rows,
                [f"median of {args.repeats} after one warm-up (one run for dense paths at large shapes)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
