"""PRUNE's four general-ability tasks (what YAML cannot say): data, prompts, answer extraction and scoring.

Everything follows the official evaluation script (test_tasks.py in mjy1111/PRUNE): its prompt templates, its
answer extraction from the decoded text, its normalisation and its metrics. The headline metric of each task is
the protocol as the paper describes it; where the script has quirks that change numbers (a fixed 13-character
cut of every summary, a match flag in the QA loop that is never reset), a `*_script` metric reproduces the script
literally, so numbers can be compared with the paper's tables too. README.md lists each metric.
"""
from __future__ import annotations

import math
import string
from typing import Any, Sequence

import datasets
import regex  # the module the official script normalises answers with
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from prune_plugin.datasets import (
    load_nli_records,
    load_open_qa_records,
    load_reasoning_records,
    load_summarization_records,
)

REASONING_CUE = "Therefore, the answer (arabic numerals) is:"
NLI_ANSWERS = ("True", "False")  # the log-likelihood comparison scores " True" against " False"
SCRIPT_SUMMARY_CUT = 13  # the script drops the last 13 characters of every decoded summary (len("<|endoftext|>"))
_PUNCTUATION = frozenset(string.punctuation)


def _dataset(docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# ---------------------------------------------------------------------------------------------------- data
# lm-eval `custom_dataset` loaders: called with the task metadata (model arguments merged with --metadata); the
# folder is --metadata prune_tasks_dir=..., else $PRUNE_TASKS_DIR, else the small sets shipped with the plugin.

def load_reasoning(prune_tasks_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    docs = [{"doc_index": i, "question": r["question"], "answer": r["answer"],
             "prompt": f"Q: {r['question']} A:Let's think step by step. {r['rationale']} {REASONING_CUE}"}
            for i, r in enumerate(load_reasoning_records(prune_tasks_dir))]
    return _dataset(docs)


def load_summarization(prune_tasks_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    docs = [{"doc_index": i, "id": r["id"], "summary": r["summary"], "prompt": f"{r['dialogue']}\nTL;DR:"}
            for i, r in enumerate(load_summarization_records(prune_tasks_dir))]
    return _dataset(docs)


def load_open_qa(prune_tasks_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    docs = [{"doc_index": i, "question": r["question"], "answers": r["answers"],
             "prompt": ("Refer to the passage below and answer the following question. "
                        f"Passage: {r['passage']} Question: {r['question']}. Answer:")}
            for i, r in enumerate(load_open_qa_records(prune_tasks_dir))]
    return _dataset(docs)


def load_nli(prune_tasks_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    docs = [{"doc_index": i, "label": r["label"], "gold": 0 if r["label"] == "entailment" else 1,
             "prompt": f"{r['sentence1']} entails the {r['sentence2']}. True or False? answer:"}
            for i, r in enumerate(load_nli_records(prune_tasks_dir))]
    return _dataset(docs)


# ---------------------------------------------------------------------------------------------------- reasoning

def process_reasoning(doc: dict, results: Sequence[str]) -> dict[str, int]:
    """Correct when the number after '####' appears anywhere in the text after the cue (a substring search)."""
    generation, = results
    predict = (doc["prompt"] + generation).split(REASONING_CUE)[1]  # the script splits the decoded prompt + output
    return {"acc": int(doc["answer"] in predict)}


# ---------------------------------------------------------------------------------------------------- summarization

def rouge_mean_f(prediction: str, reference: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 from the `rouge` package (the script's implementation); 0 for a
    prediction of at most one character. The package refuses a prediction with no words left after its sentence
    split (e.g. "..."), which would stop the official script; it scores 0 here, like an empty one."""
    from rouge import Rouge

    if len(prediction) <= 1:
        return 0.0
    try:
        score, = Rouge().get_scores(prediction, reference)
    except ValueError:
        return 0.0
    return (score["rouge-1"]["f"] + score["rouge-2"]["f"] + score["rouge-l"]["f"]) / 3


def process_summarization(doc: dict, results: Sequence[str]) -> dict[str, float]:
    generation, = results
    predict = generation.split("DR:")[-1]
    return {"rouge": rouge_mean_f(predict, doc["summary"]),
            "rouge_script": rouge_mean_f(predict[:-SCRIPT_SUMMARY_CUT], doc["summary"])}


# ---------------------------------------------------------------------------------------------------- open-domain QA

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, as the script writes it: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = regex.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _matches(prediction: str, answers: Sequence[str]) -> bool:
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(answer) for answer in answers)


def qa_words(generation: str) -> list[str]:
    """The generated words the spans are taken from: the text after the last 'Answer:', newlines as spaces,
    normalised, split on single spaces."""
    return normalize_answer(generation.split("Answer:")[-1].replace("\n", " ")).split(" ")


def span_exact_match(words: Sequence[str], answers: Sequence[str]) -> int:
    """1 when any contiguous span of the words equals a normalised answer."""
    return int(any(_matches(" ".join(words[i:j]), answers)
                   for i in range(len(words)) for j in range(i + 1, len(words) + 1)))


def script_exact_match(words: Sequence[str], answers: Sequence[str], flag: bool) -> tuple[int, bool]:
    """The script's search loop, literally: (what it adds to its count for this record, its flag afterwards).

    The script checks the first and the last word, then spans from each start; a one-word match counts and moves
    on to the next start (so a record can count more than once), and a longer match sets a flag that is never
    reset, after which every later record only gets the spans from its first word.
    """
    if _matches(words[0], answers) or _matches(words[-1], answers):
        return 1, flag
    count = 0
    for i in range(len(words) - 1):
        output = words[i]
        if _matches(output, answers):
            count += 1
            continue
        for j in range(i + 1, len(words)):
            output = output + " " + words[j]
            if _matches(output, answers):
                count += 1
                flag = True
                break
        if flag:
            break
    return count, flag


def process_open_qa(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    generation, = results
    words = qa_words(generation)
    unflagged = script_exact_match(words, doc["answers"], False)
    flagged, _ = script_exact_match(words, doc["answers"], True)
    return {"exact_match": span_exact_match(words, doc["answers"]),
            "exact_match_script": (doc["doc_index"], unflagged[0], unflagged[1], flagged)}


def script_exact_match_rate(items: Sequence[tuple[int, int, bool, int]]) -> float:
    """Replays the script's loop over the records in file order, carrying its flag; count / number of records."""
    flag, total = False, 0
    for _, unflagged_count, sets_flag, flagged_count in sorted(items, key=lambda item: item[0]):
        if flag:
            total += flagged_count
        else:
            total += unflagged_count
            flag = sets_flag
    return total / len(items)


# ---------------------------------------------------------------------------------------------------- NLI

def nli_counts(generation: str, label: str) -> tuple[int, int, int]:
    """(correct, True/False answers, other answers) as the script counts them: 'true' / 'false' anywhere in the
    lower-cased text after 'answer:'; True is right for entailment, False for not_entailment."""
    predict = generation.split("answer:")[-1].lower()
    says_true, says_false = "true" in predict, "false" in predict
    if not (says_true or says_false):
        return 0, 0, 1
    correct = says_false if label == "not_entailment" else says_true
    return int(correct), int(says_true) + int(says_false), 0


def process_nli(doc: dict, results: Sequence[Any]) -> dict[str, Any]:
    """results: the 1-token generation, then the log-likelihoods of " True" and " False" after the same prompt."""
    generation, (ll_true, _), (ll_false, _) = results
    correct, answered, other = nli_counts(generation, doc["label"])
    predicted = 0 if ll_true >= ll_false else 1  # ties go to the first choice, as in lm-eval's multiple choice
    return {"acc": (correct, answered + other), "acc_answered": (correct, answered),
            "answered": (answered, answered + other), "acc_loglik": int(predicted == doc["gold"])}


def ratio(items: Sequence[tuple[int, int]]) -> float:
    """sum of numerators / sum of denominators; NaN when nothing was counted (the script writes 'error')."""
    denominator = sum(item[1] for item in items)
    return sum(item[0] for item in items) / denominator if denominator else math.nan


class PruneNLITask(ConfigurableTask):
    """prune_nli: the official 1-token generation, plus a log-likelihood request for each of " True" and " False"
    after the same prompt (small models rarely generate either word, so the official metric sits at its floor for
    them; the comparison is meaningful at every size)."""

    def __init__(self, config: dict | None = None) -> None:
        # lm-eval hands a Python task its whole YAML, including the `class` key that named it.
        super().__init__(config={key: value for key, value in (config or {}).items() if key != "class"})

    def construct_requests(self, doc: dict, ctx: str, **kwargs: Any) -> list[Instance]:
        generation = super().construct_requests(doc, ctx, **kwargs)
        for key in ("apply_chat_template", "chat_template"):
            kwargs.pop(key, None)
        choices = [Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, f" {answer}"), idx=i, **kwargs)
                   for i, answer in enumerate(NLI_ANSWERS, start=1)]
        return [generation, *choices]
