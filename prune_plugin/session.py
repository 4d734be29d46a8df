"""One editing sequence on one model: W0 bookkeeping, the hook calls, rollback and restoration.

Framework-agnostic: the EasyEdit integration drives it (begin -> before_edit/after_edit per request -> end), and
so can any other editing loop. The caller hands it a plugin manager (prune_plugin.plugins builds one with the
built-in plugins a config asks for); the session itself knows no plugin, only the hook contract:

    config = PruneConfig(prune=True, prune_mode="online")
    session = EditSession(model, config, targets=[...], plugin_manager=make_plugin_manager(config))
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
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pluggy
import torch

from .condition import ConditionNumbers
from .config import PruneConfig
from .originals import OriginalWeights, fingerprint, get_parameter, snapshot
from .restraint import delta_of, plan_restraint, write_planned
from .seeding import seed_everything
from .spectrum import MatrixFigures, SmaxCache

LOG = logging.getLogger("prune_plugin")


class PruneEnlargeWarning(UserWarning):
    """F would have enlarged singular values (smax(W0) < 1/ln a); the never-enlarge guard kept them."""


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


class EditSession:
    """Drives the hooks over one sequence of edits of `targets` (parameter names) in `model`."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: PruneConfig,
        targets: Sequence[str],
        *,
        plugin_manager: pluggy.PluginManager,
        tokenizer: Any = None,
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
        self.pm = plugin_manager  # built by the caller (prune_plugin.plugins.make_plugin_manager): the session imports no plugin
        self.originals = OriginalWeights("cpu" if config.prune_originals_device == "cpu" else None)
        self.smax = SmaxCache()
        self.conditions = ConditionNumbers()  # telemetry's cond(W): W0's Gram spectrum kept per matrix
        self.steps: list[EditStep] = []
        self.rank_hints: dict[str, int] = {}
        # The basis each matrix's last restraint captured of dW (float32, m x rank): where the next one starts
        self.bases: dict[str, torch.Tensor] = {}
        self.last_restraint: dict[str, MatrixFigures] = {}  # figures of the latest restrain_now()
        # Condition numbers cost passes over dW (a dense Gram pass when dW is not low-rank) and keep W0's Gram
        # spectrum per matrix: measured only for a plugin that records them (telemetry switches this on)
        self.measure_condition = False
        self._restrained_prints: dict[str, tuple[int, int]] = {}  # each matrix as restrain_now() last left it
        self._seen: dict[str, tuple[int, int]] = {}
        self._original_prints: dict[str, tuple[int, int]] = {}  # fingerprints of W0, taken on each weight's device
        self._pre_edit: dict[str, torch.Tensor] | None = None
        self.started = False
        self.ended = False
        self.stopped = False  # set when a step asked to stop: drivers apply no further edits
        self.depth = 0  # nesting of a driver's edit calls; the outermost one ends the sequence
        self.first_index = 0  # edits applied before this session (a run resumed from a checkpoint)

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

    def resume_at(self, index: int, weights: Mapping[str, torch.Tensor], rank_hints: Mapping[str, int] = (),
                  bases: Mapping[str, torch.Tensor] = ()) -> None:
        """Continue a sequence from a checkpoint: `index` edits were applied before, and `weights` (target name ->
        value) is where they left the targets. W0 is recorded first, so restraint still measures dW from W0.
        `rank_hints` and `bases` are the restraint's state when the checkpoint was written: with them the resumed
        run restrains bit for bit as the uninterrupted one."""
        self.begin()
        unknown = sorted((set(weights) | set(dict(bases))) - set(self.targets))
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
        self.bases.update({n: b.to(get_parameter(self.model, n).device) for n, b in dict(bases).items()})
        self._seen = {n: fingerprint(get_parameter(self.model, n)) for n in self.targets}
        self._restrained_prints.clear()  # the matrices are the checkpoint's now, restrained or not

    # -- queries and actions -----------------------------------------------------------------------------------
    @property
    def next_index(self) -> int:
        """The index (from the start of the whole sequence) of the next edit."""
        return self.first_index + len(self.steps)

    def fingerprint_seen(self, name: str) -> tuple[int, int] | None:
        """The fingerprint of target `name` when the session last looked at it (after the last edit, restraint or
        restore), or None before it began."""
        return self._seen.get(name)

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

    def restrain_matrices(self, names: Iterable[str], *, write: bool = True) -> dict[str, MatrixFigures]:
        """Restrain dW = W - W0 of each named 2-D parameter (write=False only measures what PRUNE would do); the
        condition numbers before and after are measured when `measure_condition` is set."""
        cfg = self.config
        figures: dict[str, MatrixFigures] = {}
        for name in names:
            param = get_parameter(self.model, name)
            if param.ndim != 2:
                continue  # biases and norms: no spectrum to restrain
            t0 = time.perf_counter()
            original = self.originals[name]  # may live on the CPU: plan_restraint and write_planned move it by blocks
            with torch.no_grad():
                if name not in self.smax:  # once per matrix, on the weight's device; reuse that copy below
                    original = original.to(param.device)
                smax0 = self.smax.get(name, original)
                try:
                    delta, cond_before = None, None
                    if self.measure_condition and self.conditions.estimates(name, param):
                        # The estimate of cond(W) and the restraint both need dW in float64: formed once
                        delta = delta_of(param, original)
                    update, result = plan_restraint(
                        param, original, smax0, cfg.prune_alpha, never_enlarge=cfg.prune_never_enlarge,
                        rank_rule=cfg.prune_rank_rule, rank_hint=self.rank_hints.get(name, 0),
                        start_basis=self.bases.get(name), delta=delta, capture=delta is not None,
                    )
                    if self.measure_condition:  # of W before the restraint writes it: from the restraint's block
                        cond_before = self.conditions.get(name, param, original, start=self.bases.get(name),
                                                          delta=delta, captured=result.captured)
                    del delta
                    result.captured = None  # handed over: not kept with the figures
                    wrote = write_planned(param, original, update, result, write)
                except FloatingPointError:  # from any call: W is left as the edit wrote it, restorable from W0
                    raise FloatingPointError(f"{name}: the edit left non-finite values in the weights; nothing was "
                                             "restrained (session.restore() gives back W0)") from None
                self.rank_hints[name] = result.next_rank_hint
                if result.next_basis is None:
                    self.bases.pop(name, None)
                else:
                    self.bases[name] = result.next_basis
                cond_after = ((self.conditions.after_restraint(name, param, original, result.written) if wrote
                               else cond_before) if self.measure_condition else None)
            if result.n_guarded and write:
                warnings.warn(
                    f"{name}: F would enlarge {result.n_guarded} singular value(s) (smax(W0)={smax0:.4g} < 1/ln a); "
                    "kept them unchanged (prune_never_enlarge: false reproduces the official formula)",
                    PruneEnlargeWarning, stacklevel=2,
                )
            figures[name] = MatrixFigures(**result.scalar_figures(), name=name, restrained=wrote, cond_before=cond_before,
                                          cond_after=cond_after, seconds=time.perf_counter() - t0)
            if wrote:
                LOG.info("PRUNE %s: %d of %d singular values restrained (smax(dW) %.4g -> %.4g, smax(W0) %.4g)",
                         name, result.n_restrained, result.rank, result.smax_delta, float(result.restrained_values.max()), smax0)
        return figures

    def restrain_now(self) -> dict[str, MatrixFigures]:
        """Apply the PRUNE restraint to every matrix that differs from W0, now, whatever the mode.

        A matrix still as the previous restrain_now() left it is not restrained again (F is not idempotent: a second
        pass would restrain the restrained values once more), so restrain_now() then end() in 'final' mode restrains
        once; its figures are the previous ones. Returns the figures of every matrix that differs from W0."""
        self.begin()
        changed = self.changed_from_original()
        pending = [n for n in changed if self._restrained_prints.get(n) != fingerprint(get_parameter(self.model, n))]
        figures = self.restrain_matrices(pending)
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
        """Write W0 back into every target, bit for bit. What the restraint and telemetry learned of dW (rank hints,
        kept bases) goes with it, so that a second sequence starts as the first did."""
        self.originals.restore(self.model)
        self.rank_hints.clear()
        self.bases.clear()
        for name in self.targets:
            self.conditions.start_afresh(name)
        self._seen = {n: fingerprint(get_parameter(self.model, n)) for n in self.targets}
        self._restrained_prints.clear()

    def timed(self, step: EditStep, what: str) -> "_Timer":
        return _Timer(step, what)


class _Timer:
    def __init__(self, step: EditStep, what: str) -> None:
        self.step, self.what = step, what

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.step.seconds[self.what] = self.step.seconds.get(self.what, 0.0) + time.perf_counter() - self.t0
