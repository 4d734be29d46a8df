"""On/off values, as environment variables and lm-eval metadata give them: the one parser of the package.

The start-up hook (_prune_plugin_autoload.py) may import nothing of the package, so it keeps the same two word
lists itself; tests/test_config.py checks that the two agree.
"""
from __future__ import annotations

import os
from typing import Any

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def parse_switch(value: Any) -> bool | None:
    """True or False for a bool or one of the words in ON / OFF (any case, spaces around); None for None.
    Anything else is a ValueError."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ON:
        return True
    if text in OFF:
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def env_switch(name: str, default: bool) -> bool:
    """The environment variable `name` as a switch: `default` when it is unset, empty, or not an on/off word."""
    try:
        value = parse_switch(os.environ.get(name, "").strip() or None)
    except ValueError:
        return default
    return default if value is None else value
