"""EasyEdit integration: switch PRUNE (and the guard and telemetry) on from an ordinary hparams YAML.

    import prune_plugin.easyedit as pe
    pe.activate()                                   # or automatic on `import easyeditor` after pip install
    hparams = ROMEHyperParams.from_hparams("rome.yaml")   # the YAML may now carry prune: true, prune_alpha: ...
    editor = BaseEditor.from_hparams(hparams)
    editor.edit(..., sequential_edit=True)          # current EasyEdit; keep_original_weight=False in 0.0.1.dev0
    pe.session_of(editor).restore()                 # W0 back, bit for bit
    pe.resume(editor, records)                      # after an interruption (prune_checkpoint_dir in the YAML)
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import Any, ContextManager

from ..plugins import extra_config_keys, make_plugin_manager
from ..switches import env_switch
from ..session import EditSession
from .editor import NOT_IN_PLACE, PruneNotApplicableError, target_parameters
from .hparams import patch_hparams_classes, prune_config_of
from .installed import is_legacy_easyeditor
from .resume import resume

__all__ = [
    "activate", "deactivate", "autoactivate", "autoimport", "is_active", "session_of", "COMPAT_SWITCH",
    "NOT_IN_PLACE", "PruneNotApplicableError", "prune_config_of", "target_parameters", "resume",
]

LOG = logging.getLogger("prune_plugin")
_undo: list[tuple[type, str, Any]] = []

AUTOLOAD_SWITCH = "PRUNE_PLUGIN_AUTOLOAD"
#: Set to 0 to keep the automatic parts of the compat layer for the packaged easyeditor off (placeholders during a
#: plain ``import easyeditor``, the CPU redirect around ``BaseEditor``), while activation still happens.
COMPAT_SWITCH = "PRUNE_PLUGIN_EASYEDIT_COMPAT"


def _switched_off(name: str) -> bool:
    return not env_switch(name, default=True)


def activate(easyeditor: Any = None) -> None:
    """Patch the imported EasyEdit (either generation) so that prune_* hparams keys work; idempotent.

    `easyeditor` is the package module (imported here if not given).
    """
    from .editor import patch_editor_class

    if easyeditor is None:
        easyeditor = importlib.import_module("easyeditor")
    hparams_base = importlib.import_module(easyeditor.__name__ + ".util.hparams").HyperParams
    editor_cls = importlib.import_module(easyeditor.__name__ + ".editors.editor").BaseEditor
    extra = extra_config_keys(make_plugin_manager())
    patch_hparams_classes(hparams_base, extra, _undo)
    patch_editor_class(editor_cls, _undo)
    if not _switched_off(COMPAT_SWITCH) and is_legacy_easyeditor(sys.modules[editor_cls.__module__.partition(".")[0]]):
        from .legacy import patch_legacy_editor_class

        patch_legacy_editor_class(editor_cls, _undo)  # the packaged 0.0.1.dev0 only: CPU redirect, decoder tuples


def deactivate() -> None:
    """Undo every patch (editors already built keep their session)."""
    while _undo:
        cls, name, original = _undo.pop()
        setattr(cls, name, original)


def is_active() -> bool:
    return bool(_undo)


def autoactivate(easyeditor: Any = None) -> None:
    """Called by the start-up hook right after `import easyeditor`; PRUNE_PLUGIN_AUTOLOAD=0 switches it off."""
    if _switched_off(AUTOLOAD_SWITCH):
        return
    activate(easyeditor)


def autoimport() -> ContextManager[Any]:
    """Called by the start-up hook around a plain `import easyeditor`: placeholders for the packages easyeditor
    imports but its in-place methods never use, where they do not import (see installed.import_placeholders).
    PRUNE_PLUGIN_EASYEDIT_COMPAT=0 (or PRUNE_PLUGIN_AUTOLOAD=0) switches it off."""
    if _switched_off(AUTOLOAD_SWITCH) or _switched_off(COMPAT_SWITCH):
        return contextlib.nullcontext()
    from .installed import import_placeholders

    return import_placeholders()


def session_of(editor: Any) -> EditSession | None:
    """The plugin's session of an EasyEdit editor (None when its hparams did not switch the plugin on)."""
    return getattr(editor, "_prune_session", None)
