"""Data, requests and scoring for the hardedit tasks (what YAML cannot say).

One doc per edit record. A doc holds the subtask's prompts (one for efficacy; every paraphrase or neighbourhood
prompt for generalization and locality, as CounterFact has several) and its two answers, preferred first. Each
prompt gets a log-likelihood request per answer, plus one per token of the preferred answer for EasyEdit's token
accuracy (prune_plugin.lmeval_edit). A record's score is the mean over its prompts, and a subtask's the mean over
records, as in ROME's evaluation.
"""
from __future__ import annotations

from typing import Any, Sequence

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from prune_plugin.datasets import load_edit_records, resolve_edit_records_path
from prune_plugin.lmeval_edit import continuation_length, counterfact_scores, lm_eval_encoding, token_pieces
from prune_plugin.lmeval_ppl import MissingTokenizerError, parse_bool, resolve_tokenizer

METRICS = ("acc", "acc_total", "acc_norm", "token_acc")
# subtask -> (field with its prompts, field with the preferred answer, field with the other answer)
SUBTASKS = {
    "efficacy": ("prompt", "target_new", "ground_truth"),
    "generalization": ("rephrase_prompts", "target_new", "ground_truth"),
    "locality": ("locality_prompts", "locality_ground_truth", "target_new"),
}


def _load(subtask: str, hardedit_path: str | None, metadata: dict[str, Any]) -> datasets.DatasetDict:
    """The file is --metadata hardedit_path=..., else $PRUNE_HARDEDIT_PATH, else the set shipped with the plugin.
    Prompts and answers lose surrounding whitespace, because lm-eval puts exactly one space between them."""
    path = resolve_edit_records_path(hardedit_path)
    records = load_edit_records(path)
    try:
        tokenizer = resolve_tokenizer(metadata, "hardedit needs the model's tokenizer to count answer tokens")
        encoding, reason = lm_eval_encoding(tokenizer, parse_bool(metadata.get("add_bos_token"))), ""
    except MissingTokenizerError as err:  # lm-eval's model-free task checks: the requests still build
        encoding, reason = None, str(err)
    prompts_field, preferred_field, other_field = SUBTASKS[subtask]
    docs = []
    for index, record in enumerate(records):
        prompts = record[prompts_field]
        prompts = [p.strip() for p in ([prompts] if isinstance(prompts, str) else prompts)]
        choices = [record[preferred_field].strip(), record[other_field].strip()]
        lengths, pieces = [], []
        if encoding is not None:
            try:
                lengths = [[continuation_length(encoding, p, c) for c in choices] for p in prompts]
                pieces = [token_pieces(encoding, p, choices[0]) for p in prompts]
            except ValueError as err:
                raise ValueError(f"{path}: record {index}, field {prompts_field!r}: {err}") from None
        docs.append({"case_id": str(record["case_id"]), "prompt": prompts[0], "prompts": prompts,
                     "choices": choices, "lengths": lengths, "pieces": pieces, "unscored_reason": reason})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_efficacy(hardedit_path: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return _load("efficacy", hardedit_path, metadata)


def load_generalization(hardedit_path: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return _load("generalization", hardedit_path, metadata)


def load_locality(hardedit_path: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return _load("locality", hardedit_path, metadata)


class HardEditTask(ConfigurableTask):
    """Per prompt: one log-likelihood request per answer, then one per token of the preferred answer."""

    def __init__(self, config: dict | None = None) -> None:
        # lm-eval hands a Python task its whole YAML, including the `class` key that named it.
        super().__init__(config={key: value for key, value in (config or {}).items() if key != "class"})

    def construct_requests(self, doc: dict, ctx: str, **kwargs: Any) -> list[Instance]:
        for key in ("apply_chat_template", "chat_template"):
            kwargs.pop(key, None)
        arguments = []
        for i, prompt in enumerate(doc["prompts"]):
            arguments += [(prompt, f" {choice}") for choice in doc["choices"]]
            arguments += [tuple(piece) for piece in (doc["pieces"][i] if doc["pieces"] else [])]
        return [Instance(request_type="loglikelihood", doc=doc, arguments=arg, idx=i, **kwargs)
                for i, arg in enumerate(arguments)]


def process_results(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    if doc["unscored_reason"]:
        raise MissingTokenizerError(doc["unscored_reason"])
    per_prompt = []
    position = 0
    chars = [len(choice) for choice in doc["choices"]]
    for i in range(len(doc["prompts"])):
        lls = [results[position][0], results[position + 1][0]]
        greedy = [is_greedy for _, is_greedy in results[position + 2 : position + 2 + len(doc["pieces"][i])]]
        position += 2 + len(doc["pieces"][i])
        scores = counterfact_scores(lls, doc["lengths"][i], chars)
        scores["token_acc"] = sum(greedy) / len(greedy)
        per_prompt.append(scores)
    return {metric: sum(s[metric] for s in per_prompt) / len(per_prompt) for metric in METRICS}
