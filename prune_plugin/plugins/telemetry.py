"""Telemetry as a hook implementation: one JSON line per event, flushed and synced so a crash keeps them all."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from ..session import EditSession, EditStep


def _clean(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _request_summary(request: Any) -> dict[str, Any]:
    keys = ("case_id", "prompt", "subject", "target_new", "ground_truth")
    return {k: request[k] for k in keys if isinstance(request, dict) and k in request}


class Telemetry:
    """Appends start / edit / end records to a JSONL file (created with its folder if needed)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_clean(record), ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())

    @hookimpl(trylast=True)
    def prune_edit_start(self, session: "EditSession") -> None:
        session.measure_condition = session.config.prune_telemetry_condition  # cond(W) before/after each restraint
        cfg = {k: v for k, v in session.config.to_dict().items()}
        self.write({"event": "start", "time": time.time(), "targets": session.targets, "config": cfg,
                    "originals_bytes": session.originals.nbytes()})

    @hookimpl(trylast=True)
    def prune_after_edit(self, session: "EditSession", step: "EditStep") -> None:
        with session.timed(step, "telemetry"):
            unmeasured = [n for n in step.edited if n not in step.figures]
            if unmeasured and not step.rolled_back:
                step.figures.update(session.restrain_matrices(unmeasured, write=False))
            record = {
                "event": "edit", "step": step.index, "time": time.time(), "request": _request_summary(step.request),
                "edited": step.edited, "figures": [dataclasses.asdict(f) for f in step.figures.values()],
                "perplexity": step.perplexity, "decisions": step.decisions, "rolled_back": step.rolled_back,
                "stop": step.stop,
            }
        record["seconds"] = dict(step.seconds)
        self.write(record)

    @hookimpl(trylast=True)
    def prune_edit_end(self, session: "EditSession") -> None:
        self.write({"event": "end", "time": time.time(), "steps": len(session.steps),
                    "final_restraint": [dataclasses.asdict(f) for f in session.last_restraint.values()]})


def read_telemetry(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of a telemetry file; a last line cut off by a crash is skipped, any other bad line is an error."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                return  # the write in progress when the run was killed
            raise ValueError(f"{path}:{number}: not a telemetry record: {err}") from None
