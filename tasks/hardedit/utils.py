"""Data loading for the hardedit tasks (what YAML cannot say)."""
from __future__ import annotations

from typing import Any

import datasets

from prune_plugin.datasets import EDIT_TEXT_FIELDS, load_edit_records


def load_hardedit(hardedit_path: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset`: called with the task metadata (model args merged with --metadata).

    The file is --metadata hardedit_path=..., else $PRUNE_HARDEDIT_PATH, else the set shipped with the plugin.
    Prompts and answers lose surrounding whitespace, because lm-eval puts exactly one space (target_delimiter)
    between them.
    """
    records = load_edit_records(hardedit_path)
    docs = []
    for record in records:
        doc = {field: record[field].strip() for field in EDIT_TEXT_FIELDS}
        doc["case_id"] = str(record["case_id"])  # EasyEdit uses ints, other sets strings: one column type
        docs.append(doc)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
