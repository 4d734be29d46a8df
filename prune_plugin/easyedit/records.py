"""CounterFact-form edit records (prune_plugin.datasets) as EasyEdit's arguments and requests."""
from __future__ import annotations

from typing import Any, Sequence


def edit_kwargs(records: Sequence[dict]) -> dict[str, Any]:
    """BaseEditor.edit keyword arguments for CounterFact-form records."""
    return {
        "prompts": [r["prompt"] for r in records],
        "target_new": [r["target_new"] for r in records],
        "ground_truth": [r["ground_truth"] for r in records],
        "rephrase_prompts": [r["rephrase_prompt"] for r in records],
        "subject": [r["subject"] for r in records],
        "locality_inputs": {"neighborhood": {"prompt": [r["locality_prompt"] for r in records],
                                             "ground_truth": [r["locality_ground_truth"] for r in records]}},
    }


def request_of(record: dict) -> dict[str, Any]:
    """The fields of EasyEdit's request for a CounterFact-form record that identify it (prompt, subject, target)."""
    return {"prompt": record["prompt"], "subject": record["subject"], "target_new": record["target_new"]}
