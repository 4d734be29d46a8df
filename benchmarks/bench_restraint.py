"""Benchmark 1: cost of one restraint, plugin against the official float32 numpy code, on the same dW.

Per shape: W0 with a down_proj-like spectrum (Gaussian bulk + a few spikes, smax(W0) ~ 11), and dW of three kinds:
rank r (a sum of r rank-one updates with strengths 0.3-6 x smax(W0), as r sequential ROME edits leave it),
'ftK' (full rank, as fine-tuning leaves it: a Gaussian bulk at 0.5 x smax(W0) plus K directions at 1.2-6 x
smax(W0), so exactly K values are restrained), and 'full' (full rank with half its values above smax(W0)). The
plugin runs through what an edit runs (`restrain_matrices` of an `EditSession`, the exact rank rule), measured:

- first edit: a fresh session, so smax(W0) is computed and there is no rank hint (one-off per matrix);
- per edit: the same session again, smax(W0) cached, the rank hint of the previous call set and its basis less
  one direction (common.previous_edit_state: the first block's fresh columns must catch it, as they catch what
  each new edit adds);
- today's path: the same with `prune_rank_rule: official`, the sketch-to-numerical-rank path the plugin used before
  the exact rule (identical to it for float32 weights, whose storage floor is below numpy's tolerance).

The per-edit path before commit 2496cd1 (benchmarks/previous_path.py: dense float64 dW and result around the same
restraint core) is timed on the same input too. The official baseline (benchmarks/official.py) does its three dense
SVD-family calls every time.
"""
from __future__ import annotations

import math
from typing import Any

from .common import (
    MATRIX_SHAPES,
    select_shapes,
    Timing,
    fmt_err,
    fmt_ratio,
    fmt_seconds,
    make_full_rank_update,
    make_original,
    make_update,
    one_matrix_model,
    paired_ratio,
    previous_edit_state,
    print_table,
    relative_difference,
    timed,
)

NAME = "restraint"
ALPHA = math.e

SHAPES = MATRIX_SHAPES
SMOKE_SHAPES = [("smoke A", 48, 128), ("smoke B", 96, 64)]
RANKS: list[Any] = [1, 10, 100, "ft32", "full"]
SMOKE_RANKS: list[Any] = [1, 5, "ft4", "full"]
LARGE = 20_000_000  # elements; above this a dense SVD takes minutes on this class of machine

#: Below this per-call time, plugin / today comes from at least FAST_PAIRS interleaved pairs of calls.
FAST_CALL = 0.2
FAST_PAIRS = 21

TARGET_RATIO = 100.0
TARGET_FULL_RANK_RATIO = 30.0
TARGET_AGREEMENT = 1e-5


def adaptive(fn, *, repeats: int, budget: float, setup=None, collect: bool = False) -> tuple[Timing, Any]:
    """Time fn: the first call is the warm-up when `repeats` more fit in `budget` seconds; otherwise the first call
    is the only measured one (the table says so in its 'runs' column)."""
    import time

    if setup is not None:
        setup()
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    if first * repeats > budget or repeats == 0:
        return Timing(samples=[first], warmup=0), result
    timing, result = timed(fn, repeats=repeats, warmup=0, setup=setup, collect=collect)
    timing.warmup = 1
    return timing, result


def _delta(m: int, n: int, rank: Any, smax0: float):
    """(dW in float64, its nominal rank) for a RANKS entry."""
    if rank == "full":
        return make_update(m, n, min(m, n), smax0, seed=min(m, n)), min(m, n)
    if isinstance(rank, str) and rank.startswith("ft"):
        return make_full_rank_update(m, n, int(rank[2:]), smax0, seed=int(rank[2:])), min(m, n)
    return make_update(m, n, rank, smax0, seed=rank), rank


def run(args) -> dict[str, Any]:
    import torch

    from prune_plugin.config import PruneConfig
    from prune_plugin.restraint import restrain_dense_reference
    from prune_plugin.plugins import edit_session
    from prune_plugin.spectrum import largest_singular_value

    from .official import official_restrain
    from .previous_path import previous_restrain_matrices

    shapes = select_shapes(SMOKE_SHAPES if args.smoke else SHAPES, args.shape)
    ranks = SMOKE_RANKS if args.smoke else RANKS
    if getattr(args, "dw", None):
        ranks = [int(k) if k.isdigit() else k for k in args.dw]
    repeats = args.repeats
    rows, records, notes = [], [], []
    config = PruneConfig(prune=True, prune_alpha=ALPHA, prune_mode="online", prune_never_enlarge=False)
    today = PruneConfig(prune=True, prune_alpha=ALPHA, prune_mode="online", prune_never_enlarge=False,
                        prune_rank_rule="official")
    for label, m, n in shapes:
        large = m * n > LARGE
        big = m * n > 1_000_000
        w0 = make_original(m, n, seed=0)
        smax_timing, smax0 = timed(lambda: largest_singular_value(w0), repeats=1 if large else repeats, warmup=0 if large else 1)
        w0_np = w0.numpy()
        for rank in ranks:
            if rank == "full" and large and not args.full_rank_large:
                notes.append(f"{label}: 'full' dW skipped (half of its values reach smax(W0), so the exact rule takes "
                             f"the dense float64 SVD of {m}x{n}, tens of minutes here like the official code; "
                             "--full-rank-large runs it)")
                continue
            delta, r = _delta(m, n, rank, smax0)
            w = delta.add_(w0).to(torch.float32)
            del delta
            # The official float32 code first (its dense SVDs are the memory peak of this benchmark).
            official_timing, (w_official, parts, info) = adaptive(
                lambda: official_restrain(w0_np, w.numpy(), ALPHA), repeats=repeats, budget=args.budget, collect=big)
            w_official = torch.from_numpy(w_official)
            model = one_matrix_model(w0)
            param = model.weight

            def put_w() -> None:
                with torch.no_grad():
                    param.copy_(w)

            # First edit: fresh session (W0 copy taken by begin(), outside the timer), smax and no hint inside.
            holder: dict[str, Any] = {}

            def fresh_session() -> None:
                with torch.no_grad():
                    param.copy_(w0)
                holder["s"] = edit_session(model, config, ["weight"])
                holder["s"].begin()
                put_w()

            first_timing, _ = adaptive(lambda: holder["s"].restrain_matrices(["weight"]),
                                       repeats=repeats, budget=args.budget, setup=fresh_session, collect=big)
            session = holder["s"]
            # Per edit: smax cached, rank hint from the previous call.
            def next_edit() -> None:
                put_w()
                previous_edit_state(session)

            per_edit, figures = timed(lambda: session.restrain_matrices(["weight"]),
                                      repeats=repeats, warmup=1, setup=next_edit, collect=big)
            fig = figures["weight"]
            w_plugin = param.detach().clone()
            # Today's path: the official rank rule through the same machinery (its own session, smax cached). On a
            # full-rank dW it is the dense float64 SVD, minutes at the largest shape: skipped there.
            today_timing = today_fig = w_today = paired = None
            if not (large and r == min(m, n) and not args.full_rank_large):
                today_session = edit_session(model, today, ["weight"])
                with torch.no_grad():
                    param.copy_(w0)
                today_session.begin()
                today_session.smax.put("weight", smax0)
                today_timing, today_figures = adaptive(lambda: today_session.restrain_matrices(["weight"]),
                                                       repeats=repeats, budget=args.budget, setup=put_w, collect=big)
                if len(today_timing.samples) > 1:  # the hinted steady state, as for the plugin
                    today_timing, today_figures = timed(lambda: today_session.restrain_matrices(["weight"]),
                                                        repeats=repeats, warmup=0, setup=put_w, collect=big)
                today_fig = today_figures["weight"]
                w_today = param.detach().clone()
                if len(today_timing.samples) > 1:
                    # plugin / today from interleaved calls: calls of a few ms to a second, where the two timed
                    # blocks' medians move with load and block order by more than the paths differ
                    pairs = repeats if per_edit.median > FAST_CALL else max(repeats, FAST_PAIRS)
                    paired, _, _ = paired_ratio(lambda: session.restrain_matrices(["weight"]),
                                                lambda: today_session.restrain_matrices(["weight"]), pairs=pairs,
                                                setup_a=next_edit, setup_b=put_w, collect=big)
                del today_session
            else:
                notes.append(f"{label} {rank}: today's path not run (the dense float64 SVD of {m}x{n}; "
                             "--full-rank-large runs it)")
            previous, _ = timed(lambda: previous_restrain_matrices(session, ["weight"]),
                                repeats=repeats, warmup=1, setup=put_w, collect=big)
            err_previous = relative_difference(param.detach().double() - w0.double(), w_plugin.double() - w0.double())
            d_plugin = w_plugin.double() - w0.double()
            d_official = w_official.double() - w0.double()
            err_dw = relative_difference(d_plugin, d_official)
            err_w = relative_difference(w_plugin, w_official)
            err_today = None if w_today is None else relative_difference(w_today.double() - w0.double(), d_official)
            err_ref_plugin = err_ref_official = None
            if not large or args.reference_large:
                reference = restrain_dense_reference(w - w0, smax0, ALPHA, never_enlarge=False, rank_rule="exact")
                err_ref_plugin = relative_difference(d_plugin, reference)
                err_ref_official = relative_difference(d_official, reference)
                del reference
            ratio_edit = official_timing.median / per_edit.median
            ratio_first = official_timing.median / first_timing.median
            record = {
                "shape": [m, n], "label": label, "rank": r, "kind": str(rank), "rank_found": fig.rank,
                "official_rank": info["rank"], "path": fig.path, "n_restrained": fig.n_restrained,
                "official_n_restrained": info["n_restrained"], "today_path": None if today_fig is None else today_fig.path,
                "smax0": smax0, "smax_seconds": smax_timing.median,
                "first_edit_seconds": first_timing.median, "per_edit_seconds": per_edit.median,
                "today_seconds": None if today_timing is None else today_timing.median,
                "previous_seconds": previous.median,
                "official_seconds": official_timing.median, "official_runs": len(official_timing.samples),
                "official_parts": {"svd_delta": parts.svd_delta, "svd_w0": parts.svd_original, "matrix_rank": parts.matrix_rank},
                "ratio_per_edit": ratio_edit, "ratio_first_edit": ratio_first,
                "ratio_today": None if today_timing is None else official_timing.median / today_timing.median,
                "plugin_over_today": paired,
                "plugin_over_today_blocks": None if today_timing is None else per_edit.median / today_timing.median,
                "ratio_previous": official_timing.median / previous.median,
                "err_dw_vs_official": err_dw, "err_w_vs_official": err_w, "err_previous_vs_plugin": err_previous,
                "err_today_vs_official": err_today,
                "err_dw_plugin_vs_reference": err_ref_plugin, "err_dw_official_vs_reference": err_ref_official,
                "spread_per_edit": per_edit.spread,
            }
            records.append(record)
            rows.append([
                f"{label} {m}x{n}", str(rank), f"{fig.path} k={fig.rank}", f"{fig.n_restrained} ({info['n_restrained']})",
                fmt_seconds(smax_timing.median), fmt_seconds(first_timing.median), fmt_seconds(per_edit.median),
                "-" if today_timing is None else f"{fmt_seconds(today_timing.median)} ({today_fig.path})",
                f"{fmt_seconds(official_timing.median)} (n={len(official_timing.samples)})",
                fmt_ratio(ratio_edit), fmt_ratio(ratio_first), fmt_ratio(record["ratio_today"]),
                "-" if paired is None else f"{paired:.2f}", fmt_seconds(previous.median),
                fmt_err(err_dw), fmt_err(err_w), fmt_err(err_previous),
                "-" if err_ref_plugin is None else f"{err_ref_plugin:.1e} / {err_ref_official:.1e}",
            ])
            del w, model, param, session, holder, w_plugin, w_official, d_plugin, d_official, w_today
        del w0, w0_np
    header = ["matrix", "dW", "path, k", "restrained (official)", "smax(W0) once", "plugin 1st edit",
              "plugin per edit", "today's path per edit", "official", "ratio/edit", "ratio 1st", "ratio today",
              "plugin / today", "previous path per edit", "rel dW vs off.", "rel W vs off.", "previous vs plugin",
              "rel dW vs f64 exact ref (plugin/off.)"]
    checks = _checks(records, args.smoke)
    notes = notes + [
        "dW: r = rank r (r rank-one updates); ftK = full rank, bulk at 0.5 x smax(W0) plus K values above it; full = full "
        "rank with half its values above smax(W0). k = singular triplets the exact rule computed (the values >= smax(W0)).",
        "ratio = official median / plugin median on the same dW; 'per edit' = restrain_matrices with smax(W0) cached, "
        "the previous call's rank hint and its basis less one direction (common.previous_edit_state); '1st edit' = fresh "
        "session (smax(W0) computed, no hint, no basis); 'today' = the same with prune_rank_rule: official (the path "
        "before the exact rule); plugin / today = median of per-pair time ratios over interleaved calls (plugin, today, "
        f"plugin, ...; {repeats} pairs, at least {FAST_PAIRS} below {FAST_CALL} s a call).",
        "'previous path' = the per-edit path before commit 2496cd1 (benchmarks/previous_path.py), same input and hint; "
        "'previous vs plugin' = rel dW between their results.",
        "rel dW = ||dW_plugin - dW_official||_F / ||dW_official||_F with dW = W_restrained - W0; rel W the same on W; "
        "the f64 exact reference = F on the whole float64 spectrum of the stored dW.",
        "official n=1: a single measured call (no warm-up), because one call exceeded the time budget "
        f"({args.budget:.0f} s for {repeats} repeats); otherwise median of {repeats} after one warm-up.",
    ] + [c["text"] for c in checks]
    text = print_table(f"Restraint cost per matrix (alpha = e, OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records, "checks": checks, "table": text}


def _checks(records: list[dict], smoke: bool) -> list[dict]:
    checks = []
    for r in records:
        # The exact rule's reference is the float64 formula over the whole spectrum; where it was computed, the
        # official recipe may differ from the plugin by its own distance to it (its truncation drops small values).
        if r["err_dw_plugin_vs_reference"] is not None:
            agree = r["err_dw_plugin_vs_reference"] <= 1e-6 and (
                r["err_dw_vs_official"] <= TARGET_AGREEMENT + 2 * r["err_dw_official_vs_reference"])
        else:
            agree = r["err_dw_vs_official"] <= TARGET_AGREEMENT
        agree = agree and r["err_previous_vs_plugin"] <= 1e-7
        same_count = r["n_restrained"] == r["official_n_restrained"]
        checks.append({"what": f"agreement {r['label']} {r['kind']}", "ok": bool(agree and same_count),
                       "text": f"agreement {r['label']} {r['kind']}: rel dW {r['err_dw_vs_official']:.1e} vs official "
                               f"(<= 1e-5), vs f64 exact reference "
                               f"{'-' if r['err_dw_plugin_vs_reference'] is None else format(r['err_dw_plugin_vs_reference'], '.1e')} "
                               f"(<= 1e-6; the official's own distance to it "
                               f"{'-' if r['err_dw_official_vs_reference'] is None else format(r['err_dw_official_vs_reference'], '.1e')}): "
                               f"{'yes' if agree else 'NO'}; same restrained count: {'yes' if same_count else 'NO'}",
                       "kind": "agreement"})
    if not smoke:
        target = [r for r in records if r["shape"] == [4096, 11008]]
        for r in target:
            if r["kind"].startswith("ft"):
                ok = r["ratio_per_edit"] >= TARGET_FULL_RANK_RATIO and r["err_dw_vs_official"] <= TARGET_AGREEMENT
                checks.append({"what": f"target 4096x11008 {r['kind']}", "ok": bool(ok), "kind": "target",
                               "text": f"TARGET 4096x11008 full-rank {r['kind']} ({r['n_restrained']} values >= smax(W0)): "
                                       f">= 30x the official recipe per edit: {'MET' if ok else 'MISSED'} "
                                       f"({r['ratio_per_edit']:.0f}x per edit, {r['ratio_first_edit']:.0f}x first edit; "
                                       f"today's path {'-' if r['ratio_today'] is None else format(r['ratio_today'], '.1f') + 'x'}; "
                                       f"rel dW {r['err_dw_vs_official']:.1e})"})
            elif r["kind"] != "full":
                ok = r["ratio_per_edit"] >= TARGET_RATIO and r["err_dw_vs_official"] <= TARGET_AGREEMENT
                checks.append({"what": f"target 4096x11008 rank {r['rank']}", "ok": bool(ok), "kind": "target",
                               "text": f"TARGET 4096x11008 r={r['rank']}: >= 100x and <= 1e-5: "
                                       f"{'MET' if ok else 'MISSED'} ({r['ratio_per_edit']:.0f}x per edit, "
                                       f"{r['ratio_first_edit']:.0f}x first edit; today's path {r['ratio_today']:.0f}x, "
                                       f"plugin / today {'-' if r['plugin_over_today'] is None else format(r['plugin_over_today'], '.2f')}; "
                                       f"rel dW {r['err_dw_vs_official']:.1e})"})
        for r in records:  # issue 13: the exact rule no slower than the path it replaced, on low-rank dW
            if isinstance(r["kind"], str) and r["kind"].isdigit() and r["plugin_over_today"] is not None:
                ok = r["plugin_over_today"] <= 1.0
                checks.append({"what": f"target low-rank {r['label']} rank {r['rank']}", "ok": bool(ok), "kind": "target",
                               "text": f"TARGET {r['label']} r={r['rank']}: the exact rule no slower than today's path: "
                                       f"{'MET' if ok else 'MISSED'} (plugin / today {r['plugin_over_today']:.2f}, "
                                       "interleaved pairs)"})
    return checks
