"""PNG plots read back from telemetry files: condition number and collapse perplexity against edits, per arm."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .plugins.telemetry import read_telemetry


def edit_series(path: str | os.PathLike) -> dict[str, list]:
    """Per-edit series from one telemetry file: step, perplexity, and per matrix cond (after the edit's hooks)."""
    steps, perplexity, cond, rolled_back = [], [], {}, []
    final = {}
    for record in read_telemetry(path):
        if record["event"] == "edit":
            steps.append(record["step"] + 1)
            perplexity.append(record.get("perplexity"))
            rolled_back.append(record.get("rolled_back", False))
            for fig in record["figures"]:
                cond.setdefault(fig["name"], []).append((record["step"] + 1, _num(fig.get("cond_after"))))
        elif record["event"] == "end":
            for fig in record.get("final_restraint", []):
                final[fig["name"]] = (_num(fig.get("cond_before")), _num(fig.get("cond_after")))
    return {"steps": steps, "perplexity": perplexity, "cond": cond, "final": final, "rolled_back": rolled_back}


def _num(value):
    return float(value) if value is not None else None


def plot_arms(arms: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
              metrics: Mapping[str, Mapping[str, float]] | None = None) -> list[Path]:
    """Write condition_number.png, collapse_perplexity.png and (given metrics) editing_metrics.png; returns paths.

    `arms` maps an arm's label to its telemetry file; `metrics` maps an arm's label to {metric: value}.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = {label: edit_series(path) for label, path in arms.items()}
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, s in series.items():
        for name, points in s["cond"].items():
            xs = [x for x, y in points if y is not None]
            ys = [y for x, y in points if y is not None]
            line, = ax.plot(xs, ys, marker=".", label=f"{label}: {_short(name)}")
            if name in s["final"] and s["final"][name][1] is not None and xs:
                ax.scatter([xs[-1]], [s["final"][name][1]], marker="*", s=120, color=line.get_color(), zorder=3,
                           label=f"{label}: after final restraint")
    ax.set(xlabel="sequential edits", ylabel="condition number of W (smax/smin)", yscale="log",
           title="Condition number of each edited matrix")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "condition_number.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, s in series.items():
        pts = [(x, y) for x, y in zip(s["steps"], s["perplexity"]) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=label)
    ax.set(xlabel="sequential edits", ylabel="mean per-sentence perplexity (ME-PPL style)", yscale="log",
           title="Collapse perplexity on reference sentences")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "collapse_perplexity.png"))

    if metrics:
        names = sorted({k for m in metrics.values() for k in m})
        fig, ax = plt.subplots(figsize=(7, 4.2))
        width = 0.8 / max(len(metrics), 1)
        for i, (label, values) in enumerate(metrics.items()):
            ax.bar([j + i * width for j in range(len(names))], [values.get(n, 0.0) for n in names], width, label=label)
        ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(names))], names, rotation=15)
        ax.set(ylabel="score", ylim=(0, 1.05), title="Editing metrics after the sequence (hardedit)")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "editing_metrics.png"))
    return written


def _short(name: str) -> str:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"layer {layer} {parts[-2]}" if layer else name


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written picture
    return path


def plot_telemetry(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Plot one or more telemetry files, each labelled by its file stem."""
    return plot_arms({Path(p).stem: p for p in paths}, out_dir)


# What the curves show: (file, title, y label, log scale, [(metric key, panel label)])
CURVE_FIGURES = [
    ("collapse_perplexity.png", "Collapse perplexity on reference sentences", "mean per-sentence perplexity", True,
     [("collapse_ppl_paper/mean_ppl,none", None)]),
    ("editing_metrics.png", "Editing metrics of the edits made so far (hardedit)", "accuracy", False,
     [("hardedit_efficacy/acc,none", "efficacy"), ("hardedit_generalization/acc,none", "generalization"),
      ("hardedit_locality/acc,none", "locality")]),
]
_KNOWN_TASKS = ("hardedit", "collapse_ppl", "prune_")


def plot_curves(curves: Mapping[str, Sequence[Mapping]], out_dir: str | os.PathLike) -> list[Path]:
    """Each metric against the number of edits, one line per arm, starting from the unedited model at 0.

    `curves` maps an arm to its points ``{"edits": n, "metrics": {key: value}, "cond": {matrix: cond(W)}}`` (the
    main job's results.json "curves"). Writes condition_number.png, collapse_perplexity.png,
    editing_metrics.png, and general_abilities.png for the metrics of any other task (e.g. prune_general)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    base_cond = _unedited_cond(curves)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, points in curves.items():
        names = sorted({n for p in points for n in p.get("cond", {})})
        for name in names:
            pts = [(p["edits"], p["cond"][name]) for p in points if name in p.get("cond", {})]
            if name in base_cond:
                pts = [(0, base_cond[name]), *pts]
            label = arm if len(names) == 1 else f"{arm}: {_short(name)}"
            ax.plot(*zip(*pts), marker=".", label=label)
    ax.set(xlabel="sequential edits", ylabel="condition number of W (smax/smin)", yscale="log",
           title="Condition number of the edited matrix")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "condition_number.png"))

    from .lmeval import HEADLINE_METRICS

    # PRUNE's four downstream tasks by their headline numbers; any other task's metrics as they are named
    general = [(f"{task}/{metric},none", label) for task, metric, label in HEADLINE_METRICS["prune_general"]]
    general += sorted((k, k) for k in {k for points in curves.values() for p in points for k in p.get("metrics", {})
                                       if not k.startswith(_KNOWN_TASKS)})
    figures = [*CURVE_FIGURES, ("general_abilities.png", "General abilities", "score", False, general)]
    for file, title, ylabel, log, panels in figures:
        present = [(k, label) for k, label in panels if any(k in p.get("metrics", {}) for ps in curves.values() for p in ps)]
        if not present:
            continue
        cols = min(3, len(present))
        rows = (len(present) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols if cols > 1 else 7, 3.6 * rows if cols > 1 else 4.2),
                                 squeeze=False)
        for ax, (key, label) in zip(axes.flat, present):
            for arm, points in curves.items():
                pts = [(p["edits"], p["metrics"][key]) for p in points if key in p.get("metrics", {})]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=arm)
            ax.set(xlabel="sequential edits", ylabel=ylabel, title=label or title, yscale="log" if log else "linear")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(present):]:
            ax.set_visible(False)
        if cols > 1:
            fig.suptitle(title)
        written.append(_save(fig, out / file))
    return written


def _unedited_cond(curves: Mapping[str, Sequence[Mapping]]) -> dict[str, float]:
    """cond(W0) per matrix, if any arm's point at 0 edits carries it."""
    for points in curves.values():
        for p in points:
            if p["edits"] == 0 and p.get("cond"):
                return dict(p["cond"])
    return {}
