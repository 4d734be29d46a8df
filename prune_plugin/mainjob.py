"""The main job: edit a model fact after fact through EasyEdit in two arms (no restraint; PRUNE), evaluate both
with the lm-eval tasks, and write a table, JSON results and plots.

Every arm starts from the same W0 (restored bit-exactly between arms) and is configured by an ordinary EasyEdit
hparams YAML, written into the output folder, so `<out>/<arm>.yaml` reproduces it.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .restraint import Alpha

LOG = logging.getLogger("prune_plugin")
METHODS = ("ROME", "MEMIT", "FT")
EVAL_TASKS = ["hardedit", "collapse_ppl"]

# (task, metric key in lm-eval's results, label) for the side-by-side table
TABLE_ROWS = [
    ("hardedit_efficacy", "acc,none", "efficacy (rewrite prefers target_new)"),
    ("hardedit_generalization", "acc,none", "generalization (paraphrase)"),
    ("hardedit_locality", "acc,none", "locality (neighbour keeps its fact)"),
    ("collapse_ppl_paper", "mean_ppl,none", "collapse perplexity (paper: mean per-sentence)"),
    ("collapse_ppl_rolling", "word_perplexity,none", "word perplexity (lm-eval)"),
    ("collapse_ppl_rolling", "bits_per_byte,none", "bits per byte (lm-eval)"),
]


@dataclass
class JobOptions:
    method: str = "ROME"
    edits: int = 12
    alphas: tuple = (math.e,)  # one PRUNE arm per base
    mode: str = "final"
    model: str | None = None
    hparams: str | None = None
    data: str | None = None
    out: str = "prune-results"
    seed: int = 0
    guard_factor: float = 5.0
    guard_sentences: int = 10
    eval_sentences: int = 100


@dataclass
class ArmResult:
    name: str
    yaml: str
    telemetry: str
    seconds_editing: float
    metrics: dict[str, float] = field(default_factory=dict)
    easyedit: dict[str, float] = field(default_factory=dict)


# The shipped ROME YAML is ROME's own recipe (25 steps, 21 context templates): about 95 s of CPU per edit on
# SmolLM2. The main job trades some of that for sequence length (measured: about 17 s per edit, and the edits
# still take). Written into each arm's YAML, so the YAML in the output folder is exactly what ran.
BUDGET_OVERRIDES = {"ROME": {"v_num_grad_steps": 15, "context_template_length_params": [[5, 5]]},
                    "MEMIT": {"v_num_grad_steps": 15}}


def shipped_hparams(method: str) -> Path:
    return Path(str(resources.files("prune_plugin") / "hparams" / method / "smollm2-135m.yaml"))


def run_job(options: JobOptions) -> dict[str, Any]:
    """Run both arms and return (and write) the results."""
    import yaml

    from .datasets import load_edit_records, load_reference_sentences, write_json
    from .easyedit.driver import build_editor, easyeditor_module, edit_sequentially, load_hparams
    from .models import load_model

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_edit_records(options.data)[: options.edits]
    sentences = load_reference_sentences()
    # The edited subset and an evaluation sample of the reference corpus, as files the lm-eval tasks load.
    edited_path = write_json(out / "edited_records.json", records)
    sample = sentences[:: max(1, len(sentences) // options.eval_sentences)][: options.eval_sentences]
    eval_corpus = write_json(out / "eval_sentences.json", [{"Corpus": "reference", "Text": t} for t in sample])
    metadata = {"hardedit_path": str(edited_path), "collapse_path": str(eval_corpus)}

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

    results: dict[str, Any] = {"options": asdict(options), "records": len(records), "arms": {}}
    LOG.info("evaluating the unedited model")
    results["unedited"] = _evaluate(model, tok, metadata)
    arms = {"no-restraint": {"prune": False}}
    for alpha in options.alphas:
        label = "prune" if len(options.alphas) == 1 else f"prune-a={_alpha_yaml(alpha)}"
        arms[label] = {"prune": True, "prune_alpha": _alpha_yaml(alpha), "prune_mode": options.mode}
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, keys in arms.items():
        telemetry = out / f"{name}.telemetry.jsonl"
        telemetry.unlink(missing_ok=True)
        config = {**base_yaml, **keys, "prune_telemetry": str(telemetry), "prune_guard": "warn",
                  "prune_guard_factor": options.guard_factor, "prune_guard_sentences": options.guard_sentences}
        arm_yaml = out / f"{name}.yaml"
        arm_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        _seed(options.seed)
        hparams = load_hparams(arm_yaml)
        editor = build_editor(hparams, model, tok)
        start = time.perf_counter()
        LOG.info("arm %s: %d sequential %s edits", name, len(records), options.method)
        easyedit_metrics = edit_sequentially(editor, records)
        seconds = time.perf_counter() - start
        arm = ArmResult(name, str(arm_yaml), str(telemetry), seconds, easyedit=_summarise_easyedit(easyedit_metrics))
        arm.metrics = _evaluate(model, tok, metadata)
        results["arms"][name] = asdict(arm)
        pe.session_of(editor).restore()  # the next arm starts from the same W0, bit for bit
        for n, p in model.named_parameters():
            if not torch.equal(p, w0[n]):
                raise RuntimeError(f"{n} differs from W0 after restoring: refusing to run the next arm")
    write_json(out / "results.json", results)
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    from .plots import plot_arms

    plots = plot_arms({n: a["telemetry"] for n, a in results["arms"].items()}, out,
                      metrics={n: _editing_metrics(a["metrics"]) for n, a in
                               [("unedited", {"metrics": results["unedited"]}), *results["arms"].items()]})
    results["plots"] = [str(p) for p in plots]
    write_json(out / "results.json", results)
    return results


def statistics_dir() -> Path:
    """Where the plugin keeps the key covariance statistics it computes (a cache shared by runs)."""
    from .models import cache_root

    return cache_root() / "stats"


def prepare_statistics(model, tok, hparams: Any, sentences) -> bool:
    """MEMIT (and ROME with mom2_adjustment) need key covariance statistics, which EasyEdit would download from the
    dataset hub: compute the missing ones from the reference corpus into statistics_dir(), and point `hparams` at
    it. Returns whether the method needs them (False: `hparams` is left as it is)."""
    if not (hparams.alg_name == "MEMIT" or getattr(hparams, "mom2_adjustment", False)):
        return False
    from .easyedit.covariance import covariance_path, precompute_covariance

    hparams.stats_dir = str(statistics_dir())
    missing = [layer for layer in hparams.layers if not covariance_path(model, hparams, layer).exists()]
    if missing:
        LOG.info("computing key covariance for layers %s from %d reference sentences", missing, len(sentences))
        precompute_covariance(model, tok, hparams, sentences)
    return True


def _evaluate(model, tok, metadata) -> dict[str, float]:
    from .lmeval import evaluate

    # The paper scores sentences without BOS; SmolLM2's tokenizer would add one.
    raw = evaluate(model, tok, EVAL_TASKS, metadata=metadata, batch_size=10, bootstrap_iters=0,
                   model_kwargs={"add_bos_token": False})["results"]
    return {f"{task}/{key}": float(raw[task][key]) for task, key, _ in TABLE_ROWS if key in raw.get(task, {})}


def _editing_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {task.split("_", 1)[1]: metrics[f"{task}/{key}"] for task, key, _ in TABLE_ROWS[:3] if f"{task}/{key}" in metrics}


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
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("| editing time (s) | - | " + " | ".join(f"{a['seconds_editing']:.0f}" for a in arms.values()) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _alpha_yaml(alpha: Alpha) -> Any:
    return alpha if alpha == "linear" else (str("e") if alpha == math.e else alpha)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass

