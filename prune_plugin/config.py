"""The plugin's settings: flat ``prune_*`` keys that sit in an ordinary EasyEdit hparams YAML.

    prune: true              # switch the restraint on
    prune_alpha: 1.2         # log base a > 1 ('e', 2, 1.5, 1.2, ...) or 'linear'
    prune_mode: final        # 'final' (once after the n-th edit, as the official code) or 'online' (after every edit)

Every error names the key, and the file and line when the settings came from a file.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .restraint import Alpha, parse_alpha, parse_rank_rule

PREFIX = "prune"
MODES = ("final", "online")
GUARD_ACTIONS = ("off", "warn", "stop", "rollback")
ORIGINALS_DEVICES = ("same", "cpu")


class PruneConfigError(ValueError):
    """A prune_* setting is unknown or has a bad value; the message names key, file and line."""


@dataclass(frozen=True)
class ConfigKey:
    """A third-party plugin's YAML key with its validation (what `prune_config_keys` may map a key to).

    `check(value)` returns the cleaned value or raises ValueError/TypeError with a message that reads after the key
    (e.g. "must be in (0, 1], got 2"); the configuration then names the key, the file and the line, as for the
    plugin's own keys. A plain value in `prune_config_keys` is a default with no check.
    """

    default: Any
    check: Callable[[Any], Any] | None = None


def is_plugin_key(key: str) -> bool:
    return key == PREFIX or key.startswith(PREFIX + "_")


@dataclass
class PruneConfig:
    prune: bool = False
    prune_alpha: Alpha = math.e
    prune_mode: str = "final"
    prune_never_enlarge: bool = True
    prune_rank_rule: str = "exact"
    prune_originals_device: str = "same"
    prune_targets: list[str] | None = None
    prune_telemetry: str | None = None
    prune_telemetry_condition: bool = True
    prune_guard: str = "off"
    prune_guard_factor: float = 2.0
    prune_guard_sentences: int = 20
    prune_guard_batch_size: int = 10
    prune_guard_corpus: str | None = None
    prune_checkpoint_dir: str | None = None
    prune_checkpoint_at: Any = None  # a list of edit counts or an interval; None: after the last edit only
    prune_seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file the settings were read from, for messages
    #: The third-party keys the settings gave explicitly (`extra` also holds the declared defaults of the rest).
    extra_given: frozenset[str] | None = None

    def __post_init__(self) -> None:
        # Built directly (PruneConfig(prune_mode="Final")) the values get the same checks, normalisation and
        # messages as from a YAML file; from_mapping has already checked them (with file and line) and the checks
        # are idempotent on their own results.
        where = f"{self.source}: " if self.source else ""
        for key, check in _CHECKS.items():
            try:
                setattr(self, key, check(getattr(self, key)))
            except (TypeError, ValueError) as err:
                raise PruneConfigError(f"{where}{key}: {err}") from None

    @property
    def active(self) -> bool:
        """True when any part of the plugin (restraint, guard, telemetry, checkpoints, a third-party key) is on.

        A third-party key counts only when the settings give it: an installed plugin's declared defaults alone
        must not attach a session to every editor."""
        given = self.extra.keys() if self.extra_given is None else self.extra_given
        return (self.prune or self.prune_guard != "off" or self.prune_telemetry is not None or bool(given)
                or self.prune_checkpoint_dir is not None)

    @property
    def edit_seed(self) -> int | None:
        """The seed of edit 0 (edit k runs with seed + k), or None: the editor's random state is left alone.
        Checkpointed runs are seeded (0 unless prune_seed says otherwise), so that a resumed run equals an
        uninterrupted one."""
        if self.prune_seed is not None:
            return self.prune_seed
        return 0 if self.prune_checkpoint_dir is not None else None

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("extra", "source", "extra_given")]

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        *,
        source: str | os.PathLike | None = None,
        lines: Mapping[str, int] | None = None,
        extra_keys: Mapping[str, Any] | None = None,
    ) -> "PruneConfig":
        """Validate the prune_* entries of `values` (other keys are ignored) into a config."""
        extra_keys = dict(extra_keys or {})
        known = cls.known_keys()
        src = str(source) if source is not None else None
        where = _Locator(src, lines or {})
        kwargs: dict[str, Any] = {}
        extra = {k: v.default if isinstance(v, ConfigKey) else v for k, v in extra_keys.items()}
        given: set[str] = set()
        for key, value in values.items():
            if not is_plugin_key(key):
                continue
            if key in extra_keys:
                declared = extra_keys[key]
                check = declared.check if isinstance(declared, ConfigKey) else None
                try:
                    extra[key] = check(value) if check is not None else value
                except (TypeError, ValueError) as err:
                    raise PruneConfigError(f"{where(key)}{key}: {err}") from None
                given.add(key)
                continue
            if key not in known:
                hint = difflib.get_close_matches(key, known + list(extra_keys), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(known)}"
                raise PruneConfigError(f"{where(key)}unknown key {key!r}{suggestion}")
            try:
                kwargs[key] = _CHECKS[key](value)
            except (TypeError, ValueError) as err:
                raise PruneConfigError(f"{where(key)}{key}: {err}") from None
        return cls(**kwargs, extra=extra, source=src, extra_given=frozenset(given))

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.known_keys()}
        out.update(self.extra)
        return out


class _Locator:
    def __init__(self, source: str | None, lines: Mapping[str, int]) -> None:
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        if self.source is None:
            return ""
        line = self.lines.get(key)
        return f"{self.source}:{line}: " if line else f"{self.source}: "


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {value!r}")


def _choice(options: Iterable[str]):
    options = tuple(options)

    def check(value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")

    return check


def _guard(value: Any) -> str:
    # YAML reads a bare `off` as False.
    return "off" if value is False or value is None else _choice(GUARD_ACTIONS)(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def _factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise ValueError(f"must be a number > 1 (a multiple of the pre-edit perplexity), got {value!r}")
    return float(value)


def _optional_path(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return str(Path(value).expanduser())
    raise ValueError(f"must be a file path, got {value!r}")


def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"must be a non-empty list of parameter names, got {value!r}")


def _checkpoint_schedule(value: Any) -> Any:
    from .checkpoint import parse_schedule

    if value is None:
        return None
    parse_schedule(value)  # raises ValueError with what is wrong
    return value


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a non-negative integer, got {value!r}")
    return value


_CHECKS = {
    "prune": _bool,
    "prune_alpha": parse_alpha,
    "prune_mode": _choice(MODES),
    "prune_never_enlarge": _bool,
    "prune_rank_rule": parse_rank_rule,
    "prune_originals_device": _choice(ORIGINALS_DEVICES),
    "prune_targets": _names,
    "prune_telemetry": _optional_path,
    "prune_telemetry_condition": _bool,
    "prune_guard": _guard,
    "prune_guard_factor": _factor,
    "prune_guard_sentences": _positive_int,
    "prune_guard_batch_size": _positive_int,
    "prune_guard_corpus": _optional_path,
    "prune_checkpoint_dir": _optional_path,
    "prune_checkpoint_at": _checkpoint_schedule,
    "prune_seed": _seed,
}


def yaml_key_lines(path: str | os.PathLike) -> dict[str, int]:
    """1-based line of each top-level key of a YAML mapping file (empty if the file is not such a mapping)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            node = yaml.compose(stream)
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def load_yaml_config(path: str | os.PathLike, extra_keys: Mapping[str, Any] | None = None) -> PruneConfig:
    """Read the prune_* keys of an hparams YAML file."""
    import yaml

    with open(path, encoding="utf-8") as stream:
        try:
            values = yaml.safe_load(stream) or {}
        except yaml.YAMLError as err:
            raise PruneConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise PruneConfigError(f"{path}: expected a mapping of hparams keys, got {type(values).__name__}")
    return PruneConfig.from_mapping(values, source=path, lines=yaml_key_lines(path), extra_keys=extra_keys)
