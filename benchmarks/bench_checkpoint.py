"""Benchmark 6: what checkpoints cost, and what the online restraint costs per edit along a long run.

- writing one checkpoint (safetensors of the edited matrix + manifest with the requests so far, fsync'd, renamed
  into place), reading it back with every checksum verified, and the process's peak RSS over 20 writes (it must
  not grow with the number of checkpoints);
- the online restraint's per-edit cost after 10, 100 and 200 rank-one edits (dW of rank 10 / 100 / 200), with
  the rank hint an online run has (the previous edit's rank).

What a checkpoint costs relative to the edits since the last one is measured by the long run itself
(docs/results.md): the plugin logs each write's seconds, telemetry has every edit's time.
"""
from __future__ import annotations

import math
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    fmt_bytes, fmt_seconds, make_original, make_update, one_matrix_model, previous_edit_state, print_table, timed,
)

NAME = "checkpoint"
SHAPES = [("SmolLM2-135M down_proj", 576, 1536), ("Llama-2-7B down_proj", 4096, 11008)]
SMOKE_SHAPES = [("smoke", 64, 256)]
ONLINE_SHAPE, SMOKE_ONLINE_SHAPE = ("SmolLM2-135M down_proj", 576, 1536), ("smoke", 64, 256)
ONLINE_COUNTS, SMOKE_ONLINE_COUNTS = [10, 100, 200], [2, 8, 16]
RSS_WRITES = 20
REQUESTS = 200  # the manifest lists every request applied so far


def run(args) -> dict[str, Any]:
    import torch

    from prune_plugin.checkpoint import model_identity, read_checkpoint, write_checkpoint

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shape:
        wanted = {tuple(int(x) for x in s.lower().split("x")) for s in args.shape}
        shapes = [s for s in shapes if (s[1], s[2]) in wanted] or shapes
    rows, records, checks = [], [], []
    root = Path(tempfile.mkdtemp(prefix="prune-bench-ckpt-"))
    try:
        for label, m, n in shapes:
            w0 = make_original(m, n, seed=0)
            model = one_matrix_model(w0)
            identity = model_identity(model, ["weight"])
            requests = [{"prompt": f"request {i} prompt is", "subject": f"subject {i}", "target_new": "target"}
                        for i in range(REQUESTS)]
            manifest = {"requests": requests, "hparams": {"layers": [5]}, "model": identity, "state": {}}
            folder = root / label.replace(" ", "_")
            count = iter(range(1, 10**6))
            write, path = timed(lambda: write_checkpoint(folder, next(count), {"weight": model.weight}, manifest),
                                repeats=args.repeats, warmup=1)
            read, loaded = timed(lambda: read_checkpoint(path).matrices(), repeats=args.repeats, warmup=1)
            exact = torch.equal(loaded["weight"], model.weight.detach())
            shutil.rmtree(folder)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            for i in range(RSS_WRITES):
                written = write_checkpoint(folder, i + 1, {"weight": model.weight}, manifest)
                disk = sum(p.stat().st_size for p in written.iterdir())
                if i:  # keep one on disk: RAM is what is measured here
                    shutil.rmtree(folder / f"edit-{i:06d}")
            growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            shutil.rmtree(folder)
            records.append({"shape": [m, n], "write_seconds": write.median, "read_seconds": read.median,
                            "disk_bytes": disk, "rss_growth_bytes": growth, "exact": exact})
            rows.append([f"{label} {m}x{n}", fmt_seconds(write.median), fmt_seconds(read.median), fmt_bytes(disk),
                         fmt_bytes(m * n * 4), fmt_bytes(growth)])
            checks.append({"what": f"checkpoint round trip {m}x{n}", "kind": "agreement", "ok": exact,
                           "text": f"{m}x{n}: the matrix read back equals the one written, bit for bit: {exact}"})
            # RAM must not grow with the number of checkpoints: at most one matrix's bytes over 20 writes
            ok = growth <= m * n * 4
            checks.append({"what": f"checkpoint memory {m}x{n}", "kind": "target", "ok": ok,
                           "text": f"TARGET RAM does not grow with checkpoints: peak RSS +{fmt_bytes(growth)} over "
                                   f"{RSS_WRITES} writes of a {fmt_bytes(m * n * 4)} matrix ({'MET' if ok else 'MISSED'})"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes = [f"median of {args.repeats} after one warm-up; the manifest lists {REQUESTS} requests; write = safetensors "
             "+ manifest + fsync + rename; read = manifest + SHA-256 of the file + load.",
             "disk per checkpoint = the edited matrices (float32 here) plus a manifest of a few KiB."] + \
            [c["text"] for c in checks]
    text = print_table(f"Checkpoint cost (OMP_NUM_THREADS={args.threads})",
                       ["matrix", "write", "read + verify", "disk per checkpoint", "matrix bytes",
                        f"peak RSS growth over {RSS_WRITES} writes"], rows, notes)
    online = _online_cost(args)
    return {"name": NAME, "records": records, "online": online["records"], "checks": checks + online["checks"],
            "table": text + "\n\n" + online["table"]}


def _online_cost(args) -> dict[str, Any]:
    import torch

    from prune_plugin.config import PruneConfig
    from prune_plugin.plugins import edit_session
    from prune_plugin.spectrum import largest_singular_value

    label, m, n = SMOKE_ONLINE_SHAPE if args.smoke else ONLINE_SHAPE
    counts = SMOKE_ONLINE_COUNTS if args.smoke else ONLINE_COUNTS
    w0 = make_original(m, n, seed=0)
    smax0 = largest_singular_value(w0)
    config = PruneConfig(prune=True, prune_alpha=math.e, prune_mode="online")
    rows, records, checks = [], [], []
    for r in counts:
        w = make_update(m, n, r, smax0, seed=r).add_(w0).to(torch.float32)
        model = one_matrix_model(w0)
        session = edit_session(model, config, ["weight"])
        session.begin()
        session.smax.put("weight", smax0)

        def setup() -> None:
            with torch.no_grad():
                model.weight.copy_(w)
            previous_edit_state(session, r)  # what the previous edit of an online run found

        per_edit, figures = timed(lambda: session.restrain_matrices(["weight"]), repeats=args.repeats, warmup=1,
                                  setup=setup)
        fig = figures["weight"]
        records.append({"edits": r, "rank": fig.rank, "path": fig.path, "per_edit_seconds": per_edit.median})
        rows.append([r, f"{fig.path} r={fig.rank}", fig.n_restrained, fmt_seconds(per_edit.median)])
        # exact rank rule: the restraint finds (and restrains) the values of dW >= smax(W0); count them independently
        over = int((torch.linalg.svdvals((w - w0).double()) >= smax0).sum())
        checks.append({"what": f"online rank {r}", "kind": "agreement",
                       "ok": fig.rank == fig.n_restrained == over and 0 < over <= min(r, m, n),
                       "text": f"{r} edits: values >= smax(W0) found {fig.rank} (float64 SVD: {over})"})
    notes = [f"{label} {m}x{n} float32, dW of rank r after r rank-one edits (as ROME leaves it), smax(W0) cached, "
             f"rank hint r - 1; median of {args.repeats} after one warm-up. Compare with one ROME edit on the same "
             "model (docs/results.md: seconds per edit)."] + [c["text"] for c in checks]
    text = print_table(f"Online restraint per edit along a long run (OMP_NUM_THREADS={args.threads})",
                       ["edits so far", "path, rank", "restrained", "per edit"], rows, notes)
    return {"records": records, "checks": checks, "table": text}
