"""Data loading and scoring for the collapse_ppl tasks (what YAML cannot say)."""
from __future__ import annotations

import math
from typing import Any

import datasets

from prune_plugin.datasets import load_reference_sentences, resolve_reference_corpus_path
from prune_plugin.lmeval_ppl import (
    MissingTokenizerError,
    parse_bool,
    paper_ppl_docs,
    provisional_docs,
    resolve_tokenizer,
)


def load_sentences(collapse_path: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` for collapse_ppl_rolling: one doc {"text"} per reference sentence.

    The file is --metadata collapse_path=..., else $PRUNE_COLLAPSE_PATH, else the corpus shipped with the plugin.
    """
    texts = load_reference_sentences(collapse_path)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in texts])})


def load_paper_docs(collapse_path: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` for collapse_ppl_paper: each sentence split after its first token.

    The split and the number of scored tokens come from the model's tokenizer (the `tokenizer`/`pretrained` model
    arguments; see prune_plugin.lmeval_ppl). Without one (lm-eval's own task checks, which build requests with no
    model) the task still loads and builds valid requests, and scoring them says what is missing.
    """
    path = resolve_reference_corpus_path(collapse_path)
    texts = load_reference_sentences(path)
    try:
        tokenizer = resolve_tokenizer(metadata)
    except MissingTokenizerError as err:
        docs = provisional_docs(texts, str(err))
    else:
        docs = paper_ppl_docs(texts, tokenizer, parse_bool(metadata.get("add_bos_token")), source=str(path))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_paper_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """One sentence's perplexity, exp(-sum log p / n_scored); lm-eval's `mean` aggregation averages them."""
    if doc["unscored_reason"]:
        raise MissingTokenizerError(doc["unscored_reason"])
    (loglikelihood, _is_greedy), = results
    return {"mean_ppl": math.exp(-loglikelihood / doc["n_scored"])}
