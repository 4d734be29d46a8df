"""The Butterfly paper's collapse surrogate, as plain batched torch: per sentence exp(mean token NLL) with no BOS
(the first token is never scored), then the arithmetic mean over sentences."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def length_batches(tokenizer: Any, texts: Sequence[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """`texts` tokenized (no special tokens) and batched by token length, longest first, as lm-eval does: padding
    is then a few tokens per batch instead of up to the longest sentence of a random mix. Each batch is
    (input_ids, attention_mask, rows), right-padded, `rows` being the sentences' indices in `texts`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # one call: fast tokenizers batch it
    short = [t for t, seq in zip(texts, ids) if len(seq) < 2]
    if short:
        raise ValueError(f"sentence too short to score (needs 2 tokens): {short[0]!r}")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids = torch.full((len(rows), len(ids[rows[0]])), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(rows):  # right padding: real tokens start at position 0, as the scoring shift assumes
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        batches.append((input_ids, mask, rows))
    return batches


@torch.no_grad()
def sentence_perplexities(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> torch.Tensor:
    """Per-sentence perplexity (float64, one per text, in the order given), scored in length_batches with padding
    masked out."""
    if not texts:
        raise ValueError("no sentences to score")
    device = next(model.parameters()).device
    out = torch.empty(len(texts), dtype=torch.float64)
    for input_ids, mask, rows in length_batches(tokenizer, texts, batch_size):
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
        ).double()
        scored = mask[:, 1:].double()
        out[rows] = torch.exp((nll * scored).sum(1) / scored.sum(1)).cpu()
    return out


def mean_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> float:
    """The paper's reported number: the arithmetic mean of per-sentence perplexities."""
    return float(sentence_perplexities(model, tokenizer, texts, batch_size).mean())
