"""prune-plugin: the PRUNE restraint for sequential model editing (EasyEdit), collapse tasks (lm-eval), and
pluggy hooks for post-edit plugins.

Public names are loaded on first use, so that `import prune_plugin` (done by the lm-eval start-up hook) stays
cheap and pulls in no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "restrain_delta": "restraint", "restrain_values": "restraint", "restrain_dense_reference": "restraint",
    "parse_alpha": "restraint", "OFFICIAL_BASES": "restraint",
    "largest_singular_value": "spectrum", "condition_number": "spectrum", "MatrixFigures": "spectrum",
    "PruneConfig": "config", "PruneConfigError": "config", "load_yaml_config": "config",
    "EditSession": "session", "EditStep": "session", "make_plugin_manager": "plugins", "edit_session": "plugins",
    "hookimpl": "hookspecs", "hookspec": "hookspecs",
    "mean_perplexity": "perplexity", "sentence_perplexities": "perplexity",
    "read_telemetry": "plugins.telemetry",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
