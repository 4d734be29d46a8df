"""Checkpoints as a hook implementation: after the scheduled edits, write the edited matrices and a manifest.

Registered by an integration that knows the run's settings (the EasyEdit integration registers it when the YAML
has ``prune_checkpoint_dir``). It wraps the other plugins' per-edit hooks, so the state it saves is the one they
leave (restrained in 'online' mode, rolled back by the guard). A sequence's end is saved before the 'final'
restraint: a checkpoint holds the edits, and every PRUNE base can be applied to it afterwards (edit once,
restrain many).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..checkpoint import Checkpoint, is_due, json_safe, model_identity, parse_schedule, write_checkpoint
from ..hookspecs import hookimpl
from ..originals import get_parameter

if TYPE_CHECKING:
    from ..session import EditSession, EditStep

LOG = logging.getLogger("prune_plugin")

#: The request fields a checkpoint records (and a resumed run compares by REQUEST_IDENTITY).
REQUEST_FIELDS = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt")
REQUEST_IDENTITY = ("prompt", "subject", "target_new")


def request_record(request: Any) -> dict[str, Any]:
    if not isinstance(request, Mapping):
        return {"request": json_safe(request)}
    if "requests" in request:  # a batch (MEMIT): one entry listing its requests
        return {"requests": [request_record(r) for r in request["requests"]]}
    return json_safe({k: request[k] for k in REQUEST_FIELDS if k in request})


class Checkpointing:
    """Writes ``<directory>/edit-NNNNNN/`` after each edit count in `schedule` (``prune_checkpoint_at``: a list of
    counts or an interval; None: after the last edit of each sequence).

    `settings` returns what the manifest records about the run (the hparams, JSON-representable); `state` returns
    the framework's extra resumable state (EasyEdit's cached context templates), read at each write.
    """

    def __init__(self, directory: str | Path, schedule: Any = None, *,
                 settings: Callable[[], Mapping[str, Any]] = dict,
                 state: Callable[[], Mapping[str, Any]] = dict,
                 source: str | None = None) -> None:
        self.directory = Path(directory)
        self.counts, self.interval = parse_schedule(schedule) if schedule is not None else ([], None)
        self.at_end = schedule is None
        self.settings, self.state, self.source = settings, state, source
        self.requests: list[dict[str, Any]] = []
        self.identity: dict[str, Any] | None = None
        self.written: list[Path] = []
        self.seconds: list[float] = []  # per write, for the cost benchmark

    def resumed_from(self, checkpoint: Checkpoint) -> None:
        """Continue the request list of the checkpoint a resumed run started from."""
        self.requests = checkpoint.requests

    @hookimpl(wrapper=True)
    def prune_edit_start(self, session: "EditSession") -> Any:
        result = yield
        # W0 as recorded by the session: the identity every checkpoint of this run is relative to
        self.identity = model_identity(session.model, session.targets, self.source, session.originals)
        return result

    @hookimpl(wrapper=True)
    def prune_after_edit(self, session: "EditSession", step: "EditStep", request: Any) -> Any:
        result = yield  # the restraint, guard and telemetry have run: save what they left
        self.requests.append({**request_record(request), **({"rolled_back": True} if step.rolled_back else {})})
        edits = step.index + 1
        if is_due(edits, self.counts, self.interval):
            self.write(session, edits)
        return result

    @hookimpl(wrapper=True)
    def prune_edit_end(self, session: "EditSession") -> Any:
        edits = session.next_index
        if self.at_end and edits > 0 and not (self.written and self.written[-1].name.endswith(f"{edits:06d}")):
            self.write(session, edits)  # before the 'final' restraint: the checkpoint holds the edits themselves
        return (yield)

    def write(self, session: "EditSession", edits: int) -> Path:
        start = time.perf_counter()
        matrices = {n: get_parameter(session.model, n) for n in session.targets}
        manifest = {
            "requests": self.requests,
            "hparams": dict(self.settings()),
            "model": self.identity,
            "state": {"seed": session.config.edit_seed, "rank_hints": dict(session.rank_hints), **self.state()},
        }
        path = write_checkpoint(self.directory, edits, matrices, manifest, session.bases)
        self.seconds.append(time.perf_counter() - start)
        self.written.append(path)
        LOG.info("checkpoint after %d edits: %s (%.2f s)", edits, path, self.seconds[-1])
        return path
