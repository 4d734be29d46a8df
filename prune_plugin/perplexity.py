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


#: Logit elements converted to float64 at a time while scoring (about 32 MiB): whole rows of a batch at once.
_FLOAT64_ELEMENTS = 1 << 22


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, in float64: logsumexp(l) - l[target].

    float32 falls short of the paper's metric (its scorer takes log_softmax of float64 logits): the sum behind the
    logsumexp over a 49k vocabulary rounds to about 1e-5 of the perplexity, and cross_entropy with the class
    dimension in the middle to 1.3e-4 (SmolLM2 on ME-PPL_50). The logits are converted a few rows at a time, so
    the float64 copy stays small whatever the batch."""
    rows = max(1, _FLOAT64_ELEMENTS // max(logits.shape[1] * logits.shape[2], 1))
    out = torch.empty(targets.shape, dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start:start + rows].to(torch.float64)
        picked = chunk.gather(-1, targets[start:start + rows, :, None])[..., 0]
        out[start:start + rows] = torch.logsumexp(chunk, dim=-1) - picked
    return out


@torch.no_grad()
def sentence_perplexities(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> torch.Tensor:
    """Per-sentence perplexity (float64, one per text, in the order given), scored in length_batches with padding
    masked out and token log-probabilities in float64 (token_nll)."""
    if not texts:
        raise ValueError("no sentences to score")
    device = next(model.parameters()).device
    out = torch.empty(len(texts), dtype=torch.float64)
    for input_ids, mask, rows in length_batches(tokenizer, texts, batch_size):
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        nll = token_nll(logits[:, :-1], input_ids[:, 1:])
        scored = mask[:, 1:].double()
        out[rows] = torch.exp((nll * scored).sum(1) / scored.sum(1)).cpu()
    return out


def mean_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 10) -> float:
    """The paper's reported number: the arithmetic mean of per-sentence perplexities."""
    return float(sentence_perplexities(model, tokenizer, texts, batch_size).mean())
