"""The Butterfly paper's collapse surrogate, as plain batched torch: per sentence exp(mean token NLL) with no BOS
(the first token is never scored), then the arithmetic mean over sentences."""
from __future__ import annotations

from typing import Any, Sequence

import torch


@torch.no_grad()
def sentence_perplexities(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> torch.Tensor:
    """Per-sentence perplexity (float64, one per text, in the order given), scored in batches with padding masked out.

    Sentences are batched by token length (longest first), as lm-eval does: padding is then a few tokens per
    batch instead of up to the longest sentence of a random mix, and the forward pass does that much less work.
    """
    if not texts:
        raise ValueError("no sentences to score")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # one call: fast tokenizers batch it
    short = [t for t, seq in zip(texts, ids) if len(seq) < 2]
    if short:
        raise ValueError(f"sentence too short to score (needs 2 tokens): {short[0]!r}")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(ids), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = len(ids[rows[0]])
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):  # right padding: real tokens start at position 0, as the shift assumes
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
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
