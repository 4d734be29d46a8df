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
