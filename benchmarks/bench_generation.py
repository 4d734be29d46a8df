"""Benchmark 6: PRUNE's general-ability tasks (prune_general) through lm-eval against a plain batched generate loop.

- lm-eval: prune_plugin.lmeval.evaluate(model, tok, [task], limit=N, batch_size=B) end to end (HFLM wrapper, task
  loading, requests, lm-eval's batched generate_until, scoring), one call per subtask.
- floor: model.generate over the same prompts (from the task's own docs) and the same budget, tokenized ahead of
  time, longest first in batches of B, left padded, greedy; for prune_nli also the forward passes over
  prompt + " True" and prompt + " False" that its log-likelihood metric needs. Nothing else: no scorer that
  generates these tokens can be faster. Target: lm-eval's throughput >= 0.8 x the floor's.

Agreement: the share of prompts whose generation is the same text in both (decoded without special tokens).
The two legs alternate, `--repeats` times each, so load on a shared machine falls on both; the ratio is the median
of the per-round ratios.

Data: the official files when --prune-tasks-dir (or $PRUNE_TASKS_DIR, or ../shared/data/prune-tasks beside the
repository) holds them, else the small shipped sets; the first --general-limit prompts of each subtask (default 16:
the official counts, 1,067 prompts, take tens of minutes per leg on one CPU thread). Model: the embedded SmolLM2-135M
(smoke: prune_plugin.testing's tiny Llama on the shipped sets).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from .common import fmt_ratio, fmt_seconds, print_table

NAME = "generation"
TARGET = 0.8
ROOT = Path(__file__).resolve().parent.parent
SUBTASKS = ("prune_reasoning", "prune_summarization", "prune_open_qa", "prune_nli")
NLI_CHOICES = (" True", " False")


def data_dir(explicit: str | None) -> Path | None:
    """The folder with the official files, or None for the shipped sets."""
    for candidate in (explicit, os.environ.get("PRUNE_TASKS_DIR"), ROOT.parent / "shared" / "data" / "prune-tasks"):
        if candidate and (Path(candidate) / "test-NLI.tsv").exists():
            return Path(candidate)
    return None


def task_prompts(task: str, folder: Path | None, limit: int) -> tuple[list[str], int]:
    """(the first `limit` prompts exactly as lm-eval builds them, the task's new-token budget)."""
    from lm_eval.tasks import TaskManager

    from prune_plugin.lmeval import task_dir

    metadata = {"prune_tasks_dir": str(folder)} if folder is not None else {}
    loaded = TaskManager(include_path=[str(task_dir())], include_defaults=False, metadata=metadata).load([task])
    built = loaded["tasks"][task]
    docs = list(built.test_docs())[:limit]
    return [built.doc_to_text(doc) for doc in docs], int(built.config.generation_kwargs["max_gen_toks"])


def left_padded_batches(tok, texts: list[str], batch: int):
    """Longest first (as lm-eval orders generation requests), left padded: (ids, mask, rows) per batch."""
    import torch

    encoded = [tok(text)["input_ids"] for text in texts]
    order = sorted(range(len(texts)), key=lambda i: (-len(encoded[i]), texts[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = []
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = max(len(encoded[r]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(encoded[r]):] = torch.tensor(encoded[r])
            mask[i, width - len(encoded[r]):] = 1
        batches.append((ids, mask, rows))
    return batches


def make_floor(model, tok, prompts: list[str], budget: int, batch: int, choices: tuple[str, ...] = ()):
    """The floor as a zero-argument function returning the decoded generations in prompt order."""
    import torch

    generate_batches = left_padded_batches(tok, prompts, batch)
    choice_batches = [left_padded_batches(tok, [p + c for p in prompts], batch) for c in choices]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def floor() -> list[str]:
        out: list[Any] = [None] * len(prompts)
        for ids, mask, rows in generate_batches:
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                       pad_token_id=pad)
            for row, tokens in zip(rows, generated[:, ids.shape[1]:]):
                out[row] = tokens
        for batches in choice_batches:
            for ids, mask, _ in batches:
                model(input_ids=ids, attention_mask=mask)
        return [tok.decode(tokens, skip_special_tokens=True) for tokens in out]

    return floor


def lmeval_generations(model, tok, task: str, folder: Path | None, limit: int, batch: int) -> list[str]:
    from prune_plugin.lmeval import evaluate

    metadata = {"prune_tasks_dir": str(folder)} if folder is not None else None
    out = evaluate(model, tok, [task], batch_size=batch, limit=limit, metadata=metadata, bootstrap_iters=0,
                   log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


def build_model(smoke: bool):
    if smoke:
        from prune_plugin.testing import tiny_llama

        model, tok = tiny_llama()
        return model, tok, "tiny_llama (hidden 32, 4 layers)"
    from prune_plugin.models import load_model

    model, tok = load_model(None)
    return model, tok, "SmolLM2-135M (embedded)"


def run(args) -> dict[str, Any]:
    import logging

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    folder = None if args.smoke else data_dir(getattr(args, "prune_tasks_dir", None))
    limit = 4 if args.smoke else (getattr(args, "general_limit", None) or 16)
    batch = 4 if args.smoke else 8
    model, tok, model_name = build_model(args.smoke)
    rounds = 1 if args.smoke else max(1, args.repeats)  # smoke: one round, it only checks that the legs agree
    rows, records, checks = [], [], []
    chosen = getattr(args, "general_tasks", None)
    tasks = [t for t in SUBTASKS if not chosen or t in chosen.split(",")]
    if chosen and not tasks:
        raise SystemExit(f"--general-tasks {chosen}: none of {', '.join(SUBTASKS)}")
    for task in tasks:
        prompts, budget = task_prompts(task, folder, limit)
        floor = make_floor(model, tok, prompts, budget, batch, NLI_CHOICES if task == "prune_nli" else ())
        floor_times, lmeval_times, ratios = [], [], []
        floor_out = lmeval_out = None
        for _ in range(rounds):
            t0 = time.perf_counter()
            floor_out = floor()
            floor_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lmeval_out = lmeval_generations(model, tok, task, folder, limit, batch)
            lmeval_times.append(time.perf_counter() - t0)
            ratios.append(floor_times[-1] / lmeval_times[-1])
        same = sum(a == b for a, b in zip(floor_out, lmeval_out)) / len(prompts)
        t_floor, t_lmeval, ratio = (statistics.median(x) for x in (floor_times, lmeval_times, ratios))
        records.append({"task": task, "model": model_name, "prompts": len(prompts), "budget": budget, "batch": batch,
                        "floor_seconds": t_floor, "lmeval_seconds": t_lmeval, "ratio": ratio, "same_generations": same,
                        "official_files": folder is not None})
        rows.append([task, f"{len(prompts)} x {budget} tokens", fmt_seconds(t_lmeval), fmt_seconds(t_floor),
                     f"{len(prompts) / t_lmeval:.2f} / {len(prompts) / t_floor:.2f}", fmt_ratio(ratio), f"{same:.0%}"])
        checks.append({"what": f"generation agreement {task}", "kind": "agreement", "ok": same >= 0.95,
                       "text": f"{task}: lm-eval and the floor generate the same text for {same:.0%} of the prompts "
                               "(>= 95 %)"})
        if not args.smoke:
            checks.append({"what": f"generation throughput {task}", "kind": "target", "ok": ratio >= TARGET,
                           "text": f"TARGET lm-eval >= {TARGET} x floor, {task}: "
                                   f"{'MET' if ratio >= TARGET else 'MISSED'} ({ratio:.2f})"})
    source = f"official files in {folder}" if folder is not None else "the shipped default sets"
    notes = [f"{model_name}; {source}, first {limit} prompts of each subtask; batch size {batch}; "
             f"{rounds} alternating round(s), medians; ratio = floor time / lm-eval time "
             "(median of the per-round ratios).",
             "lm-eval = prune_plugin.lmeval.evaluate(model, tok, [task], limit=..., batch_size=...) end to end, "
             "scoring included; floor = model.generate on pre-tokenized, left-padded, longest-first batches (and, "
             "for prune_nli, the forward passes of its two log-likelihood requests)."] + [c["text"] for c in checks]
    header = ["task", "prompts x budget", "lm-eval", "floor", "prompts/s (lm-eval / floor)", "ratio", "same text"]
    text = print_table(f"prune_general generation throughput (OMP_NUM_THREADS={args.threads})", header, rows, notes)
    return {"name": NAME, "records": records, "checks": checks, "table": text}
