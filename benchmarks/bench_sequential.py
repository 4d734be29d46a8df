"""Benchmark 3: how the restraint's cost grows over a sequence of rank-one edits.

After r rank-one edits (ROME adds one per edit) dW has rank r. One restraint of such a dW is timed at the
Llama-2-7B down_proj shape for r = 10, 100, 1000:

- per edit (online mode): `restrain_matrices`, smax(W0) cached, rank hint r - 1 and a basis of r - 1 of dW's
  directions (what the previous edit found: common.previous_edit_state);
- no hint: `restrain_matrices` with no rank hint and no basis, as the single restraint of 'final' mode after r
  edits (the sketch has to grow to r first);
- previous path: the per-edit path before commit 2496cd1 (benchmarks/previous_path.py), hint r - 1.

The official code's cost does not depend on r (three dense SVDs of the whole matrix; see the restraint benchmark).
A real online sequence through EditSession (before_edit / after_edit, 30 rank-one edits) is timed as well, so the
per-edit bookkeeping (fingerprints, hooks) is seen next to the restraint, and against today's path (the same edits
with prune_rank_rule: official, interleaved edit by edit), where the exact rule's kept basis is what it would be in
a run.
"""
from __future__ import annotations

import math
import time
from typing import Any

from .common import (
    fmt_ratio, fmt_seconds, make_original, make_update, one_matrix_model, previous_edit_state, print_table, timed,
)

NAME = "sequential"
SHAPE = ("Llama-2-7B down_proj", 4096, 11008)
SMOKE_SHAPE = ("smoke", 64, 256)
COUNTS = [10, 100, 1000]
SMOKE_COUNTS = [2, 8, 24]
SEQUENCE_EDITS, SMOKE_SEQUENCE_EDITS = 30, 4
ALPHA = math.e


def run(args) -> dict[str, Any]:
    import torch

    from prune_plugin.config import PruneConfig
    from prune_plugin.plugins import edit_session
    from prune_plugin.spectrum import largest_singular_value

    from .previous_path import previous_restrain_matrices

    label, m, n = SMOKE_SHAPE if args.smoke else SHAPE
    counts = SMOKE_COUNTS if args.smoke else COUNTS
    notes = []
    if args.max_edits is not None:
        skipped = [c for c in counts if c > args.max_edits]
        counts = [c for c in counts if c <= args.max_edits]
        if skipped:
            notes.append(f"skipped {skipped} edits (--max-edits {args.max_edits})")
    big = m * n > 1_000_000
    repeats = args.repeats if args.smoke else max(1, min(args.repeats, 3))
    w0 = make_original(m, n, seed=0)
    t0 = time.perf_counter()
    smax0 = largest_singular_value(w0)
    smax_seconds = time.perf_counter() - t0
    config = PruneConfig(prune=True, prune_alpha=ALPHA, prune_mode="online", prune_never_enlarge=False)
    rows, records = [], []
    for r in counts:
        w = make_update(m, n, r, smax0, seed=r).add_(w0).to(torch.float32)
        model = one_matrix_model(w0)
        session = edit_session(model, config, ["weight"])
        session.begin()
        session.smax.put("weight", smax0)  # cached, as after the first edit (computed once above, not per count)
        param = model.weight

        def setup(hint: int) -> None:
            with torch.no_grad():
                param.copy_(w)
            previous_edit_state(session, hint + 1)

        per_edit, figures = timed(lambda: session.restrain_matrices(["weight"]), repeats=repeats, warmup=1,
                                  setup=lambda: setup(r - 1), collect=big)
        fig = figures["weight"]
        cold, cold_figures = timed(lambda: session.restrain_matrices(["weight"]), repeats=repeats, warmup=1,
                                   setup=lambda: setup(0), collect=big)
        cold_fig = cold_figures["weight"]
        previous, _ = timed(lambda: previous_restrain_matrices(session, ["weight"]), repeats=repeats, warmup=1,
                            setup=lambda: setup(r - 1), collect=big)
        records.append({"edits": r, "rank": fig.rank, "path": fig.path, "n_restrained": fig.n_restrained,
                        "per_edit_seconds": per_edit.median, "previous_seconds": previous.median,
                        "no_hint_seconds": cold.median, "no_hint_path": cold_fig.path, "no_hint_rank": cold_fig.rank})
        del w, model, session, param
    base = records[0] if records else None
    for rec in records:
        growth = rec["per_edit_seconds"] / base["per_edit_seconds"]
        rows.append([rec["edits"], f"{rec['path']} r={rec['rank']}", rec["n_restrained"], fmt_seconds(rec["per_edit_seconds"]),
                     f"{fmt_seconds(rec['no_hint_seconds'])} ({rec['no_hint_path']})", fmt_seconds(rec["previous_seconds"]),
                     fmt_ratio(growth), f"{rec['edits'] / base['edits']:.0f}x"])
    checks = [{"what": f"sequential rank {rec['edits']}", "kind": "agreement",
               # exact rank rule: `rank` = the values >= smax(W0), all restrained, the same with or without a hint
               "ok": rec["rank"] == rec["n_restrained"] == rec["no_hint_rank"] and 0 < rec["rank"] <= rec["edits"],
               "text": f"{rec['edits']} edits: values >= smax(W0) found {rec['rank']} (hinted) / {rec['no_hint_rank']} "
                       "(no hint)"}
              for rec in records]
    sequence = _online_sequence(args, m, n, w0, smax0, config)
    if not args.smoke and records and records[-1]["edits"] >= 1000:
        last, first = records[-1], records[0]
        ratio = last["per_edit_seconds"] / first["per_edit_seconds"]
        rank_ratio = last["edits"] / first["edits"]
        ok = ratio <= rank_ratio
        checks.append({"what": "sequential growth", "kind": "target", "ok": ok,
                       "text": f"TARGET cost grows with the rank, not with m*n*min(m,n): rank x{rank_ratio:.0f} -> per-edit "
                               f"time x{ratio:.1f} (at most linear in the rank: {'MET' if ok else 'MISSED'}); "
                               f"{last['edits']} edits cost {last['per_edit_seconds']:.1f} s against "
                               f"{first['per_edit_seconds']:.1f} s for {first['edits']}"})
    notes += [
        f"{label} {m}x{n}, float32; smax(W0) computed once ({fmt_seconds(smax_seconds)}) and cached. Median of {repeats} "
        "after one warm-up.",
        "growth = per-edit time / per-edit time at the fewest edits; the rank grows as the edit count. The official "
        "recipe's cost does not depend on the rank (three dense SVDs; see the restraint table).",
        f"real online sequence of {sequence['edits']} rank-one edits through EditSession (after_edit, median per edit): "
        f"{fmt_seconds(sequence['after_edit'])} of which restraint {fmt_seconds(sequence['restraint'])} and bookkeeping "
        f"(fingerprints, hooks) {fmt_seconds(sequence['after_edit'] - sequence['restraint'])}; today's path (the same "
        f"edits, prune_rank_rule: official, interleaved edit by edit) restrains in {fmt_seconds(sequence['today_restraint'])}: "
        f"plugin / today {sequence['plugin_over_today']:.2f} (median of the per-edit ratios).",
    ] + [c["text"] for c in checks]
    header = ["edits", "path, rank", "restrained", "per edit (restrain_matrices)", "no hint (path)",
              "previous path per edit", "growth", "rank growth"]
    text = print_table(f"Restraint cost along a sequence of rank-one edits (OMP_NUM_THREADS={args.threads})",
                       header, rows, notes)
    return {"name": NAME, "records": records, "sequence": sequence, "checks": checks, "table": text}


def _online_sequence(args, m, n, w0, smax0, config) -> dict[str, Any]:
    """A real online run: before_edit, a rank-one edit of W (u v^T of strength 3 smax(W0)), after_edit; the same
    edits through a second session with prune_rank_rule: official (today's path), the two interleaved edit by
    edit, so that the per-edit ratio of their restraints is measured under the same load."""
    import dataclasses
    import statistics

    import torch

    from prune_plugin.plugins import edit_session

    from .common import one_matrix_model

    edits = SMOKE_SEQUENCE_EDITS if args.smoke else SEQUENCE_EDITS
    today = dataclasses.replace(config, prune_rank_rule="official")
    runs = []
    for cfg in (config, today):
        model = one_matrix_model(w0)
        runs.append((model, edit_session(model, cfg, ["weight"]), {"totals": [], "restraint": [], "restrained": 0}))
    g = torch.Generator().manual_seed(123)
    for i in range(edits):
        u = torch.randn(m, 1, generator=g)
        v = torch.randn(1, n, generator=g)
        for model, session, out in runs:
            session.before_edit()
            with torch.no_grad():
                model.weight.addmm_(u / u.norm(), v / v.norm(), alpha=3.0 * smax0)
            t0 = time.perf_counter()
            step = session.after_edit({"prompt": f"edit {i}"})
            out["totals"].append(time.perf_counter() - t0)
            out["restraint"].append(step.seconds.get("restraint", 0.0))
            out["restrained"] += int(step.figures["weight"].restrained)
    for _, session, _ in runs:
        session.end()
    (_, _, plugin), (_, _, official) = runs
    # The first edit of a fresh session computes smax(W0) and has no rank hint: left out of the medians.
    return {"edits": edits, "after_edit": statistics.median(plugin["totals"][1:]),
            "restraint": statistics.median(plugin["restraint"][1:]), "first_after_edit": plugin["totals"][0],
            "restrained_edits": plugin["restrained"], "today_restraint": statistics.median(official["restraint"][1:]),
            "plugin_over_today": statistics.median(a / b for a, b in zip(plugin["restraint"][1:], official["restraint"][1:]))}
