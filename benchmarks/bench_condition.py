"""Benchmark: telemetry's condition numbers, cond(W) before and after each restraint.

- plugin: condition.ConditionNumbers.get, what restrain_matrices calls when telemetry records condition numbers: the
  certified estimate from W0's kept Gram spectrum (computed once per matrix: 'one-off' column) and the low-rank dW,
  the exact route when it cannot certify (full-rank dW; matrices below 4M elements always);
- today's path: spectrum.condition_number, the float64 Gram matrix of W and one eigvalsh, every time.

dW kinds as in the restraint benchmark (benchmarks/bench_restraint.py): r = r rank-one updates, ftK = full rank with
K values above smax(W0); 'after' is the same W once restrained (a = e, exact rule), through
ConditionNumbers.after_restraint as the session calls it (from what 'before' learned and the restraint's factors,
no pass over dW: path 'estimate (factors)'; the full estimate where that does not certify); 'next before' is the next
edit's W (the restrained W plus one rank-one update) with the basis 'after' found; 'next before, dW shared' the
same with dW formed outside the timer, as a session does (restraint.delta_of: the restraint needs the same float64
dW right after, and takes it). Along a sequence telemetry pays 'after' and 'next before, dW shared' per edit; the
first look at a matrix's dW comes once per matrix (and at every restraint of PRUNE's restrain-once-after-n-edits
protocol), next to gram_spectrum's one-off: 'before' with a range finder of its own, "before, restraint's block" as
a session takes it since stop 19 (dW shared, and Q and R from what the restraint's block captured of dW:
restraint.plan_restraint(..., capture=True) runs before telemetry's cond(W) and writes W after it).
Agreement: against a float64 svdvals of W (the Gram route's value at 4096x11008, where svdvals takes minutes; that
route is accurate to about 1e-6 there).
"""
from __future__ import annotations

import math
from typing import Any

from .common import (MATRIX_SHAPES, fmt_bytes, fmt_ratio, fmt_seconds, make_original, make_update, print_table,
                     select_shapes, timed)

NAME = "condition"
SHAPES = MATRIX_SHAPES
SMOKE_SHAPES = [("smoke", 96, 160)]
KINDS: list[Any] = [1, 10, 100, "ft32"]
SMOKE_KINDS: list[Any] = [1, 4, "ft4"]
LARGE = 20_000_000
TARGET_RATIO = 10.0
SHARED = "next before, dW shared"
FIRST = "before, restraint's block"
TARGET_RTOL = 1e-3


def _next_edit(restrained, smax0: float, seed: int = 7):
    """The next edit of a sequence: the restrained W plus one rank-one update of 3 x smax(W0) (a ROME-sized edit,
    common.make_update), float32. Its 'before' starts from the basis the previous 'after' found, as in a session."""
    import torch

    m, n = restrained.shape
    return make_update(m, n, 1, smax0, seed=seed).add_(restrained.double()).to(torch.float32)


def run(args) -> dict[str, Any]:
    import torch

    from prune_plugin.condition import ConditionNumbers, gram_spectrum
    from prune_plugin.restraint import delta_of, plan_restraint, restrain_parameter
    from prune_plugin.spectrum import condition_number, largest_singular_value

    from .bench_restraint import _delta

    shapes = select_shapes(SMOKE_SHAPES if args.smoke else SHAPES, args.shape)
    kinds = SMOKE_KINDS if args.smoke else KINDS
    if getattr(args, "dw", None):
        kinds = [int(k) if k.isdigit() else k for k in args.dw]
    min_elements = 1 if args.smoke else None  # smoke: the tiny matrices take the large-matrix route
    rows, records, notes = [], [], []
    for label, m, n in shapes:
        large = m * n > LARGE
        w0 = make_original(m, n, seed=0)
        smax0 = largest_singular_value(w0)
        one_off, spectrum = timed(lambda: gram_spectrum(w0), repeats=1, warmup=0)
        reps = 1 if large else args.repeats
        for kind in kinds:
            delta, _ = _delta(m, n, kind, smax0)
            w = delta.add_(w0).to(torch.float32)
            del delta
            restrained = w.clone()
            update = restrain_parameter(restrained, w0, smax0, math.e)[0].written
            captured = plan_restraint(w, w0, smax0, math.e, capture=True)[1].captured
            following = _next_edit(restrained, smax0)
            numbers = ConditionNumbers(min_elements=min_elements)
            numbers.keep_spectrum("w", spectrum)  # kept from the first edit of the matrix on (the one-off column)
            found: dict[str, Any] = {}
            stages = (("before", w, None), (FIRST, w, None), ("after", restrained, FIRST),
                      ("next before", following, "after"), (SHARED, following, "after"))
            for stage, matrix, start_from in stages:
                # In a session telemetry and the restraint share the float64 dW (restraint.delta_of): formed
                # outside the timer for those rows (what telemetry adds to an edit); the first look of a session
                # also takes what the restraint's block captured of dW (computed outside the timer too: the
                # restraint pays for it)
                shared = delta_of(matrix, w0) if stage in (SHARED, FIRST) else None
                def start() -> None:
                    # 'before': no basis yet (a first look at this dW); 'after': the one 'before' found, and 'next
                    # before' the one 'after' found, as in a session. A dense dW is tried afresh every time (a
                    # session stops trying after the first).
                    numbers.start_afresh("w", found.get(start_from), current=stage == "after")

                def call():
                    if stage == "after":  # what the session calls: from 'before' and the restraint's factors
                        return numbers.after_restraint("w", matrix, w0, update)
                    return numbers.get("w", matrix, w0, delta=shared, captured=captured if stage == FIRST else None)

                estimated, from_factors = numbers.estimated, numbers.from_factors
                plugin, value = timed(call, repeats=args.repeats, warmup=1, setup=start)
                del shared
                path = ("estimate (factors)" if numbers.from_factors > from_factors else "estimate"
                        if numbers.estimated > estimated else "exact route")
                found.setdefault(stage, numbers.basis("w"))
                today, value_today = timed(lambda: condition_number(matrix), repeats=reps, warmup=0 if large else 1)
                exact = value_today if large else float(
                    (lambda s: s[0] / s[-1])(torch.linalg.svdvals(matrix.double())))
                err = abs(value / exact - 1)
                record = {"shape": [m, n], "label": label, "kind": str(kind), "stage": stage, "path": path,
                          "cond": value, "exact": exact, "rel_err": err, "plugin_seconds": plugin.median,
                          "today_seconds": today.median, "ratio_today": today.median / plugin.median,
                          "one_off_seconds": one_off.median, "kept_bytes": spectrum.nbytes,
                          "exact_is_gram": large}
                records.append(record)
                rows.append([f"{label} {m}x{n}", str(kind), stage, path, f"{value:.6g}", fmt_seconds(plugin.median),
                             fmt_seconds(today.median), fmt_ratio(record["ratio_today"]), f"{err:.1e}",
                             fmt_seconds(one_off.median), fmt_bytes(spectrum.nbytes)])
            del w, restrained, following
        del w0, spectrum
    checks = []
    for r in records:
        ok = r["rel_err"] <= (1e-6 if r["path"] == "exact route" else TARGET_RTOL)
        estimate = r["path"].startswith("estimate")
        checks.append({"what": f"cond agreement {r['label']} {r['kind']} {r['stage']}", "kind": "agreement", "ok": ok,
                       "text": f"agreement {r['label']} {r['kind']} {r['stage']}: cond(W) within {r['rel_err']:.1e} "
                               f"of float64 ({r['path']}; <= 1e-3: {'yes' if ok else 'NO'})"})
        if not args.smoke and r["shape"] == [4096, 11008] and not r["kind"].startswith("ft"):
            met = r["ratio_today"] >= TARGET_RATIO and estimate
            # what a session pays: the first look from the restraint's block (once per matrix, and at every
            # restraint of the restrain-once protocol), then 'after' and the next edit's 'before' with dW shared
            per_edit = r["stage"] in ("after", SHARED, FIRST)
            heading = "TARGET" if per_edit else "info"
            checks.append({"what": f"target cond 4096x11008 {r['kind']} {r['stage']}",
                           "kind": "target" if per_edit else "info", "ok": met,
                           "text": f"{heading} cond(W) at 4096x11008, rank "
                                   f"{r['kind']} {r['stage']}: <= 1/10 of today's "
                                   f"path: {'MET' if met else 'MISSED'} ({fmt_seconds(r['plugin_seconds'])} against "
                                   f"{fmt_seconds(r['today_seconds'])}, {r['ratio_today']:.1f}x)"})
    header = ["matrix", "dW", "W", "plugin path", "cond(W)", "plugin", "today's path (Gram)", "ratio today",
              "rel err", "one-off per matrix", "kept per matrix"]
    notes += [f"plugin: median of {args.repeats} after one warm-up, W0's Gram spectrum already kept; 'before' starts "
              "without a basis of dW (its own range finder); \"before, restraint's block\" is the first look as a "
              "session takes it (dW shared, Q and R from what the restraint's block captured: "
              "Restraint.captured); 'after' from what 'before' found and the restraint's factors (as in a "
              "session: ConditionNumbers.after_restraint); 'next before' is the "
              "next edit's 'before' (the restrained W plus one rank-one update of 3 x smax(W0)), starting from the "
              "basis 'after' found; with 'dW shared' formed outside the timer, as the session shares it with the "
              "restraint: 'after' and that row are what telemetry pays per edit along a sequence; today's path: "
              "one call at 4096x11008, otherwise the same. 'one-off' = gram_spectrum(W0) (Gram matrix + eigh), paid "
              "at the first condition number of a matrix; 'kept' = its bytes, kept for the session.",
              "rel err against float64 svdvals of W (against today's Gram value at 4096x11008); the estimate is "
              f"certified within {TARGET_RTOL:g}, the exact route within about 1e-6.",
              f"matrices below {ConditionNumbers().min_elements} elements always take the exact route (smoke mode forces the "
              "estimate on its tiny ones)."] + [c["text"] for c in checks]
    text = print_table(f"Condition numbers for telemetry (OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records, "checks": checks, "table": text}
