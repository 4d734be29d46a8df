"""Benchmark 2: the plugin's per-edit overhead in a real ROME run on the embedded model.

Sequential ROME edits through EasyEdit's own editor (the installed generation) on the embedded SmolLM2-135M,
PRUNE online (a = e) with telemetry on (condition numbers included, the default), as a user's YAML switches it on.
Each edit is timed twice around the editor's apply_algo:

- the edit's own time: ROME alone (the algorithm the plugin's wrapper calls);
- the wrapped call: ROME plus everything the plugin does around it (before_edit's fingerprints, restraint,
  telemetry, and the guard when on).

plugin share = (wrapped - ROME) / ROME, median over the edits after the first (the first also pays smax(W0) once,
reported separately). A second arm adds the collapse guard (warn, 10 sentences), which is optional. Target: the
restraint + telemetry share below 2 %.

The ROME recipe is the main job's budget one (prune_plugin.experiment.BUDGET_OVERRIDES), so the edit's own time is
the one a user of the main job sees. --smoke runs two edits on prune_plugin.testing's tiny Llama instead.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import fmt_seconds, print_table

NAME = "rome_overhead"
EDITS, SMOKE_EDITS = 8, 3
TARGET = 0.02
ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "restraint + telemetry": {"prune_guard": "off"},
    "restraint + telemetry + guard (warn, 10 sentences)": {"prune_guard": "warn", "prune_guard_sentences": 10},
}


def _setup(smoke: bool, workdir: Path):
    """(model, tokenizer, base hparams dict, edit records) for the full run or the smoke run."""
    import yaml

    from prune_plugin.datasets import load_edit_records
    from prune_plugin.easyedit.driver import shipped_hparams
    from prune_plugin.experiment import BUDGET_OVERRIDES
    from prune_plugin.models import load_model

    if not smoke:
        model, tok = load_model(None)
        base = yaml.safe_load(shipped_hparams("ROME").read_text())
        base.update(BUDGET_OVERRIDES["ROME"])
        return model, tok, base, load_edit_records(None)[:EDITS], "embedded SmolLM2-135M, layer 6 down_proj 576x1536"
    from prune_plugin.testing import tiny_model_folder_with_rome_yaml

    folder, hparams = tiny_model_folder_with_rome_yaml(workdir)
    model, tok = load_model(folder)
    base = yaml.safe_load(hparams.read_text())
    facts = [("Toyota is a company from", "Toyota", "Germany", "Japan"),
             ("The Nile flows through", "The Nile", "Brazil", "Egypt"),
             ("The Amazon river is in", "The Amazon river", "Canada", "Brazil")]
    records = [{"case_id": i, "prompt": p, "subject": s, "target_new": new, "ground_truth": old, "rephrase_prompt": p,
                "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"}
               for i, (p, s, new, old) in enumerate(facts)]
    return model, tok, base, records[:SMOKE_EDITS], "tests' tiny Llama (hidden 32, 4 layers)"


def _recording_time(fn, into: list[float]):
    """fn, appending the seconds of each call to `into`."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return call


def _timed_editor(editor, session):
    """Re-wrap the editor's apply_algo so ROME alone and the whole wrapped call are timed separately."""
    from prune_plugin.easyedit.editor import sequence_of, wrap_apply_algo

    rome = editor.apply_algo.__wrapped__  # the algorithm the plugin's wrapper calls (functools.wraps)
    own, whole = [], []
    wrapped = wrap_apply_algo(_recording_time(rome, own), session, sequence_of(editor))
    editor.apply_algo = _recording_time(wrapped, whole)
    return own, whole


def _run_arm(model, tok, base: dict, keys: dict, records: list[dict], workdir: Path, label: str,
             index: int) -> dict[str, Any]:
    import torch
    import yaml

    import prune_plugin.easyedit as pe
    from prune_plugin.easyedit.driver import build_editor, edit_sequentially, load_hparams
    from prune_plugin.seeding import seed_everything as _seed

    telemetry = workdir / f"arm{index}.telemetry.jsonl"
    config = {**base, "prune": True, "prune_mode": "online", "prune_alpha": "e", "prune_telemetry": str(telemetry),
              **keys}
    path = workdir / "arm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _seed(0)
    editor = build_editor(load_hparams(path), model, tok)
    session = pe.session_of(editor)
    own, whole = _timed_editor(editor, session)
    edit_sequentially(editor, records)
    steps = list(session.steps)
    session.restore()
    if any(not torch.equal(p, w0[n]) for n, p in model.named_parameters()):
        raise RuntimeError("the model differs from W0 after restore(): the benchmark refuses to go on")
    parts = {what: [s.seconds.get(what, 0.0) for s in steps] for what in ("restraint", "telemetry", "guard")}
    return {"arm": label, "edits": len(own), "own_seconds": own, "wrapped_seconds": whole, "parts": parts,
            "restrained": sum(any(f.restrained for f in s.figures.values()) for s in steps)}


def run(args) -> dict[str, Any]:
    from prune_plugin.easyedit.driver import easyeditor_module

    import prune_plugin.easyedit as pe

    pe.activate(easyeditor_module())
    records_out, rows, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-rome-") as tmp:
        workdir = Path(tmp)
        model, tok, base, records, what = _setup(args.smoke, workdir)
        for index, (label, keys) in enumerate(ARMS.items()):
            if args.smoke and keys.get("prune_guard") != "off":
                keys = {**keys, "prune_guard_sentences": 4}
                label = label.replace("10 sentences", "4 sentences")
            rec = _run_arm(model, tok, base, keys, records, workdir, label, index)
            later = slice(1, None) if rec["edits"] > 1 else slice(None)
            own = rec["own_seconds"][later]
            extra = [w - o for w, o in zip(rec["wrapped_seconds"][later], own)]
            shares = [e / o for e, o in zip(extra, own)]
            part_share = {k: statistics.median(v / o for v, o in zip(vals[later], own)) for k, vals in rec["parts"].items()}
            rec.update(median_own=statistics.median(own), median_extra=statistics.median(extra),
                       median_share=statistics.median(shares), max_share=max(shares), part_shares=part_share,
                       first_extra=rec["wrapped_seconds"][0] - rec["own_seconds"][0])
            records_out.append(rec)
            rows.append([label, f"{rec['edits']} ({rec['restrained']} restrained)", fmt_seconds(rec["median_own"]),
                         fmt_seconds(rec["median_extra"]), f"{100 * rec['median_share']:.2f} %",
                         f"{100 * rec['max_share']:.2f} %",
                         " / ".join(f"{100 * part_share[k]:.2f} %" for k in ("restraint", "telemetry", "guard")),
                         fmt_seconds(rec["first_extra"])])
            finite = all(math.isfinite(x) and x >= 0 for x in rec["own_seconds"] + rec["wrapped_seconds"])
            checks.append({"what": f"rome overhead measured: {label}", "kind": "agreement",
                           "ok": finite and rec["edits"] == len(records) and rec["restrained"] > 0,
                           "text": f"{label}: {rec['edits']} ROME edits timed, {rec['restrained']} restrained, "
                                   "W0 restored bit-exactly"})
        del model
    lean = records_out[0]
    if not args.smoke:
        ok = lean["median_share"] < TARGET
        checks.append({"what": "rome overhead target", "kind": "target", "ok": ok,
                       "text": f"TARGET restraint + telemetry < 2 % of the ROME edit: {'MET' if ok else 'MISSED'} "
                               f"(median {100 * lean['median_share']:.2f} %, max {100 * lean['max_share']:.2f} %)"})
    notes = [
        f"{what}; ROME through the installed EasyEdit's editor, budget recipe, PRUNE online a = e, telemetry with "
        f"condition numbers. Medians over edits 2..{len(records)} (edit 1 also computes smax(W0) once: 'first edit extra').",
        "ROME = the algorithm's own time; plugin extra = wrapped call - ROME (fingerprints, restraint, telemetry, "
        "guard); share = extra / ROME per edit. Parts = the session's own timers (step.seconds) / ROME; 'restraint' "
        "includes the two condition numbers telemetry records, 'telemetry' is writing the record.",
    ] + [c["text"] for c in checks]
    header = ["arm", "edits", "ROME per edit", "plugin extra per edit", "share (median)", "share (max)",
              "parts: restraint / telemetry / guard", "first edit extra"]
    text = print_table(f"ROME per-edit overhead (OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records_out, "checks": checks, "table": text}
