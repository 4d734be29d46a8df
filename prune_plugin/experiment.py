"""The main job: edit a model fact after fact through EasyEdit once, with checkpoints; branch at each checkpoint
into no restraint and every PRUNE base (edit once, restrain many); evaluate every branch with the lm-eval tasks;
write curves (each metric against the number of edits, one line per arm), a table, JSON results and plots.

Each editing run is configured by an ordinary EasyEdit hparams YAML written into the output folder
(`<out>/<run>.yaml` reproduces it) and writes its checkpoints under `<out>/checkpoints/<run>/`. Editing writes
checkpoints and evaluation only reads them: `--resume` continues an interrupted run where it stopped, and
`prune-plugin eval CHECKPOINT@ALPHA --tasks ...` evaluates any saved state later with other tasks.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .restraint import Alpha

LOG = logging.getLogger("prune_plugin")
METHODS = ("ROME", "MEMIT", "FT")
EVAL_TASKS = ["hardedit", "collapse_ppl", "prune_general"]
# PRUNE's general-ability tasks (about a thousand greedy generations with the official files) are evaluated only
# at JobOptions.general_at; every other task at every checkpoint.
GENERAL_TASKS = ("prune_general", "prune_reasoning", "prune_summarization", "prune_open_qa", "prune_nli")


def _table_rows() -> list[tuple[str, str, str]]:
    """(task, metric key in lm-eval's results, label) for the side-by-side table: each group's headline numbers
    (lmeval.HEADLINE_METRICS), plus lm-eval's own perplexities of the collapse sentences."""
    from .lmeval import HEADLINE_METRICS

    rows = []
    for group, headline in HEADLINE_METRICS.items():
        rows += [(task, f"{metric},none", label) for task, metric, label in headline]
        if group == "collapse_ppl":
            rows += [("collapse_ppl_rolling", "word_perplexity,none", "word perplexity (lm-eval)"),
                     ("collapse_ppl_rolling", "bits_per_byte,none", "bits per byte (lm-eval)")]
    return rows


TABLE_ROWS = _table_rows()


@dataclass
class JobOptions:
    method: str = "ROME"
    edits: int = 12
    alphas: tuple = (math.e, 1.2)  # one PRUNE arm per base, all from the one editing run
    mode: str = "final"  # 'online' adds one arm per base that restrains after every edit (its own editing run)
    model: str | None = None
    hparams: str | None = None
    data: str | None = None
    out: str = "prune-results"
    seed: int = 0
    guard_factor: float = 5.0
    guard_sentences: int = 10
    eval_sentences: int = 100
    checkpoints: tuple | None = None  # edit counts to evaluate at (0 = the unedited model); None: 4 evenly spaced
    tasks: tuple = tuple(EVAL_TASKS)  # lm-eval tasks evaluated on every branch
    general_at: tuple | None = None  # edit counts at which GENERAL_TASKS are evaluated; None: 0 and the last
    prune_tasks_dir: str | None = None  # PRUNE's four official task files (else prune_general's small shipped sets)
    resume: bool = False  # continue the editing runs from their checkpoints; keep evaluations already done
    easyedit_metrics: bool = True  # EasyEdit's own pre/post scoring of every request (a tenth of a long CPU run)


# The shipped ROME YAML is ROME's own recipe (25 steps, 21 context templates): about 95 s of CPU per edit on
# SmolLM2. The main job trades some of that for sequence length (measured: about 17 s per edit, and the edits
# still take). Written into each arm's YAML, so the YAML in the output folder is exactly what ran.
BUDGET_OVERRIDES = {"ROME": {"v_num_grad_steps": 15, "context_template_length_params": [[5, 5]]},
                    "MEMIT": {"v_num_grad_steps": 15}}


def checkpoint_counts(options: JobOptions) -> list[int]:
    """The edit counts evaluated: 0 (the unedited model), the requested ones, and the last edit."""
    if options.checkpoints is None:
        step = max(1, options.edits // 4)
        counts = list(range(step, options.edits + 1, step))
    else:
        counts = [c for c in options.checkpoints if c <= options.edits]
    return sorted({0, *counts, options.edits})


def tasks_at(options: JobOptions, count: int) -> list[str]:
    """The tasks evaluated at `count` edits: GENERAL_TASKS at general_at, the others at every checkpoint."""
    general = {0, options.edits} if options.general_at is None else set(options.general_at)
    return [t for t in options.tasks if t not in GENERAL_TASKS or count in general]


@dataclass
class EditingRun:
    """One editing run: its YAML, telemetry and checkpoint folder; the arms that branch off its checkpoints."""

    name: str
    keys: dict[str, Any]
    branches: dict[str, Any] = field(default_factory=dict)  # arm name -> PRUNE base applied at each checkpoint (None: as saved)


def plan_editing_runs(options: JobOptions) -> list[EditingRun]:
    """The editing runs: one without restraint, branched into no restraint and every PRUNE base ('final' mode);
    with mode 'online', one more run per base that restrains after every edit."""
    label = (lambda prefix, a: prefix if len(options.alphas) == 1 else f"{prefix}-a={_alpha_yaml(a)}")
    edit = EditingRun("edits", {"prune": False}, {"no-restraint": None})
    for alpha in options.alphas:
        edit.branches[label("prune", alpha)] = alpha
    runs = [edit]
    if options.mode == "online":
        for alpha in options.alphas:
            name = label("prune-online", alpha)
            runs.append(EditingRun(name, {"prune": True, "prune_alpha": _alpha_yaml(alpha), "prune_mode": "online"},
                                      {name: None}))
    return runs


def run_job(options: JobOptions) -> dict[str, Any]:
    """Edit once per sequence with checkpoints, then evaluate every arm at every checkpoint; return (and write)
    the results. Editing writes checkpoints; evaluation only reads them, so either can be redone alone."""
    import yaml

    from .datasets import load_edit_records, load_reference_sentences, write_json
    from .easyedit.covariance import prepare_statistics, statistics_dir
    from .easyedit.driver import easyeditor_module, load_hparams, shipped_hparams
    from .models import load_model

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_edit_records(options.data)[: options.edits]
    if any(t in GENERAL_TASKS for t in options.tasks):
        check_prune_tasks(options.prune_tasks_dir)  # a bad file fails now, not after the editing run
    if len(records) < options.edits:
        raise ValueError(f"--edits {options.edits}: the edit records hold only {len(records)}")
    sentences = load_reference_sentences()
    sample = sentences[:: max(1, len(sentences) // options.eval_sentences)][: options.eval_sentences]
    eval_corpus = write_json(out / "eval_sentences.json", [{"Corpus": "reference", "Text": t} for t in sample])

    easyeditor = easyeditor_module()
    import prune_plugin.easyedit as pe

    pe.activate(easyeditor)
    model, tok = load_model(options.model)
    base_yaml = yaml.safe_load(Path(options.hparams or shipped_hparams(options.method)).read_text())
    if not options.hparams:
        base_yaml.update(BUDGET_OVERRIDES.get(options.method, {}))
    if base_yaml.get("alg_name") != options.method:
        raise ValueError(f"{options.hparams}: alg_name is {base_yaml.get('alg_name')!r}, not {options.method!r}")
    hparams_path = options.hparams or shipped_hparams(options.method)
    if prepare_statistics(model, tok, load_hparams(hparams_path), sentences):
        base_yaml["stats_dir"] = str(statistics_dir())  # where prepare_statistics put them; the arms' YAMLs say so

    counts = checkpoint_counts(options)
    runs = plan_editing_runs(options)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_path = out / "editing.json"
    editing = _read_json_or(state_path, {}) if options.resume else {}
    for run in runs:
        editing[run.name] = _edit_sequence(run, options, model, tok, records, base_yaml, counts, out,
                                           editing.get(run.name, {}))
        write_json(state_path, editing)
        _check_w0(model, w0)

    evaluations_path = out / "evaluations.json"
    evaluations = _read_json_or(evaluations_path, {}) if options.resume else {}
    for count in counts:
        subset = write_json(out / f"edited_records_{count}.json", records[:count] if count else records)
        metadata = {"hardedit_path": str(subset), "collapse_path": str(eval_corpus)}
        if options.prune_tasks_dir:
            metadata["prune_tasks_dir"] = str(options.prune_tasks_dir)
        tasks = tasks_at(options, count)
        for run in runs:
            for arm, alpha in run.branches.items():
                key = "unedited@0" if count == 0 else f"{arm}@{count}"
                # evaluations written before the "tasks" field held hardedit and collapse_ppl
                done = evaluations.get(key, {}).get("tasks", ["hardedit", "collapse_ppl"] if key in evaluations else [])
                missing = [t for t in tasks if t not in done]  # a resumed run may add tasks (prune_general)
                if not missing:
                    continue
                LOG.info("evaluating %s: %s", key, ", ".join(missing))
                found = _evaluate_branch(model, tok, out / "checkpoints" / run.name, count, alpha, metadata, missing)
                if key in evaluations:
                    found["metrics"] = {**evaluations[key]["metrics"], **found["metrics"]}
                evaluations[key] = {**found, "tasks": [*done, *missing]}
                write_json(evaluations_path, evaluations)  # each branch kept as soon as it is measured
                _check_w0(model, w0)

    results = collect_results(options, runs, counts, editing, evaluations, len(records))
    write_json(out / "results.json", results)
    (out / "table.md").write_text(format_table(results) + "\n")
    from .plots import plot_curves

    results["plots"] = [str(p) for p in plot_curves(results["curves"], out)]
    write_json(out / "results.json", results)
    return results


def check_prune_tasks(folder: str | None) -> None:
    """Read prune_general's four files from `folder` (or where the task would find them): a missing or malformed
    file is an error naming the file, the record and the field."""
    from .datasets import (load_nli_records, load_open_qa_records, load_reasoning_records,
                           load_summarization_records)

    for load in (load_reasoning_records, load_summarization_records, load_open_qa_records, load_nli_records):
        load(folder)


def _edit_sequence(run: EditingRun, options: JobOptions, model, tok, records, base_yaml, counts, out: Path,
                   previous: dict[str, Any]) -> dict[str, Any]:
    """Run (or, resuming, finish) one editing sequence; returns its YAML, telemetry, checkpoint folder, seconds."""
    import yaml

    import prune_plugin.easyedit as pe
    from .checkpoint import folder_name, read_checkpoint, CheckpointError
    from .easyedit.driver import build_editor, edit_sequentially, load_hparams

    directory = out / "checkpoints" / run.name
    telemetry = out / f"{run.name}.telemetry.jsonl"
    arm_yaml = out / f"{run.name}.yaml"
    info = {"yaml": str(arm_yaml), "telemetry": str(telemetry), "checkpoints": str(directory),
            "seconds_editing": float(previous.get("seconds_editing", 0.0)), "easyedit": previous.get("easyedit", {})}
    if options.resume:
        try:
            read_checkpoint(directory / folder_name(len(records)))
            LOG.info("%s: all %d edits are checkpointed; nothing to edit", run.name, len(records))
            return info
        except CheckpointError:
            pass
    else:
        telemetry.unlink(missing_ok=True)
    config = {**base_yaml, **run.keys, "prune_telemetry": str(telemetry), "prune_guard": "warn",
              "prune_guard_factor": options.guard_factor, "prune_guard_sentences": options.guard_sentences,
              "prune_checkpoint_dir": str(directory), "prune_checkpoint_at": [c for c in counts if c > 0],
              "prune_seed": options.seed}
    arm_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    editor = build_editor(load_hparams(arm_yaml), model, tok)
    start = time.perf_counter()
    LOG.info("%s: %d sequential %s edits, checkpoints after %s", run.name, len(records), options.method,
             config["prune_checkpoint_at"])
    metrics = edit_sequentially(editor, records, resume=options.resume, easyedit_metrics=options.easyedit_metrics)
    info["seconds_editing"] += time.perf_counter() - start
    info["easyedit"] = _summarise_easyedit(metrics) or info["easyedit"]
    pe.session_of(editor).restore()  # the next sequence starts from the same W0, bit for bit
    return info


def _evaluate_branch(model, tok, directory: Path, count: int, alpha, metadata, tasks) -> dict[str, Any]:
    """Evaluate W0 (count 0) or W0 + the checkpoint's edits, restrained with `alpha` when given."""
    from .branches import checkpoint_branch, restraint_summary
    from .checkpoint import folder_name, read_checkpoint
    from .spectrum import condition_number

    if count == 0:  # the unedited model, with cond(W0) of the matrices the run edits
        from .checkpoint import list_checkpoints

        saved = list_checkpoints(directory)
        targets = read_checkpoint(saved[0]).manifest["matrices"] if saved else {}
        return {"metrics": _evaluate(model, tok, metadata, tasks),
                "cond": {n: condition_number(model.get_parameter(n)) for n in targets}}
    checkpoint = read_checkpoint(directory / folder_name(count))
    with checkpoint_branch(model, checkpoint, alpha) as branch:
        return {"metrics": _evaluate(model, tok, metadata, tasks),
                "cond": {n: condition_number(model.get_parameter(n)) for n in branch.targets},
                "restraint": restraint_summary(branch.last_restraint)}


def collect_results(options: JobOptions, runs: list[EditingRun], counts: list[int], editing: dict,
                    evaluations: dict, n_records: int) -> dict[str, Any]:
    """results.json: per arm its curve (metrics and cond(W) against edits, from the unedited model at 0) and its
    figures after the last edit (the table)."""
    unedited = evaluations["unedited@0"]
    base_cond = unedited.get("cond", {})
    curves: dict[str, list[dict[str, Any]]] = {}
    arms: dict[str, Any] = {}
    for run in runs:
        for arm in run.branches:
            points = [{"edits": 0, "metrics": unedited["metrics"], "cond": base_cond}]
            points += [{"edits": c, **{k: v for k, v in evaluations[f"{arm}@{c}"].items() if k != "tasks"}}
                       for c in counts if c > 0]
            curves[arm] = points
            arms[arm] = {"name": arm, "sequence": run.name, **editing[run.name], "metrics": points[-1]["metrics"],
                         "cond": points[-1].get("cond", {})}
    return {"options": asdict(options), "records": n_records, "checkpoints": counts, "unedited": unedited["metrics"],
            "arms": arms, "curves": curves, "editing": editing}


def _check_w0(model, w0) -> None:
    for n, p in model.named_parameters():
        if not torch.equal(p, w0[n]):
            raise RuntimeError(f"{n} differs from W0 after restoring: refusing to go on")


def _read_json_or(path: Path, default: Any) -> Any:
    from .datasets import read_json

    return read_json(path) if path.exists() else default


def _evaluate(model, tok, metadata, tasks: Iterable[str]) -> dict[str, float]:
    """Every numeric metric lm-eval reports for `tasks`, as {"task/metric,filter": value}."""
    from .lmeval import evaluate

    # The paper scores sentences without BOS. SmolLM2's tokenizer adds none (its add_bos_token is False); this
    # keeps it so for a --model whose tokenizer would add one (Llama-style).
    raw = evaluate(model, tok, list(tasks), metadata=metadata, batch_size=10, bootstrap_iters=0,
                   model_kwargs={"add_bos_token": False})["results"]
    # NaN (prune_nli's acc_answered when no row answered True or False) is left out: it is no number to plot,
    # and JSON has no NaN.
    return {f"{task}/{key}": float(value) for task, values in raw.items() for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key
            and not math.isnan(value)}


def _summarise_easyedit(metrics: list[dict]) -> dict[str, float]:
    """Mean of EasyEdit's own post-edit rewrite accuracy (measured right after each edit, as EasyEdit does)."""
    values = [m["post"]["rewrite_acc"] for m in metrics if "post" in m and "rewrite_acc" in m["post"]]
    flat = [float(v) for x in values for v in (x if isinstance(x, list) else [x])]
    return {"post_rewrite_acc_mean": sum(flat) / len(flat)} if flat else {}


def format_table(results: dict[str, Any]) -> str:
    arms = results["arms"]
    header = "| metric | unedited | " + " | ".join(arms) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(arms)]
    for task, key, label in TABLE_ROWS:
        cell = f"{task}/{key}"
        row = [_fmt(results["unedited"].get(cell))] + [_fmt(a["metrics"].get(cell)) for a in arms.values()]
        if set(row) == {"n/a"}:
            continue  # a task this run did not evaluate
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("| editing time (s, the arm's editing run) | - | "
                 + " | ".join(f"{a['seconds_editing']:.0f}" for a in arms.values()) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _alpha_yaml(alpha: Alpha) -> Any:
    return alpha if alpha == "linear" else (str("e") if alpha == math.e else alpha)
