"""PRUNE as a hook implementation: restrain each edited matrix after every edit ('online') or once at the end
('final', as the official code does), through the session's `restrain_matrices` / `restrain_now`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from ..session import EditSession, EditStep


class PruneRestraint:
    """The built-in restraint; registered by a session whose config says ``prune: true``."""

    @hookimpl(tryfirst=True)
    def prune_after_edit(self, session: "EditSession", step: "EditStep") -> None:
        if session.config.prune_mode == "online" and step.edited:
            with session.timed(step, "restraint"):
                step.figures.update(session.restrain_matrices(step.edited))

    @hookimpl(tryfirst=True)
    def prune_edit_end(self, session: "EditSession") -> None:
        if session.config.prune_mode == "final":
            session.restrain_now()
