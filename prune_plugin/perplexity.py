"""The Butterfly paper's collapse surrogate, as plain batched torch: per sentence exp(mean token NLL) with no BOS
(the first token is never scored), then the arithmetic mean over sentences."""
from __future__ import annotations

from typing import Any, Sequence

import torch


@torch.no_grad()
def sentence_perplexities(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> torch.Tensor:
    """Per-sentence perplexity (float64, one per text), scored in batches with padding masked out."""
    if not texts:
        raise ValueError("no sentences to score")
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the shift below assumes real tokens start at position 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start:start + batch_size])
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
            short = [batch[i] for i, seq in enumerate(ids) if len(seq) < 2]
            if short:
                raise ValueError(f"sentence too short to score (needs 2 tokens): {short[0]!r}")
            width = max(len(seq) for seq in ids)
            input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
            ).double()
            scored = mask[:, 1:].double()
            out.append(torch.exp((nll * scored).sum(1) / scored.sum(1)).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(out)


def mean_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> float:
    """The paper's reported number: the arithmetic mean of per-sentence perplexities."""
    return float(sentence_perplexities(model, tokenizer, texts, batch_size).mean())
