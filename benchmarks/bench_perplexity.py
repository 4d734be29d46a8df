"""Benchmark 4b: throughput of the collapse guard's perplexity sampler against a plain batched forward pass.

The sampler is prune_plugin.perplexity.sentence_perplexities (tokenize, pad, forward, masked token NLL). The floor
is the forward pass alone over the same pre-tokenized, padded batches (no tokenization, no loss): no sampler can
be faster than it. Target: sampler throughput >= 0.8 x the floor.

Models: tests/tiny_models.py's tiny_llama (hidden 32, 4 layers), and a random Llama shaped like SmolLM2-135M's
blocks cut to 6 layers (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49152), which is where the cost
of a real probe sits. Sentences: prune_plugin/data/reference_corpus.json (the guard's default corpus), with a
word-level tokenizer trained on it.

The lm-eval half of this benchmark (the collapse_ppl task's throughput through lm_eval against the same floor)
is a placeholder until the lm-eval integration lands: see LMEVAL_PENDING.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .common import fmt_ratio, fmt_seconds, print_table, timed

NAME = "perplexity"
TARGET = 0.8
ROOT = Path(__file__).resolve().parent.parent
LMEVAL_PENDING = ("lm-eval collapse_ppl task throughput vs the same forward-pass floor: pending (the lead adds it "
                  "once tasks/collapse_ppl and prune_plugin.lmeval_ppl are in; hook: bench_perplexity.lmeval_case)")


def load_sentences() -> list[str]:
    with open(ROOT / "prune_plugin" / "data" / "reference_corpus.json") as f:
        return [r["Text"].strip() for r in json.load(f)]


def build_models(smoke: bool, sentences: list[str]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_llama, train_tokenizer

    words = sorted({w for s in sentences for w in s.split()})
    tok = train_tokenizer(words)
    tiny, _ = tiny_llama()
    tiny.resize_token_embeddings(len(tok), mean_resizing=False)
    models = [("tiny_llama (hidden 32, 4 layers)", tiny)]
    if not smoke:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        models.append(("random SmolLM2-like (576 hidden, 6 layers, 49k vocab)", LlamaForCausalLM(cfg).eval()))
    return tok, models


def floor_batches(tok, texts: list[str], batch_size: int):
    """The same batches sentence_perplexities builds (no special tokens, right padding), tokenized ahead of time."""
    import torch

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = []
    for start in range(0, len(texts), batch_size):
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        width = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        batches.append((input_ids, mask))
    return batches


@__import__("torch").no_grad()
def proposed_sampler(model, tok, texts: list[str], batch_size: int):
    """NOT product code: what sentence_perplexities would cost if it scored with log_softmax over the last
    (contiguous) dimension and a gather, instead of cross_entropy on the (batch, vocab, length) transposed view.
    Same tokenization and batches (tokenized inside the timer, as the sampler does); same numbers."""
    import torch

    out = []
    for input_ids, mask in floor_batches(tok, texts, batch_size):
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1).double()
        scored = mask[:, 1:].double()
        out.append(torch.exp((nll * scored).sum(1) / scored.sum(1)))
    return torch.cat(out)


def run(args) -> dict[str, Any]:
    import torch

    from prune_plugin.perplexity import sentence_perplexities

    sentences = load_sentences()
    tok, models = build_models(args.smoke, sentences)
    cases = [("guard sample", 20, 10), ("whole corpus", len(sentences), 10)]
    if args.smoke:
        cases = [("smoke", 8, 4)]
    rows, records, checks = [], [], []
    for model_name, model in models:
        for case, count, batch in cases:
            texts = sentences[:: max(1, len(sentences) // count)][:count]
            batches = floor_batches(tok, texts, batch)

            @torch.no_grad()
            def floor():
                return [model(input_ids=i, attention_mask=a).logits for i, a in batches]

            t_sampler, ppl = timed(lambda: sentence_perplexities(model, tok, texts, batch), repeats=args.repeats, warmup=1)
            t_floor, logits = timed(floor, repeats=args.repeats, warmup=1)
            t_proposed, ppl_proposed = timed(lambda: proposed_sampler(model, tok, texts, batch), repeats=args.repeats, warmup=1)
            err_proposed = float((ppl_proposed - ppl).abs().max() / ppl.abs().max())
            # Agreement: the sampler's numbers from the floor's logits.
            nll = []
            for (ids, mask), lg in zip(batches, logits):
                ce = torch.nn.functional.cross_entropy(lg[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").double()
                scored = mask[:, 1:].double()
                nll.append(torch.exp((ce * scored).sum(1) / scored.sum(1)))
            err = float((torch.cat(nll) - ppl).abs().max() / ppl.abs().max())
            tokens = sum(int(a.sum()) for _, a in batches)
            ratio = t_floor.median / t_sampler.median
            records.append({"model": model_name, "case": case, "sentences": count, "batch": batch, "tokens": tokens,
                            "sampler_seconds": t_sampler.median, "floor_seconds": t_floor.median, "ratio": ratio,
                            "max_rel_diff": err, "proposed_seconds": t_proposed.median,
                            "proposed_ratio": t_floor.median / t_proposed.median, "proposed_max_rel_diff": err_proposed})
            rows.append([model_name, f"{case} ({count} sentences, batch {batch}, {tokens} tokens)",
                         fmt_seconds(t_sampler.median), fmt_seconds(t_floor.median),
                         f"{count / t_sampler.median:.0f} / {count / t_floor.median:.0f}", fmt_ratio(ratio),
                         f"{err:.0e}", f"{fmt_seconds(t_proposed.median)} ({fmt_ratio(t_floor.median / t_proposed.median)}, "
                         f"{err_proposed:.0e})"])
            checks.append({"what": f"perplexity agreement {model_name} {case}", "kind": "agreement",
                           "ok": err < 1e-6 and err_proposed < 1e-5,
                           "text": f"{model_name}, {case}: sampler perplexities = floor-logit perplexities to {err:.0e} "
                                   f"(proposed scoring: {err_proposed:.0e})"})
            if not args.smoke:
                checks.append({"what": f"perplexity throughput {model_name} {case}", "kind": "target", "ok": ratio >= TARGET,
                               "text": f"TARGET sampler >= {TARGET} x floor, {model_name}, {case}: "
                                       f"{'MET' if ratio >= TARGET else 'MISSED'} ({ratio:.2f})"})
    notes = [f"median of {args.repeats} after one warm-up; throughput = sentences per second; ratio = floor time / "
             "sampler time (1.0 = the sampler costs nothing beyond the forward pass).",
             "proposed scoring = the same sampler scoring with log_softmax(-1) + gather instead of cross_entropy on the "
             "transposed (batch, vocab, length) view (bench_perplexity.proposed_sampler; a measurement of a possible "
             "change to prune_plugin/perplexity.py, not product code).",
             LMEVAL_PENDING] + [c["text"] for c in checks]
    header = ["model", "sentences", "sampler", "forward floor", "sentences/s (sampler / floor)", "ratio", "max rel diff",
              "proposed scoring (ratio, rel diff)"]
    text = print_table(f"Collapse-perplexity sampler throughput (OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records, "checks": checks, "table": text, "pending": [LMEVAL_PENDING]}


def lmeval_case(args) -> dict[str, Any]:
    """Placeholder for the lm-eval half: run the collapse_ppl task on the same model and sentences through
    lm_eval.simple_evaluate and time it against floor_batches' forward pass. Not implemented yet (see
    LMEVAL_PENDING): the benchmark reports it as pending instead of inventing a number."""
    raise NotImplementedError(LMEVAL_PENDING)
