"""Benchmark 4: collapse-perplexity scoring, through lm-eval and through the guard's sampler, against a plain
batched forward pass over the same sentences.

- lm-eval: the collapse_ppl_paper task run end to end with lm_eval.simple_evaluate (prune_plugin.lmeval.evaluate:
  HFLM around the in-memory model, task loading, requests, forward passes, metric), on the whole corpus.
- sampler: prune_plugin.perplexity.sentence_perplexities (tokenize, pad, forward, masked token NLL), what the
  collapse guard runs after every edit, on its 20-sentence sample and on the whole corpus.
- floor: the forward pass alone over the batches the sampler builds (prune_plugin.perplexity.length_batches:
  longest first, right padded), tokenized ahead of time (no tokenization, no loss): no scorer batching this way
  can be faster than it. Target: throughput >= 0.8 x the floor.

Both scorers' perplexities are checked against the floor's logits (lm-eval's mean_ppl against the mean of the
per-sentence values).

Models: prune_plugin.testing's tiny_llama (hidden 32, 4 layers), and a random Llama shaped like SmolLM2-135M's
blocks cut to 6 layers (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49152), which is where the cost
of a real probe sits. Sentences: prune_plugin/data/reference_corpus.json (the guard's default corpus), with a
word-level tokenizer trained on it.

"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import fmt_ratio, fmt_seconds, print_table, timed

NAME = "perplexity"
TARGET = 0.8
ROOT = Path(__file__).resolve().parent.parent


def load_sentences() -> list[str]:
    with open(ROOT / "prune_plugin" / "data" / "reference_corpus.json") as f:
        return [r["Text"].strip() for r in json.load(f)]


def build_models(smoke: bool, sentences: list[str]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prune_plugin.testing import tiny_llama, train_tokenizer

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


def _in_text_order(batches, per_batch):
    import torch

    out = torch.empty(sum(len(rows) for _, _, rows in batches), dtype=torch.float64)
    for (_, _, rows), values in zip(batches, per_batch):
        out[rows] = values
    return out


@__import__("torch").no_grad()
def proposed_sampler(model, tok, texts: list[str], batch_size: int):
    """NOT product code: what sentence_perplexities would cost if it scored with log_softmax over the last
    (contiguous) dimension and a gather, instead of cross_entropy on the (batch, vocab, length) transposed view.
    Same tokenization and batches (tokenized inside the timer, as the sampler does); same numbers."""
    import torch

    from prune_plugin.perplexity import length_batches

    out = []
    batches = length_batches(tok, texts, batch_size)
    for input_ids, mask, _ in batches:
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1).double()
        scored = mask[:, 1:].double()
        out.append(torch.exp((nll * scored).sum(1) / scored.sum(1)))
    return _in_text_order(batches, out)


def floor_perplexities(batches, logits):
    """Per-sentence perplexities (no BOS, first token unscored) from the floor's logits: the agreement reference."""
    import torch

    out = []
    for (ids, mask, _), lg in zip(batches, logits):
        ce = torch.nn.functional.cross_entropy(lg[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").double()
        scored = mask[:, 1:].double()
        out.append(torch.exp((ce * scored).sum(1) / scored.sum(1)))
    return _in_text_order(batches, out)


def lmeval_collapse_ppl(model, tok, texts: list[str], batch: int, workdir: Path) -> float:
    """The collapse_ppl_paper task end to end through lm-eval on these sentences; returns its mean_ppl."""
    from prune_plugin.lmeval import evaluate

    corpus = workdir / "sentences.json"
    if not corpus.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        corpus.write_text(json.dumps([{"Corpus": "bench", "Text": t} for t in texts]))
    results = evaluate(model, tok, ["collapse_ppl_paper"], batch_size=batch, bootstrap_iters=0,
                       metadata={"collapse_path": str(corpus)}, model_kwargs={"add_bos_token": False})
    return float(results["results"]["collapse_ppl_paper"]["mean_ppl,none"])


def run(args) -> dict[str, Any]:
    import logging
    import tempfile

    import torch

    from prune_plugin.perplexity import length_batches, sentence_perplexities

    logging.getLogger("lm-eval").setLevel(logging.WARNING)  # one INFO block per evaluate() call otherwise
    sentences = load_sentences()
    tok, models = build_models(args.smoke, sentences)
    cases = [("guard sample", 20, 10), ("whole corpus", len(sentences), 10)]
    if args.smoke:
        cases = [("smoke", 8, 4)]
    rows, records, checks, fixed_costs = [], [], [], []
    scratch = tempfile.TemporaryDirectory(prefix="bench-ppl-")  # the corpus files lm-eval reads
    workdir = Path(scratch.name)
    for model_name, model in models:
        for case, count, batch in cases:
            texts = sentences[:: max(1, len(sentences) // count)][:count]
            batches = length_batches(tok, texts, batch)
            tokens = sum(int(a.sum()) for _, a, _ in batches)

            @torch.no_grad()
            def floor():
                return [model(input_ids=i, attention_mask=a).logits for i, a, _ in batches]

            t_floor, logits = timed(floor, repeats=args.repeats, warmup=1)
            reference = floor_perplexities(batches, logits)
            del logits
            scorers = [("sampler", lambda: sentence_perplexities(model, tok, texts, batch)),
                       ("proposed scoring", lambda: proposed_sampler(model, tok, texts, batch))]
            if case != "guard sample":  # lm-eval's fixed cost per call is not what a 20-sentence probe measures
                case_dir = workdir / f"{len(records)}"
                scorers.insert(0, ("lm-eval collapse_ppl_paper", lambda: lmeval_collapse_ppl(model, tok, texts, batch, case_dir)))
            if case != "guard sample":
                fixed, _ = timed(lambda: lmeval_collapse_ppl(model, tok, texts[:1], 1, workdir / f"{len(records)}-one"),
                                 repeats=args.repeats, warmup=1)
                fixed_costs.append(f"{model_name}: lm-eval's cost per evaluate() call on 1 sentence (task loading, "
                                   f"HFLM set-up): {fmt_seconds(fixed.median)}")
            for scorer, fn in scorers:
                t, value = timed(fn, repeats=args.repeats, warmup=1)
                if isinstance(value, float):  # lm-eval reports the mean over sentences
                    err = abs(value - float(reference.mean())) / float(reference.mean())
                else:
                    err = float((value - reference).abs().max() / reference.abs().max())
                ratio = t_floor.median / t.median
                records.append({"model": model_name, "case": case, "scorer": scorer, "sentences": count, "batch": batch,
                                "tokens": tokens, "seconds": t.median, "floor_seconds": t_floor.median, "ratio": ratio,
                                "max_rel_diff": err})
                rows.append([model_name, f"{case} ({count} sentences, batch {batch}, {tokens} tokens)", scorer,
                             fmt_seconds(t.median), fmt_seconds(t_floor.median),
                             f"{count / t.median:.0f} / {count / t_floor.median:.0f}", fmt_ratio(ratio), f"{err:.0e}"])
                tolerance = 1e-5 if scorer == "proposed scoring" else 1e-6 if scorer == "sampler" else 1e-4
                checks.append({"what": f"perplexity agreement {model_name} {case} {scorer}", "kind": "agreement",
                               "ok": err <= tolerance,
                               "text": f"{model_name}, {case}, {scorer}: perplexity = floor-logit perplexity to {err:.0e} "
                                       f"(<= {tolerance:.0e})"})
                if not args.smoke and scorer != "proposed scoring":
                    checks.append({"what": f"perplexity throughput {model_name} {case} {scorer}", "kind": "target",
                                   "ok": ratio >= TARGET,
                                   "text": f"TARGET {scorer} >= {TARGET} x floor, {model_name}, {case}: "
                                           f"{'MET' if ratio >= TARGET else 'MISSED'} ({ratio:.2f})"})
    notes = [f"median of {args.repeats} after one warm-up; throughput = sentences per second; ratio = floor time / "
             "scorer time (1.0 = the scorer costs nothing beyond the forward pass).",
             "lm-eval = prune_plugin.lmeval.evaluate(model, tok, ['collapse_ppl_paper'], ...) timed end to end (HFLM "
             "wrapper, task loading, requests, forward, metric), batch size as stated; its rel diff compares its "
             "mean_ppl with the mean of the floor's per-sentence perplexities.", *fixed_costs,
             "proposed scoring = the sampler scoring with log_softmax(-1) + gather instead of cross_entropy on the "
             "transposed (batch, vocab, length) view (bench_perplexity.proposed_sampler; a measurement of a possible "
             "change to prune_plugin/perplexity.py, not product code)."] + [c["text"] for c in checks]
    header = ["model", "sentences", "scorer", "scorer time", "forward floor", "sentences/s (scorer / floor)", "ratio",
              "rel diff"]
    scratch.cleanup()
    text = print_table(f"Collapse-perplexity scoring throughput (OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records, "checks": checks, "table": text}
