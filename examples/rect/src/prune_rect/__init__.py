"""RECT (Gu et al., "Model Editing Harms General Abilities of Large Language Models: Regularization to the
Rescue", arXiv 2401.04700) as a prune-plugin restraint, written only against the public hook contract.

RECT rectifies each edit's own update dW = W_after - W_before: it keeps the `prune_rect_ratio` fraction of dW's
entries with the largest relative change |dW_ij| / |W_before_ij| and resets every other entry to its value before
the edit. Switched on from an ordinary EasyEdit hparams YAML, beside PRUNE or alone:

    prune_rect: true
    prune_rect_ratio: 0.2     # fraction of each edited matrix's entries an edit may change

Installed, it registers itself through the ``prune_plugin`` entry-point group (see pyproject.toml).
"""
from __future__ import annotations

from .plugin import RectRestraint, rectify

#: The object the entry point names: one instance serves every session (its state is kept per session).
plugin = RectRestraint()

__all__ = ["RectRestraint", "rectify", "plugin"]
