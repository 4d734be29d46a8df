"""One editing sequence on one model: W0 bookkeeping, the hook calls, rollback and restoration.

Framework-agnostic: the EasyEdit integration drives it (begin -> before_edit/after_edit per request -> end), and
so can any other editing loop:

    session = EditSession(model, PruneConfig(prune=True, prune_mode="online"), targets=[...])
    for request in requests:
        session.before_edit()
        my_editor.apply(model, request)
        step = session.after_edit(request)
        if step.stop:
            break
    session.end()
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pluggy
import torch

from . import hookspecs
from .condition import ConditionNumbers
from .config import PruneConfig
from .originals import OriginalWeights, fingerprint, get_parameter, snapshot
from .restraint import RestraintFigures
from .seeding import seed_everything
from .spectrum import SmaxCache

LOG = logging.getLogger("prune_plugin")


@dataclass
class MatrixFigures(RestraintFigures):
    """What telemetry reports for one edited matrix after one edit (condition numbers may be None: not computed)."""

    name: str
    restrained: bool
    cond_before: float | None = None
    cond_after: float | None = None
    seconds: float = 0.0


@dataclass
class EditStep:
    """One edit as the hooks see it; plugins annotate it."""

    index: int
    request: Mapping[str, Any]
    edited: list[str]
    figures: dict[str, MatrixFigures] = field(default_factory=dict)
    perplexity: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: bool = False
    stop: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A manager holding the hook contract, with third-party plugins from the ``prune_plugin`` entry points."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def extra_config_keys(pm: pluggy.PluginManager) -> dict[str, Any]:
    """The extra YAML keys registered plugins declare (prune_config_keys)."""
    keys: dict[str, Any] = {}
    for declared in pm.hook.prune_config_keys():
        keys.update(declared or {})
    return keys


class EditSession:
    """Drives the hooks over one sequence of edits of `targets` (parameter names) in `model`."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: PruneConfig,
        targets: Sequence[str],
        *,
        tokenizer: Any = None,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        if not targets:
            raise ValueError("an edit session needs at least one target parameter name")
        for name in targets:
            if get_parameter(model, name).is_meta:  # fail now, with the name, rather than after the first edit
                raise ValueError(
                    f"{name} is on the meta device, so its values are not in the model: accelerate leaves offloaded "
                    "weights there (device_map entries 'disk', or 'cpu' next to GPUs) and loads them only for a "
                    "forward pass. PRUNE needs every edited matrix resident: load the model with a device_map that "
                    "keeps the edited layers on a device (GPU indices, or all 'cpu' without GPUs)"
                )
        self.model = model
        self.config = config
        self.targets = list(targets)
        self.tokenizer = tokenizer
        self.pm = plugin_manager if plugin_manager is not None else make_plugin_manager()
        self.originals = OriginalWeights("cpu" if config.prune_originals_device == "cpu" else None)
        self.smax = SmaxCache()
        self.conditions = ConditionNumbers()  # telemetry's cond(W): W0's Gram spectrum kept per matrix
        self.steps: list[EditStep] = []
        self.rank_hints: dict[str, int] = {}
        self.last_restraint: dict[str, MatrixFigures] = {}  # figures of the latest restrain_now()
        self._restrained_prints: dict[str, tuple[int, int]] = {}  # each matrix as restrain_now() last left it
        self._seen: dict[str, tuple[int, int]] = {}
        self._original_prints: dict[str, tuple[int, int]] = {}  # fingerprints of W0, taken on each weight's device
        self._pre_edit: dict[str, torch.Tensor] | None = None
        self.started = False
        self.ended = False
        self.stopped = False  # set when a step asked to stop: drivers apply no further edits
        self.depth = 0  # nesting of a driver's edit calls; the outermost one ends the sequence
        self.first_index = 0  # edits applied before this session (a run resumed from a checkpoint)
        _register_builtins(self)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Record W0 of every target and tell the plugins; idempotent (a later sequence keeps the same W0)."""
        self.ended = False
        if self.started:
            return
        self.originals.record(self.model, self.targets)
        self._seen = {n: fingerprint(get_parameter(self.model, n)) for n in self.targets}
        self._original_prints = dict(self._seen)
        self.started = True
        self.pm.hook.prune_edit_start(session=self, model=self.model, originals=self.originals)

    def before_edit(self) -> None:
        """Call right before an edit; keeps a copy of the targets when the guard may roll this edit back."""
        self.begin()
        if self.config.edit_seed is not None:  # edit k starts from the same random state, resumed or not
            seed_everything(self.config.edit_seed + self.next_index)
        if self.config.prune_guard == "rollback":
            self._pre_edit = snapshot(self.model, self.targets)
        self.pm.hook.prune_before_edit(session=self, model=self.model, targets=list(self.targets))

    def after_edit(self, request: Mapping[str, Any]) -> EditStep:
        """Call right after an edit was written into the weights; runs the per-edit hooks."""
        self.begin()
        step = EditStep(index=self.next_index, request=request, edited=self.changed_since_last_look())
        self.pm.hook.prune_after_edit(session=self, model=self.model, request=request, step=step, originals=self.originals)
        self._seen.update({n: fingerprint(get_parameter(self.model, n)) for n in step.edited})
        self._pre_edit = None
        self.steps.append(step)
        return step

    def end(self) -> None:
        """Call once after the last edit (the 'final' restraint runs here)."""
        if not self.started or self.ended:
            return
        self.pm.hook.prune_edit_end(session=self, model=self.model, steps=self.steps, originals=self.originals)
        self.ended = True

    def resume_at(self, index: int, weights: Mapping[str, torch.Tensor], rank_hints: Mapping[str, int] = ()) -> None:
        """Continue a sequence from a checkpoint: `index` edits were applied before, and `weights` (target name ->
        value) is where they left the targets. W0 is recorded first, so restraint still measures dW from W0."""
        self.begin()
        unknown = sorted(set(weights) - set(self.targets))
        if unknown:
            raise KeyError(f"resume: {unknown[0]!r} is not one of this session's targets")
        for name, value in weights.items():  # check every matrix before writing any
            param = get_parameter(self.model, name)
            if value.shape != param.shape or value.dtype != param.dtype:
                raise ValueError(f"resume: {name} is {tuple(value.shape)} {value.dtype} in the checkpoint, "
                                 f"{tuple(param.shape)} {param.dtype} in the model")
        with torch.no_grad():
            for name, value in weights.items():
                get_parameter(self.model, name).copy_(value)
        self.first_index = index
        self.rank_hints.update(dict(rank_hints))
        self._seen = {n: fingerprint(get_parameter(self.model, n)) for n in self.targets}
        self._restrained_prints.clear()  # the matrices are the checkpoint's now, restrained or not

    # -- queries and actions -----------------------------------------------------------------------------------
    @property
    def next_index(self) -> int:
        """The index (from the start of the whole sequence) of the next edit."""
        return self.first_index + len(self.steps)

    def changed_since_last_look(self) -> list[str]:
        return [n for n in self.targets if fingerprint(get_parameter(self.model, n)) != self._seen.get(n)]

    def changed_from_original(self) -> list[str]:
        """Targets whose weights differ from W0, bit for bit. When W0 is kept on another device (the CPU), a
        fingerprint that differs from W0's settles it on the weight's device; W0 only travels to confirm a match."""
        changed = []
        for n in self.targets:
            param, original = get_parameter(self.model, n).detach(), self.originals[n]
            if original.device != param.device and fingerprint(param) != self._original_prints.get(n):
                changed.append(n)
            elif not torch.equal(param, original.to(param.device)):
                changed.append(n)
        return changed

    def restrain_now(self) -> dict[str, MatrixFigures]:
        """Apply the PRUNE restraint to every matrix that differs from W0, now, whatever the mode.

        A matrix still as the previous restrain_now() left it is not restrained again (F is not idempotent: a second
        pass would restrain the restrained values once more), so restrain_now() then end() in 'final' mode restrains
        once; its figures are the previous ones. Returns the figures of every matrix that differs from W0."""
        from .plugins.prune import restrain_matrices

        self.begin()
        changed = self.changed_from_original()
        pending = [n for n in changed if self._restrained_prints.get(n) != fingerprint(get_parameter(self.model, n))]
        figures = restrain_matrices(self, pending)
        prints = {n: fingerprint(get_parameter(self.model, n)) for n in figures}
        self._restrained_prints.update(prints)
        self._seen.update(prints)
        previous = self.last_restraint
        self.last_restraint = {n: figures[n] if n in figures else previous[n]
                               for n in changed if n in figures or n in previous}
        return dict(self.last_restraint)

    def rollback(self, step: EditStep) -> None:
        """Undo the edit of `step` bit-exactly (needs prune_guard: rollback, which keeps the pre-edit copy)."""
        if self._pre_edit is None:
            raise RuntimeError("rollback needs the pre-edit copy: set prune_guard: rollback and call before_edit()")
        with torch.no_grad():
            for name, value in self._pre_edit.items():
                get_parameter(self.model, name).copy_(value)
        step.rolled_back = True

    def restore(self) -> None:
        """Write W0 back into every target, bit for bit."""
        self.originals.restore(self.model)
        self._seen = {n: fingerprint(get_parameter(self.model, n)) for n in self.targets}
        self._restrained_prints.clear()

    @property
    def wants_condition(self) -> bool:
        """Condition numbers cost passes over dW (a dense Gram pass when dW is not low-rank) and keep W0's Gram
        spectrum per matrix: only when telemetry records them."""
        return self.config.prune_telemetry is not None and self.config.prune_telemetry_condition

    def timed(self, step: EditStep, what: str) -> "_Timer":
        return _Timer(step, what)


class _Timer:
    def __init__(self, step: EditStep, what: str) -> None:
        self.step, self.what = step, what

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.step.seconds[self.what] = self.step.seconds.get(self.what, 0.0) + time.perf_counter() - self.t0


def _register_builtins(session: EditSession) -> None:
    from .plugins.prune import PruneRestraint
    from .plugins.telemetry import Telemetry

    cfg = session.config
    wanted: dict[str, Any] = {}
    if cfg.prune:
        wanted["prune"] = PruneRestraint
    if cfg.prune_guard != "off":
        from .plugins.guard import CollapseGuard

        wanted["collapse_guard"] = CollapseGuard
    if cfg.prune_telemetry is not None:
        wanted["telemetry"] = lambda: Telemetry(cfg.prune_telemetry)
    for name, make in wanted.items():
        if session.pm.get_plugin(name) is None:  # a manager shared between sessions keeps its plugins
            session.pm.register(make(), name=name)
