"""Loading and checking the two data formats the plugin reads.

* Edit records in EasyEdit's CounterFact form (the HardEdit / HardCF sets): a JSON list of objects with
  case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth.
* Reference sentences in the Butterfly paper's ME-PPL form: a JSON list of {"Corpus": genre, "Text": sentence}.

The official files are not redistributable, so users point at their own copies; a broken file must say exactly
where it is broken (file, record index and field; for bad JSON the line and column) instead of failing deep
inside a model run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HARDEDIT_PATH_ENV = "PRUNE_HARDEDIT_PATH"
COLLAPSE_PATH_ENV = "PRUNE_COLLAPSE_PATH"

EDIT_TEXT_FIELDS = (
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
EDIT_FIELDS = ("case_id",) + EDIT_TEXT_FIELDS

_DATA_DIR = Path(__file__).resolve().parent / "data"


class DataFormatError(ValueError):
    """A data file that does not have the expected form; the message names file, record and field."""

    def __init__(self, path: str | os.PathLike, problem: str, *, index: int | None = None, field: str | None = None):
        self.path = str(path)
        self.index = index
        self.field = field
        where = self.path
        if index is not None:
            where += f": record {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


def default_edit_records_path() -> Path:
    """The HardEdit-style edit set shipped with the plugin."""
    return _DATA_DIR / "hardedit.json"


def default_reference_corpus_path() -> Path:
    """The ME-PPL-style reference sentences shipped with the plugin."""
    return _DATA_DIR / "reference_corpus.json"


def resolve_edit_records_path(path: str | os.PathLike | None = None) -> Path:
    """An explicit path wins, then $PRUNE_HARDEDIT_PATH, then the shipped file."""
    return _resolve(path, HARDEDIT_PATH_ENV, default_edit_records_path())


def resolve_reference_corpus_path(path: str | os.PathLike | None = None) -> Path:
    """An explicit path wins, then $PRUNE_COLLAPSE_PATH, then the shipped file."""
    return _resolve(path, COLLAPSE_PATH_ENV, default_reference_corpus_path())


def _resolve(path: str | os.PathLike | None, env: str, default: Path) -> Path:
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return default


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; syntax errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"not UTF-8 text (byte offset {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented UTF-8 JSON through a temporary file, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_edit_records(path: str | os.PathLike | None = None) -> list[dict]:
    """Edit records in CounterFact form, checked; `path=None` follows resolve_edit_records_path()."""
    path = resolve_edit_records_path(path)
    return validate_edit_records(read_json(path), path)


def load_reference_sentences(path: str | os.PathLike | None = None) -> list[str]:
    """The "Text" of every ME-PPL-form record, exactly as written (leading spaces change tokenization)."""
    path = resolve_reference_corpus_path(path)
    return [record["Text"] for record in validate_reference_records(read_json(path), path)]


def validate_edit_records(data: Any, source: str | os.PathLike = "<edit records>") -> list[dict]:
    """Check parsed CounterFact-form data; returns shallow copies of the records (extra fields kept)."""
    records = _non_empty_list(data, source)
    out = []
    for index, record in enumerate(records):
        _require_object(record, source, index)
        for field in EDIT_FIELDS:
            if field not in record:
                raise DataFormatError(source, "missing", index=index, field=field)
        case_id = record["case_id"]
        if isinstance(case_id, bool) or not isinstance(case_id, (int, str)):
            raise DataFormatError(source, f"expected an integer or string, got {_describe(case_id)}",
                                  index=index, field="case_id")
        for field in EDIT_TEXT_FIELDS:
            _require_text(record[field], source, index, field)
        # Each comparison needs two different answers; equal ones would score as a tie, not as a measurement.
        if record["target_new"].strip() == record["ground_truth"].strip():
            raise DataFormatError(source, "equals ground_truth, so the edit changes nothing",
                                  index=index, field="target_new")
        if record["locality_ground_truth"].strip() == record["target_new"].strip():
            raise DataFormatError(source, "equals target_new, so locality cannot be told apart from the edit",
                                  index=index, field="locality_ground_truth")
        out.append(dict(record))
    return out


def validate_reference_records(data: Any, source: str | os.PathLike = "<reference sentences>") -> list[dict]:
    """Check parsed ME-PPL-form data ({"Corpus": str, "Text": str}; Corpus optional)."""
    records = _non_empty_list(data, source)
    for index, record in enumerate(records):
        _require_object(record, source, index)
        if "Text" not in record:
            raise DataFormatError(source, "missing", index=index, field="Text")
        _require_text(record["Text"], source, index, "Text")
        if "Corpus" in record and not isinstance(record["Corpus"], str):
            raise DataFormatError(source, f"expected a string, got {_describe(record['Corpus'])}",
                                  index=index, field="Corpus")
    return [dict(record) for record in records]


def _non_empty_list(data: Any, source: str | os.PathLike) -> list:
    if not isinstance(data, list):
        raise DataFormatError(source, f"expected a JSON list of records, got {_describe(data)}")
    if not data:
        raise DataFormatError(source, "the list of records is empty")
    return data


def _require_object(record: Any, source: str | os.PathLike, index: int) -> None:
    if not isinstance(record, dict):
        raise DataFormatError(source, f"expected a JSON object, got {_describe(record)}", index=index)


def _require_text(value: Any, source: str | os.PathLike, index: int, field: str) -> None:
    if not isinstance(value, str):
        raise DataFormatError(source, f"expected a string, got {_describe(value)}", index=index, field=field)
    if not value.strip():
        raise DataFormatError(source, "empty text", index=index, field=field)


def _describe(value: Any) -> str:
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
    shown = repr(value)
    return f"{kind} {shown[:40] + '...' if len(shown) > 40 else shown}"
