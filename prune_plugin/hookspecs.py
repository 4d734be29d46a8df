"""The hook contract for post-edit plugins: what each hook receives, when it runs, what its return means.

Implementations are plain functions or methods marked with `hookimpl` (they may accept any subset of a hook's
arguments). Third-party plugins register through the setuptools entry-point group ``prune_plugin``:

    [options.entry_points]
    prune_plugin =
        my_restraint = my_package.my_module

Per edit, PRUNE's own restraint runs first (tryfirst), then the collapse guard, then telemetry (trylast), so
that the guard scores and telemetry records the restrained weights. A plugin that must change the edit before
any restraint sees it (a sparsifier such as RECT, examples/rect/) declares its `prune_after_edit` a pluggy
wrapper (``@hookimpl(wrapper=True)``) and does its work before ``yield``: wrappers run around every ordinary
implementation, whatever the registration order.

Plugins never import each other (the built-ins neither): they meet through these hooks' arguments and the session,
which offers what one plugin may need of another's work: ``session.restrain_matrices(names, write=False)`` measures
what PRUNE would do without writing, ``session.measure_condition = True`` adds cond(W) before and after to every
restraint's figures (telemetry sets it), ``session.rollback(step)`` undoes an edit. The plugin manager holding them
is built by `prune_plugin.plugins.make_plugin_manager` and handed to the session by the integration.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:  # only for annotations: the contract imports nothing heavy
    import torch

    from .session import EditSession, EditStep

PROJECT = "prune_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def prune_config_keys() -> Mapping[str, Any]:
    """Declare the extra hparams YAML keys this plugin reads, as {key: default} or {key: ConfigKey(default, check)}.

    Called when the configuration is parsed. Keys must start with ``prune_`` (the namespace the EasyEdit
    integration accepts); their values reach the plugin as ``session.config.extra[key]`` (the default when the
    YAML does not give the key). With a `prune_plugin.config.ConfigKey`, `check(value)` cleans the value or raises
    ValueError, and the error names the key, the file and the line. Only keys the YAML gives switch a session on
    (``session.config.extra_given``): an installed plugin stays inert for YAMLs that do not mention it.
    """


@hookspec
def prune_edit_start(session: "EditSession", model: "torch.nn.Module", originals: Mapping[str, "torch.Tensor"]) -> None:
    """Called once per session, before its first edit, when the original weights W0 have been recorded.

    A session spans every edit()/batch_edit() call of one editor (later sequences keep the same W0), so this runs
    once even when `prune_edit_end` runs several times. `originals` maps parameter names to read-only copies of W0
    (do not modify them).
    """


@hookspec
def prune_before_edit(session: "EditSession", model: "torch.nn.Module", targets: "list[str]") -> None:
    """Called right before each edit is applied, with the names of the parameters the method may edit.

    The weights are still those of the previous step: a plugin that works on one edit's own update (rather than
    the accumulated W - W0) keeps what it needs of them here, and frees it in `prune_after_edit`.
    """


@hookspec
def prune_after_edit(
    session: "EditSession",
    model: "torch.nn.Module",
    request: Mapping[str, Any],
    step: "EditStep",
    originals: Mapping[str, "torch.Tensor"],
) -> None:
    """Called after each edit has been written into the model's weights.

    `request` is the editing request (EasyEdit's dict: prompt, subject, target_new, ...); `step` carries the edit's
    index and a record that plugins annotate (`step.figures` per matrix, `step.perplexity`, `step.decisions`).
    A plugin may change weights here (a restraint) but must only touch `step.edited` parameters; it may ask the
    session to roll the edit back (`session.rollback(step)`) or to stop the sequence (`step.stop = True`).
    """


@hookspec
def prune_edit_end(
    session: "EditSession",
    model: "torch.nn.Module",
    steps: "list[EditStep]",
    originals: Mapping[str, "torch.Tensor"],
) -> None:
    """Called after the last edit of a sequence: once per outermost edit()/batch_edit() call of an EasyEdit editor,
    or per `session.end()` (the official PRUNE restrains here, in 'final' mode). `steps` holds every step of the
    session so far."""
