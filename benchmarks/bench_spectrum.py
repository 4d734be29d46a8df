"""Benchmark: smax(W0), the threshold of PRUNE's F, computed once per matrix and sequence.

- plugin: spectrum.largest_singular_value, the certified block Krylov estimate (1e-6 relative, dense fallback);
- today's path: spectrum.largest_singular_value_dense, the float64 Gram matrix of the smaller side and one eigvalsh
  (what the plugin used before the estimate);
- official: numpy's float32 svd(W0, full_matrices=1), the official code's call for it (only S0[0] is used); at
  4096x11008 it takes minutes, so it runs there only with --full-rank-large.

Agreement: both plugin paths against a float64 svdvals of W0 (the Gram path's value where that is too slow).
"""
from __future__ import annotations

from typing import Any

from .common import MATRIX_SHAPES, fmt_ratio, fmt_seconds, make_original, print_table, select_shapes, timed

NAME = "spectrum"
SHAPES = MATRIX_SHAPES
SMOKE_SHAPES = [("smoke", 120, 300)]
LARGE = 20_000_000
TARGET_SECONDS = 1.0
TARGET_RTOL = 1e-6


def _peak_extra_bytes(m: int, n: int) -> int:
    """Peak extra resident memory of one smax(W0) call on a float32 W0, measured in a fresh process."""
    from .bench_memory import _run_probes

    return int(_run_probes(["smax"], m, n, 1, "float32", timeout=900)["smax"]["peak_extra"])


def run(args) -> dict[str, Any]:
    import numpy as np
    import torch

    from prune_plugin import spectrum
    from prune_plugin.spectrum import certified_largest_singular_value, largest_singular_value, largest_singular_value_dense

    shapes = select_shapes(SMOKE_SHAPES if args.smoke else SHAPES, args.shape)
    rows, records, notes = [], [], []
    for label, m, n in shapes:
        large = m * n > LARGE
        w0 = make_original(m, n, seed=0)
        reps = 1 if large else args.repeats
        plugin, value = timed(lambda: largest_singular_value(w0), repeats=args.repeats, warmup=1)
        krylov = spectrum.takes_krylov_route(w0)  # what largest_singular_value takes at this size
        certified = krylov and certified_largest_singular_value(w0) is not None
        today, value_today = timed(lambda: largest_singular_value_dense(w0), repeats=reps, warmup=0 if large else 1)
        official = value_official = None
        if not large or args.full_rank_large:
            w0_np = w0.numpy()
            official, s0 = timed(lambda: np.linalg.svd(w0_np, full_matrices=True)[1][0], repeats=reps,
                                 warmup=0 if large else 1, collect=True)
            value_official = float(s0)
        exact = value_today if large else float(torch.linalg.svdvals(w0.double())[0])
        err = abs(value - exact) / exact
        record = {"shape": [m, n], "label": label, "certified": certified, "smax": value, "exact": exact,
                  "rel_err": err, "err_today": abs(value_today - exact) / exact,
                  "err_official": None if value_official is None else abs(value_official - exact) / exact,
                  "plugin_seconds": plugin.median, "today_seconds": today.median,
                  "official_seconds": None if official is None else official.median,
                  "ratio_today": today.median / plugin.median,
                  "ratio_official": None if official is None else official.median / plugin.median,
                  "extra_bytes": _peak_extra_bytes(m, n)}
        records.append(record)
        path = "certified Krylov" if certified else "dense fallback" if krylov else "dense (small matrix)"
        rows.append([f"{label} {m}x{n}", path, fmt_seconds(plugin.median),
                     fmt_seconds(today.median), "-" if official is None else fmt_seconds(official.median),
                     fmt_ratio(record["ratio_today"]), fmt_ratio(record["ratio_official"]), f"{err:.1e}",
                     f"{record['err_today']:.1e}", f"{record['extra_bytes'] / 2**20:.0f} MiB"])
        if large and official is None:
            notes.append(f"{label}: the official svd(W0) not run (minutes at this size; --full-rank-large runs it)")
    checks = []
    for r in records:
        checks.append({"what": f"smax agreement {r['label']}", "kind": "agreement", "ok": r["rel_err"] <= TARGET_RTOL,
                       "text": f"agreement {r['label']}: smax(W0) within {r['rel_err']:.1e} of float64 (<= 1e-6: "
                               f"{'yes' if r['rel_err'] <= TARGET_RTOL else 'NO'})"})
        if not args.smoke and r["shape"] == [4096, 11008]:
            ok = r["plugin_seconds"] <= TARGET_SECONDS and r["ratio_today"] >= 10 and r["certified"]
            checks.append({"what": "target smax 4096x11008", "kind": "target", "ok": ok,
                           "text": f"TARGET smax(W0) at 4096x11008 certified, well under a second, <= 1/10 of today's "
                                   f"path: {'MET' if ok else 'MISSED'} ({fmt_seconds(r['plugin_seconds'])}, "
                                   f"{r['ratio_today']:.1f}x faster than the Gram route)"})
    header = ["matrix", "plugin path", "plugin", "today's path (Gram)", "official svd(W0)", "ratio today",
              "ratio official", "rel err plugin", "rel err today", "extra memory (plugin)"]
    notes += ["plugin: median of the repeats after one warm-up; today's path and official: one call at 4096x11008.",
              "rel err against float64 svdvals (against the Gram value at 4096x11008); extra memory = peak resident "
              "memory above the start of one largest_singular_value call on the float32 W0, in a fresh process "
              "(benchmarks.bench_memory's smax probe)."] + [c["text"] for c in checks]
    text = print_table(f"smax(W0) (OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records, "checks": checks, "table": text}
