"""Let EasyEdit's own ``XHyperParams.from_hparams(path)`` accept the plugin's ``prune_*`` keys.

EasyEdit builds each hparams dataclass with ``cls(**yaml_dict)``, so an unknown key is a TypeError. Once
patched, each HyperParams subclass's ``__init__`` takes the ``prune_*`` keys out, validates them into a
`PruneConfig` (errors name the key, the file and the line) and attaches it as ``hparams.prune_config``.
"""
from __future__ import annotations

import contextvars
import os
from typing import Any, Callable, Mapping

from ..config import PruneConfig, is_plugin_key, yaml_key_lines

# The file being read by the from_hparams call in progress, so that __init__ can name it in errors.
_current_file: contextvars.ContextVar[str | None] = contextvars.ContextVar("prune_hparams_file", default=None)
_PATCHED = "__prune_plugin_patched__"


def _resolve(path: Any) -> str:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    # Both EasyEdit generations append .yaml to names given without it.
    return text if text.endswith((".yaml", ".yml", ".json")) else text + ".yaml"


def _wrap_init(init: Callable[..., None], extra_keys: Mapping[str, Any]) -> Callable[..., None]:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plugin_values = {k: kwargs.pop(k) for k in list(kwargs) if is_plugin_key(k)}
        init(self, *args, **kwargs)
        source = _current_file.get()
        lines = yaml_key_lines(source) if source and source.endswith((".yaml", ".yml")) else {}
        self.prune_config = PruneConfig.from_mapping(plugin_values, source=source, lines=lines, extra_keys=extra_keys)

    setattr(__init__, _PATCHED, init)
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    return __init__


def _wrap_from_hparams(func: Callable[..., Any]) -> classmethod:
    def from_hparams(cls, hparams_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        token = _current_file.set(_resolve(hparams_name_or_path))
        try:
            return func(cls, hparams_name_or_path, *args, **kwargs)
        finally:
            _current_file.reset(token)

    setattr(from_hparams, _PATCHED, func)
    return classmethod(from_hparams)


def _all_subclasses(base: type) -> list[type]:
    seen, todo = [], [base]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


def patch_hparams_classes(base: type, extra_keys: Mapping[str, Any], undo: list) -> int:
    """Patch every subclass of EasyEdit's HyperParams that defines its own __init__/from_hparams.

    Returns how many classes were patched; appends (class, attribute, original) to `undo`.
    """
    count = 0
    for cls in [base, *_all_subclasses(base)]:
        init = cls.__dict__.get("__init__")
        if init is not None and not hasattr(init, _PATCHED) and cls is not base:
            undo.append((cls, "__init__", init))
            cls.__init__ = _wrap_init(init, extra_keys)
            count += 1
        loader = cls.__dict__.get("from_hparams")
        if isinstance(loader, classmethod) and not hasattr(loader.__func__, _PATCHED):
            undo.append((cls, "from_hparams", loader))
            cls.from_hparams = _wrap_from_hparams(loader.__func__)
    return count


def prune_config_of(hparams: Any) -> PruneConfig | None:
    """The config attached by a patched __init__ (None for hparams built before activation)."""
    config = getattr(hparams, "prune_config", None)
    return config if isinstance(config, PruneConfig) else None
