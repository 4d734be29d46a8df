"""Loading and checking the data formats the plugin reads.

* Edit records in EasyEdit's CounterFact form (the HardEdit / HardCF sets): a JSON list of objects with
  case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth
  (the two prompts may be lists), or in ROME's CounterFact form (requested_rewrite, paraphrase_prompts,
  neighborhood_prompts).
* Reference sentences in the Butterfly paper's ME-PPL form: a JSON list of {"Corpus": genre, "Text": sentence}.
* PRUNE's four general-ability test files (reasoning, summarization, open-domain QA, NLI), in the forms of the
  official repository's data/task-data/ folder, read the way its test_tasks.py reads them.

The official files are not redistributable, so users point at their own copies; a broken file must say exactly
where it is broken (file, record index and field; for bad JSON the line and column) instead of failing deep
inside a model run.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

HARDEDIT_PATH_ENV = "PRUNE_HARDEDIT_PATH"
COLLAPSE_PATH_ENV = "PRUNE_COLLAPSE_PATH"
PRUNE_TASKS_DIR_ENV = "PRUNE_TASKS_DIR"

# PRUNE's general-ability tasks: the official file names (data/task-data/ in mjy1111/PRUNE) and how many leading
# records its test_tasks.py scores from each.
PRUNE_TASK_FILES = {
    "reasoning": "test-reasoning.jsonl",
    "summarization": "test-summarization.json",
    "open_qa": "test-OpenDomainQA.jsonl",
    "nli": "test-NLI.tsv",
}
PRUNE_SAMPLE_COUNTS = {"reasoning": 358, "summarization": 149, "open_qa": 261, "nli": 299}
REASONING_ANSWER_MARK = "#### "
NLI_HEADER = ("index", "sentence1", "sentence2", "label")
NLI_LABELS = ("entailment", "not_entailment")

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
# Fields that may hold several prompts (CounterFact has several paraphrases and neighbours per record), and the
# list-valued field every checked record carries for each.
PROMPT_LIST_FIELDS = {"rephrase_prompt": "rephrase_prompts", "locality_prompt": "locality_prompts"}

_DATA_DIR = Path(__file__).resolve().parent / "data"


class DataFormatError(ValueError):
    """A data file that does not have the expected form; the message names file, record and field."""

    def __init__(self, path: str | os.PathLike, problem: str, *, index: int | None = None, field: str | None = None,
                 line: int | None = None):
        self.path = str(path)
        self.index = index
        self.field = field
        self.line = line
        where = self.path
        if index is not None:
            where += f": record {index}"
            if line is not None:
                where += f" (line {line})"
        elif line is not None:
            where += f": line {line}"
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
    """Check parsed edit records; returns them in EasyEdit's CounterFact form (extra fields kept).

    Two forms load: EasyEdit's (the fields of EDIT_FIELDS; `rephrase_prompt` and `locality_prompt` may each be a
    string or a list of strings, as CounterFact has several paraphrase and neighbourhood prompts), and ROME's
    CounterFact JSON (`requested_rewrite` with "{}" in its prompt, `paraphrase_prompts`, `neighborhood_prompts`),
    converted to EasyEdit's with the true object as the neighbourhood answer. Every record comes back with string
    `rephrase_prompt` / `locality_prompt` (the first of each, what EasyEdit's editor takes) and the full lists in
    `rephrase_prompts` / `locality_prompts`.
    """
    records = _non_empty_list(data, source)
    out = []
    for index, record in enumerate(records):
        _require_object(record, source, index)
        if "requested_rewrite" in record:
            record = _from_rome_form(record, source, index)
        for field in EDIT_FIELDS:
            if field not in record:
                raise DataFormatError(source, "missing", index=index, field=field)
        case_id = record["case_id"]
        if isinstance(case_id, bool) or not isinstance(case_id, (int, str)):
            raise DataFormatError(source, f"expected an integer or string, got {_describe(case_id)}",
                                  index=index, field="case_id")
        lists = {}
        for field in EDIT_TEXT_FIELDS:
            if field in PROMPT_LIST_FIELDS and isinstance(record[field], list):
                lists[field] = _text_list(record[field], source, index, field)
            else:
                _require_text(record[field], source, index, field)
                lists[field] = [record[field]]
        # Each comparison needs two different answers; equal ones would score as a tie, not as a measurement.
        if record["target_new"].strip() == record["ground_truth"].strip():
            raise DataFormatError(source, "equals ground_truth, so the edit changes nothing",
                                  index=index, field="target_new")
        if record["locality_ground_truth"].strip() == record["target_new"].strip():
            raise DataFormatError(source, "equals target_new, so locality cannot be told apart from the edit",
                                  index=index, field="locality_ground_truth")
        checked = dict(record)
        for field, plural in PROMPT_LIST_FIELDS.items():
            checked[field], checked[plural] = lists[field][0], lists[field]
        out.append(checked)
    return out


def _text_list(values: list, source: str | os.PathLike, index: int, field: str) -> list[str]:
    if not values:
        raise DataFormatError(source, "empty list", index=index, field=field)
    for position, value in enumerate(values):
        _require_text(value, source, index, f"{field}[{position}]")
    return list(values)


def _from_rome_form(record: dict, source: str | os.PathLike, index: int) -> dict:
    """ROME's CounterFact record -> EasyEdit's form (what ROME's evaluation compares, under EasyEdit's names)."""
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, dict):
        raise DataFormatError(source, f"expected a JSON object, got {_describe(rewrite)}", index=index,
                              field="requested_rewrite")
    for field in ("prompt", "subject"):
        if field not in rewrite:
            raise DataFormatError(source, "missing", index=index, field=f"requested_rewrite.{field}")
        _require_text(rewrite[field], source, index, f"requested_rewrite.{field}")
    if "{}" not in rewrite["prompt"]:
        raise DataFormatError(source, "has no '{}' where the subject goes", index=index,
                              field="requested_rewrite.prompt")
    answers = {}
    for field in ("target_new", "target_true"):
        target = rewrite.get(field)
        if not isinstance(target, dict) or "str" not in target:
            raise DataFormatError(source, f"expected an object with a 'str' field, got {_describe(target)}",
                                  index=index, field=f"requested_rewrite.{field}")
        _require_text(target["str"], source, index, f"requested_rewrite.{field}.str")
        answers[field] = target["str"]
    for field in ("case_id", "paraphrase_prompts", "neighborhood_prompts"):
        if field not in record:
            raise DataFormatError(source, "missing", index=index, field=field)
        if field != "case_id" and not isinstance(record[field], list):
            raise DataFormatError(source, f"expected a list of strings, got {_describe(record[field])}",
                                  index=index, field=field)
    extra = {k: v for k, v in record.items()
             if k not in ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")}
    return {**extra, "prompt": rewrite["prompt"].replace("{}", rewrite["subject"]), "subject": rewrite["subject"],
            "target_new": answers["target_new"], "ground_truth": answers["target_true"],
            "rephrase_prompt": _text_list(record["paraphrase_prompts"], source, index, "paraphrase_prompts"),
            "locality_prompt": _text_list(record["neighborhood_prompts"], source, index, "neighborhood_prompts"),
            "locality_ground_truth": answers["target_true"]}


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


def default_prune_tasks_dir() -> Path:
    """The small general-ability sets shipped with the plugin, under the official file names."""
    return _DATA_DIR / "prune-tasks"


def resolve_prune_tasks_dir(path: str | os.PathLike | None = None) -> Path:
    """An explicit folder wins, then $PRUNE_TASKS_DIR, then the shipped sets."""
    return _resolve(path, PRUNE_TASKS_DIR_ENV, default_prune_tasks_dir())


def prune_task_file(task: str, folder: str | os.PathLike | None = None) -> Path:
    """The file of one general-ability task ("reasoning", "summarization", "open_qa" or "nli")."""
    if task not in PRUNE_TASK_FILES:
        raise ValueError(f"unknown PRUNE task {task!r}; expected one of {sorted(PRUNE_TASK_FILES)}")
    folder = resolve_prune_tasks_dir(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (it should hold {', '.join(PRUNE_TASK_FILES.values())})")
    return folder / PRUNE_TASK_FILES[task]


def read_json_lines(path: str | os.PathLike, limit: int | None = None) -> list[tuple[int, Any]]:
    """(line number, value) of the first `limit` non-blank lines of a JSON-lines file; errors name the line."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    out: list[tuple[int, Any]] = []
    with handle:
        try:
            for number, text in enumerate(handle, start=1):
                if limit is not None and len(out) >= limit:
                    break
                if not text.strip():
                    continue
                try:
                    out.append((number, json.loads(text)))
                except json.JSONDecodeError as err:
                    raise DataFormatError(path, f"invalid JSON at column {err.colno}: {err.msg}",
                                          index=len(out), line=number) from None
        except UnicodeDecodeError as err:
            raise DataFormatError(path, f"not UTF-8 text (byte offset {err.start} of a line)") from None
    if not out:
        raise DataFormatError(path, "the file holds no records")
    return out


def load_reasoning_records(folder: str | os.PathLike | None = None,
                           limit: int | None = PRUNE_SAMPLE_COUNTS["reasoning"]) -> list[dict]:
    """GSM8K-form lines {"question", "answer"}, where answer is the rationale, then "#### " and the number.

    Returns {"question", "rationale", "answer"} split at the first "#### " as the official script splits it
    (rationale = the text before it, answer = the text after it up to a second mark, if any).
    """
    path = prune_task_file("reasoning", folder)
    records = []
    for index, (line, record) in enumerate(read_json_lines(path, limit)):
        _require_fields(record, path, index, ("question", "answer"), line=line)
        if REASONING_ANSWER_MARK not in record["answer"]:
            raise DataFormatError(path, f"has no {REASONING_ANSWER_MARK.strip()!r} mark before the final answer",
                                  index=index, field="answer", line=line)
        parts = record["answer"].split(REASONING_ANSWER_MARK)
        if not parts[1].strip():
            raise DataFormatError(path, f"nothing after the {REASONING_ANSWER_MARK.strip()!r} mark",
                                  index=index, field="answer", line=line)
        records.append({"question": record["question"], "rationale": parts[0], "answer": parts[1]})
    return records


def load_summarization_records(folder: str | os.PathLike | None = None,
                               limit: int | None = PRUNE_SAMPLE_COUNTS["summarization"]) -> list[dict]:
    """SAMSum-form JSON list of {"id", "dialogue", "summary"} ("id" optional); the first `limit` records."""
    path = prune_task_file("summarization", folder)
    data = _non_empty_list(read_json(path), path)[:limit]
    records = []
    for index, record in enumerate(data):
        _require_fields(record, path, index, ("dialogue", "summary"))
        records.append({"id": str(record.get("id", index)), "dialogue": record["dialogue"],
                        "summary": record["summary"]})
    return records


def load_open_qa_records(folder: str | os.PathLike | None = None,
                         limit: int | None = PRUNE_SAMPLE_COUNTS["open_qa"]) -> list[dict]:
    """Natural Questions lines {"question", "answer": [..], "output": [passage, ..]}; the prompt uses output[0]."""
    path = prune_task_file("open_qa", folder)
    records = []
    for index, (line, record) in enumerate(read_json_lines(path, limit)):
        _require_fields(record, path, index, ("question",), line=line)
        for field in ("answer", "output"):
            if field not in record:
                raise DataFormatError(path, "missing", index=index, field=field, line=line)
            values = record[field]
            if not isinstance(values, list) or not values:
                raise DataFormatError(path, f"expected a non-empty list of strings, got {_describe(values)}",
                                      index=index, field=field, line=line)
            for position, value in enumerate(values):
                if not isinstance(value, str):
                    raise DataFormatError(path, f"item {position}: expected a string, got {_describe(value)}",
                                          index=index, field=field, line=line)
        if not record["output"][0].strip():
            raise DataFormatError(path, "item 0 (the passage) is empty", index=index, field="output", line=line)
        records.append({"question": record["question"], "answers": list(record["answer"]),
                        "passage": record["output"][0]})
    return records


def load_nli_records(folder: str | os.PathLike | None = None,
                     limit: int | None = PRUNE_SAMPLE_COUNTS["nli"]) -> list[dict]:
    """RTE-form TSV (header index, sentence1, sentence2, label), parsed with the csv module's default quoting and
    a tab delimiter exactly as the official script reads it; the first `limit` rows after the header."""
    path = prune_task_file("nli", folder)
    try:
        handle = path.open(encoding="utf-8")  # no newline="": the official script opens it plainly
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    records = []
    with handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader, None)
            if header is None or tuple(field.strip() for field in header[:4]) != NLI_HEADER:
                raise DataFormatError(path, f"expected the header {chr(9).join(NLI_HEADER)!r}, got {header!r}",
                                      line=1)
            for row in reader:
                if limit is not None and len(records) >= limit:
                    break
                index, line = len(records), reader.line_num
                if len(row) < 4:
                    raise DataFormatError(path, f"expected 4 tab-separated fields, got {len(row)}",
                                          index=index, line=line)
                for field, value in zip(NLI_HEADER[1:3], row[1:3]):
                    if not value.strip():
                        raise DataFormatError(path, "empty text", index=index, field=field, line=line)
                if row[3] not in NLI_LABELS:
                    raise DataFormatError(path, f"expected one of {NLI_LABELS}, got {row[3]!r}",
                                          index=index, field="label", line=line)
                records.append({"index": row[0], "sentence1": row[1], "sentence2": row[2], "label": row[3]})
        except UnicodeDecodeError as err:
            raise DataFormatError(path, f"not UTF-8 text (byte offset {err.start} of a line)") from None
    if not records:
        raise DataFormatError(path, "the file holds no rows after the header")
    return records


def _require_fields(record: Any, source: str | os.PathLike, index: int, fields: tuple[str, ...],
                    line: int | None = None) -> None:
    if not isinstance(record, dict):
        raise DataFormatError(source, f"expected a JSON object, got {_describe(record)}", index=index, line=line)
    for field in fields:
        if field not in record:
            raise DataFormatError(source, "missing", index=index, field=field, line=line)
        value = record[field]
        if not isinstance(value, str):
            raise DataFormatError(source, f"expected a string, got {_describe(value)}", index=index, field=field,
                                  line=line)
        if not value.strip():
            raise DataFormatError(source, "empty text", index=index, field=field, line=line)


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
