"""The RECT rule and its hook implementation."""
from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, Generator, Mapping

import torch

from prune_plugin.config import ConfigKey
from prune_plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from prune_plugin.session import EditSession, EditStep

SWITCH, RATIO = "prune_rect", "prune_rect_ratio"


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {value!r}")


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"must be a fraction in (0, 1], got {value!r}")
    return float(value)


@torch.no_grad()
def rectify(before: torch.Tensor, after: torch.Tensor, ratio: float) -> tuple[torch.Tensor, int]:
    """RECT's rule for one matrix: `before` where the relative change is outside the top `ratio` of entries,
    `after` inside it. Returns (the rectified matrix, how many entries kept their edited value).

    The result takes its entries bit for bit from `before` or `after` (no arithmetic on the weights), so a reset
    entry is exactly its pre-edit value. An entry that was 0 before the edit has an infinite relative change and is
    kept first.
    """
    if before.shape != after.shape:
        raise ValueError(f"before and after differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    changed = after != before
    n_changed = int(changed.sum())
    keep = min(n_changed, math.ceil(ratio * before.numel()))
    if keep == n_changed:
        return after.clone(), n_changed
    # float32 is enough to rank the relative changes; unchanged entries get -1 so they are never picked.
    rel = ((after.float() - before.float()).abs() / before.float().abs()).nan_to_num(nan=0.0)
    rel = torch.where(changed, rel, torch.full_like(rel, -1.0))
    mask = torch.zeros(before.numel(), dtype=torch.bool, device=before.device)
    mask[torch.topk(rel.flatten(), keep, sorted=False).indices] = True
    return torch.where(mask.view_as(before), after, before), keep


class RectRestraint:
    """Keeps each session's pre-edit weights between `prune_before_edit` and `prune_after_edit`."""

    def __init__(self) -> None:
        self._before: "weakref.WeakKeyDictionary[EditSession, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()

    @hookimpl
    def prune_config_keys(self) -> Mapping[str, Any]:
        return {SWITCH: ConfigKey(False, _switch), RATIO: ConfigKey(0.2, _ratio)}

    @staticmethod
    def _enabled(session: "EditSession") -> bool:
        return bool(session.config.extra.get(SWITCH, False))

    @hookimpl
    def prune_before_edit(self, session: "EditSession", model: torch.nn.Module, targets: list[str]) -> None:
        if self._enabled(session):
            # One copy of each 2-D target while the edit runs: what RECT needs to tell this edit's own update.
            self._before[session] = {n: model.get_parameter(n).detach().clone() for n in targets
                                     if model.get_parameter(n).ndim == 2}

    # A wrapper, so that RECT rectifies the raw edit before PRUNE (or any other restraint) sees the weights.
    @hookimpl(wrapper=True)
    def prune_after_edit(self, session: "EditSession", model: torch.nn.Module, step: "EditStep") -> Generator:
        if self._enabled(session):
            before = self._before.pop(session, None)
            if before is None:
                raise RuntimeError("RECT needs the weights before each edit: call session.before_edit() before "
                                   "applying an edit (the EasyEdit integration does)")
            ratio = float(session.config.extra.get(RATIO, 0.2))
            for name in step.edited:
                if name not in before:
                    continue  # biases and norms: RECT is defined on weight matrices
                param = model.get_parameter(name)
                rectified, kept = rectify(before[name], param.detach(), ratio)
                with torch.no_grad():
                    param.copy_(rectified)
                step.decisions.append({"plugin": "rect", "parameter": name, "kept": kept, "of": param.numel(),
                                       "ratio": ratio})
        return (yield)
