"""The built-in hook implementations and the plugin manager that holds them.

An integration builds the manager here, with the built-ins its configuration asks for (PRUNE's restraint for
``prune: true``, the collapse guard for ``prune_guard``, telemetry for ``prune_telemetry``) and the third-party
plugins of the ``prune_plugin`` entry-point group, and hands it to the session:

    config = PruneConfig(prune=True, prune_mode="online")
    session = EditSession(model, config, targets, plugin_manager=make_plugin_manager(config))
    session = edit_session(model, config, targets)      # the same, in one call

The plugins themselves never import each other: they meet through hook arguments and the session.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import pluggy

from .. import hookspecs
from ..config import PruneConfig

if TYPE_CHECKING:
    import torch

    from ..session import EditSession


def make_plugin_manager(config: PruneConfig | None = None, *, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A manager holding the hook contract, third-party plugins from the ``prune_plugin`` entry points (unless
    `load_entry_points` is False) and, with a `config`, the built-in plugins it asks for."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    if config is not None:
        register_builtins(pm, config)
    return pm


def register_builtins(pm: pluggy.PluginManager, config: PruneConfig) -> None:
    """Register the built-in plugins `config` switches on, each once (a manager shared between sessions keeps
    the plugins it has)."""
    from .prune import PruneRestraint
    from .telemetry import Telemetry

    wanted: dict[str, Callable[[], Any]] = {}
    if config.prune:
        wanted["prune"] = PruneRestraint
    if config.prune_guard != "off":
        from .guard import CollapseGuard

        wanted["collapse_guard"] = CollapseGuard
    if config.prune_telemetry is not None:
        wanted["telemetry"] = lambda: Telemetry(config.prune_telemetry)
    for name, make in wanted.items():
        if pm.get_plugin(name) is None:
            pm.register(make(), name=name)


def extra_config_keys(pm: pluggy.PluginManager) -> dict[str, Any]:
    """The extra YAML keys registered plugins declare (prune_config_keys)."""
    keys: dict[str, Any] = {}
    for declared in pm.hook.prune_config_keys():
        keys.update(declared or {})
    return keys


def edit_session(model: "torch.nn.Module", config: PruneConfig, targets: Sequence[str], *, tokenizer: Any = None,
                 load_entry_points: bool = True) -> "EditSession":
    """An EditSession of `targets` in `model` whose manager holds what `config` asks for (make_plugin_manager)."""
    from ..session import EditSession

    return EditSession(model, config, targets, tokenizer=tokenizer,
                       plugin_manager=make_plugin_manager(config, load_entry_points=load_entry_points))
