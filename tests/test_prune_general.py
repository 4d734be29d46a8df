"""prune_general: PRUNE's four general-ability tasks, scored through lm-eval exactly as the official script scores.

The reference scoring in this file is written from the protocol (../shared/data/prune-tasks/PROVENANCE.md and the
official test_tasks.py), independently of tasks/prune_general/utils.py: the tests take the generations lm-eval
produced and score them again here.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import string
from pathlib import Path

import pytest
import torch
from rouge import Rouge
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.lmeval import REPO, bpe_tokenizer
from prune_plugin import lmeval
from prune_plugin.datasets import (
    PRUNE_SAMPLE_COUNTS,
    PRUNE_TASKS_DIR_ENV,
    DataFormatError,
    default_prune_tasks_dir,
    load_nli_records,
    load_open_qa_records,
    load_reasoning_records,
    load_summarization_records,
)
from prune_plugin.testing import tiny_llama

# ../shared beside the repository, as CI lays it out (a git worktree elsewhere can name the folder instead).
OFFICIAL_DIR = Path(os.environ.get("PRUNE_OFFICIAL_TASKS_DIR", REPO.parent / "shared" / "data" / "prune-tasks"))
needs_official = pytest.mark.skipif(
    not (OFFICIAL_DIR / "test-NLI.tsv").exists(),
    reason=f"PRUNE's official task files are not at {OFFICIAL_DIR} (CI clones shared/ beside the repository)")
SUBTASKS = ("prune_reasoning", "prune_summarization", "prune_open_qa", "prune_nli")


# ------------------------------------------------------------------ the protocol, written out independently

def official_prompts(folder: Path) -> dict[str, list[str]]:
    """The four prompt templates over the first N records, read with plain json / csv as the script reads."""
    with open(folder / "test-reasoning.jsonl", encoding="utf8") as f:
        reasoning = [json.loads(line) for line in f][:358]
    with open(folder / "test-summarization.json", encoding="utf8") as f:
        summaries = json.load(f)[:149]
    with open(folder / "test-OpenDomainQA.jsonl", encoding="utf8") as f:
        qa = [json.loads(line) for line in f][:261]
    with open(folder / "test-NLI.tsv", encoding="utf8") as f:
        nli = list(csv.reader(f, delimiter="\t"))[1:300]
    return {
        "prune_reasoning": [f"Q: {r['question']} A:Let's think step by step. {r['answer'].split('#### ')[0]} "
                            "Therefore, the answer (arabic numerals) is:" for r in reasoning],
        "prune_summarization": [f"{r['dialogue']}\nTL;DR:" for r in summaries],
        "prune_open_qa": [f"Refer to the passage below and answer the following question. Passage: {r['output'][0]} "
                          f"Question: {r['question']}. Answer:" for r in qa],
        "prune_nli": [f"{row[1]} entails the {row[2]}. True or False? answer:" for row in nli],
    }


def squad_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def reference_reasoning(generations: list[str], answers: list[str]) -> float:
    return sum(answer in generation for generation, answer in zip(generations, answers)) / len(answers)


def reference_rouge(prediction: str, summary: str) -> float:
    if len(prediction) <= 1:
        return 0.0
    try:
        s = Rouge().get_scores(prediction, summary)[0]
    except ValueError:  # no words at all ("..."): the script would stop; scored as empty
        return 0.0
    return (s["rouge-1"]["f"] + s["rouge-2"]["f"] + s["rouge-l"]["f"]) / 3


def reference_open_qa(generations: list[str], answers: list[list[str]]) -> tuple[float, float]:
    """(any-span EM, the script's loop with its never-reset flag and repeated counts)."""
    def em(text, golds):
        return max(squad_normalize(text) == squad_normalize(g) for g in golds)

    any_span = script = 0
    flag = False
    for generation, golds in zip(generations, answers):
        words = squad_normalize(generation.split("Answer:")[-1].replace("\n", " ")).split(" ")
        spans = [" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)]
        any_span += any(em(span, golds) for span in spans)
        if em(words[0], golds) or em(words[-1], golds):
            script += 1
            continue
        for i in range(len(words) - 1):
            output = words[i]
            if em(output, golds):
                script += 1
                continue
            for j in range(i + 1, len(words)):
                output = output + " " + words[j]
                if em(output, golds):
                    script += 1
                    flag = True
                    break
            if flag:
                break
    return any_span / len(answers), script / len(answers)


def reference_nli(generations: list[str], labels: list[str]) -> tuple[float, float]:
    """(accuracy over all rows, accuracy over the rows answered True or False), the script's TP/FN/TN/FP."""
    tp = fn = tn = fp = others = 0
    for generation, label in zip(generations, labels):
        p = generation.split("answer:")[-1].lower()
        if "true" in p or "false" in p:
            if "not_entailment" in label.lower():
                fp += "true" in p
                fn += "false" in p
            else:
                tp += "true" in p
                tn += "false" in p
        else:
            others += 1
    answered = tp + fn + tn + fp
    return (tp + fn) / (answered + others), ((tp + fn) / answered if answered else math.nan)


# ------------------------------------------------------------------ helpers

def run(model, tok, folder: Path | None = None, **kwargs) -> dict:
    metadata = {"prune_tasks_dir": str(folder)} if folder is not None else None
    return lmeval.evaluate(model, tok, ["prune_general"], metadata=metadata, bootstrap_iters=0, log_samples=True,
                           **kwargs)


def generations(out: dict, task: str) -> list[str]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


def prompts(out: dict, task: str) -> list[str]:
    return [s["arguments"][0][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def bias_toward(model, tok, texts: list[str], strength: float = 12.0):
    """A constant logit bias on the tokens of `texts` (a constant hidden channel after the final norm, times a
    large head weight on those tokens), so that greedy generations mix real words, digits and True/False and every
    metric gets both hits and misses."""
    ids = sorted({i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"]})
    with torch.no_grad():
        model.model.norm.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[ids, 0] = strength

    def constant_channel(module, args, output):
        return output + torch.nn.functional.one_hot(torch.tensor(0), output.shape[-1]).to(output.dtype)

    model.model.norm.register_forward_hook(constant_channel)
    return model


def long_context_llama(tok, positions: int = 4096):
    """A tiny random Llama (2 layers, hidden 32) with room for the longest official prompt."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------ the official files

# Tokens each task's tiny model is biased toward, so that its official metric gets both hits and misses: digits
# for the numeric answers, common words for summaries and answers, True/False for NLI.
BIAS = {
    ("prune_reasoning",): [" 1", " 2", " 3", " 4", " 5", " 6", " 0"],
    ("prune_summarization", "prune_open_qa"): [" the", " will", " to", " is", " and", " in", " of", " she", " he",
                                               " Tom", " 1", " year", " John"],
    ("prune_nli",): [" True", " False"],
}


@pytest.fixture(scope="module")
def official_runs() -> dict[str, dict]:
    """Task name -> the lm-eval output that scored it on the official files."""
    texts = [p for task in official_prompts(OFFICIAL_DIR).values() for p in task]
    tok = bpe_tokenizer(texts, vocab_size=800)
    runs = {}
    for tasks, words in BIAS.items():
        model = bias_toward(long_context_llama(tok), tok, words)
        out = lmeval.evaluate(model, tok, list(tasks), metadata={"prune_tasks_dir": str(OFFICIAL_DIR)},
                              bootstrap_iters=0, log_samples=True, batch_size=32, model_kwargs={"max_length": 4096})
        runs.update({task: out for task in tasks})
    return runs


@needs_official
@pytest.mark.slow
def test_official_files_give_the_official_sample_counts_and_prompts(official_runs):
    expected = official_prompts(OFFICIAL_DIR)
    for task, count in zip(SUBTASKS, (358, 149, 261, 299)):
        out = official_runs[task]
        assert out["n-samples"][task]["effective"] == count
        assert prompts(out, task) == expected[task]
        assert all(s["arguments"][0][1]["do_sample"] is False for s in out["samples"][task])
    budgets = {task: official_runs[task]["samples"][task][0]["arguments"][0][1]["max_gen_toks"] for task in SUBTASKS}
    assert budgets == {"prune_reasoning": 5, "prune_summarization": 25, "prune_open_qa": 20, "prune_nli": 1}


@needs_official
@pytest.mark.slow
def test_official_files_score_as_the_protocol_scores_the_same_generations(official_runs):
    results = {task: official_runs[task]["results"][task] for task in SUBTASKS}
    with open(OFFICIAL_DIR / "test-reasoning.jsonl", encoding="utf8") as f:
        answers = [json.loads(line)["answer"].split("#### ")[1] for line in f][:358]
    got = generations(official_runs["prune_reasoning"], "prune_reasoning")
    assert results["prune_reasoning"]["acc,none"] == pytest.approx(reference_reasoning(got, answers), abs=1e-12)

    with open(OFFICIAL_DIR / "test-summarization.json", encoding="utf8") as f:
        summaries = [r["summary"] for r in json.load(f)[:149]]
    got = [g.split("DR:")[-1] for g in generations(official_runs["prune_summarization"], "prune_summarization")]
    rouge = sum(reference_rouge(g, s) for g, s in zip(got, summaries)) / 149
    script = sum(reference_rouge(g[:-13], s) for g, s in zip(got, summaries)) / 149
    assert results["prune_summarization"]["rouge,none"] == pytest.approx(rouge, abs=1e-12)
    assert results["prune_summarization"]["rouge_script,none"] == pytest.approx(script, abs=1e-12)

    with open(OFFICIAL_DIR / "test-OpenDomainQA.jsonl", encoding="utf8") as f:
        golds = [json.loads(line)["answer"] for line in f][:261]
    any_span, script = reference_open_qa(generations(official_runs["prune_open_qa"], "prune_open_qa"), golds)
    assert results["prune_open_qa"]["exact_match,none"] == pytest.approx(any_span, abs=1e-12)
    assert results["prune_open_qa"]["exact_match_script,none"] == pytest.approx(script, abs=1e-12)

    with open(OFFICIAL_DIR / "test-NLI.tsv", encoding="utf8") as f:
        labels = [row[3] for row in list(csv.reader(f, delimiter="\t"))[1:300]]
    overall, answered = reference_nli(generations(official_runs["prune_nli"], "prune_nli"), labels)
    assert results["prune_nli"]["acc,none"] == pytest.approx(overall, abs=1e-12)
    assert results["prune_nli"]["acc_answered,none"] == pytest.approx(answered, abs=1e-12)


@needs_official
@pytest.mark.slow
def test_the_biased_models_give_every_metric_hits_and_misses(official_runs):
    """Guards the parity test above against comparing zeros with zeros."""
    results = {task: official_runs[task]["results"][task] for task in SUBTASKS}
    for task, metric in [("prune_reasoning", "acc"), ("prune_summarization", "rouge"), ("prune_nli", "acc"),
                         ("prune_nli", "acc_loglik")]:
        assert 0.0 < results[task][f"{metric},none"] < 1.0, (task, metric)
    assert results["prune_nli"]["answered,none"] > 0.5


# ------------------------------------------------------------------ in-process runs on the shipped sets

@pytest.fixture(scope="module")
def default_run():
    model, tok = tiny_llama()
    return model, tok, run(model, tok)


def test_shipped_sets_run_offline_with_every_metric(default_run):
    _, _, out = default_run
    results = out["results"]
    expected = {"prune_reasoning": ["acc"], "prune_summarization": ["rouge", "rouge_script"],
                "prune_open_qa": ["exact_match", "exact_match_script"],
                "prune_nli": ["acc", "acc_answered", "answered", "acc_loglik"]}
    for task, metrics in expected.items():
        assert out["n-samples"][task]["effective"] == len(load_task(task, default_prune_tasks_dir()))
        for metric in metrics:
            assert f"{metric},none" in results[task], (task, metric)
    assert set(out["group_subtasks"]["prune_general"]) == set(SUBTASKS)


def load_task(task: str, folder: Path) -> list[dict]:
    return {"prune_reasoning": load_reasoning_records, "prune_summarization": load_summarization_records,
            "prune_open_qa": load_open_qa_records, "prune_nli": load_nli_records}[task](folder)


def test_nli_log_likelihood_metric_compares_true_against_false_on_the_same_prompt(default_run):
    model, tok, out = default_run
    hits = []
    for sample in out["samples"]["prune_nli"]:
        prompt = sample["arguments"][0][0]
        scores = []
        for answer in (" True", " False"):
            context = tok(prompt)["input_ids"]
            whole = tok(prompt + answer)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        predicted = "entailment" if scores[0] >= scores[1] else "not_entailment"
        hits.append(predicted == sample["doc"]["label"])
    assert out["results"]["prune_nli"]["acc_loglik,none"] == pytest.approx(sum(hits) / len(hits))


def test_the_environment_variable_names_the_folder(tmp_path, monkeypatch):
    folder = copy_shipped(tmp_path, keep=3)
    monkeypatch.setenv(PRUNE_TASKS_DIR_ENV, str(folder))
    model, tok = tiny_llama()
    out = lmeval.evaluate(model, tok, ["prune_reasoning", "prune_nli"], bootstrap_iters=0)
    assert out["n-samples"]["prune_reasoning"]["effective"] == 3
    assert out["n-samples"]["prune_nli"]["effective"] == 3


def copy_shipped(tmp_path: Path, keep: int) -> Path:
    """The shipped sets cut to their first `keep` records, under the official names."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    shipped = default_prune_tasks_dir()
    for name in ("test-reasoning.jsonl", "test-OpenDomainQA.jsonl"):
        lines = (shipped / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / name).write_text("".join(lines[:keep]), encoding="utf-8")
    summaries = json.loads((shipped / "test-summarization.json").read_text(encoding="utf-8"))
    (folder / "test-summarization.json").write_text(json.dumps(summaries[:keep]), encoding="utf-8")
    rows = (shipped / "test-NLI.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "test-NLI.tsv").write_text("".join(rows[:keep + 1]), encoding="utf-8")
    return folder


def test_a_prompt_longer_than_the_context_is_left_truncated_keeping_its_end(tmp_path):
    """The official script never truncates (a prompt past the model's positions fails or degrades there); lm-eval
    keeps the last max_length - budget tokens, so the question and the answer cue survive."""
    folder = copy_shipped(tmp_path, keep=2)
    long_question = " ".join(["The river flows to the sea ."] * 40) + " How many ?"
    (folder / "test-reasoning.jsonl").write_text(json.dumps(
        {"question": long_question, "answer": "It is <<1=1>>1.\n#### 1"}) + "\n", encoding="utf-8")
    model, tok = tiny_llama()  # 128 positions
    out = lmeval.evaluate(model, tok, ["prune_reasoning"], metadata={"prune_tasks_dir": str(folder)},
                          bootstrap_iters=0, log_samples=True, model_kwargs={"max_length": 64})
    sample, = out["samples"]["prune_reasoning"]
    ids = tok(sample["arguments"][0][0])["input_ids"]
    assert len(ids) > 64
    kept = torch.tensor([ids[-(64 - 5):]])
    with torch.no_grad():
        expected = model.generate(kept, attention_mask=torch.ones_like(kept), max_new_tokens=5, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    assert sample["filtered_resps"][0] == tok.decode(expected[0, kept.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------ scoring details of the official script

def utils_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_general_utils", lmeval.task_dir() / "prune_general" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qa_flag_of_the_script_is_carried_to_later_records_in_file_order():
    utils = utils_module()
    answers = [["new york city"], ["paris"]]
    # Record 0: a three-word span sets the flag. Record 1: the answer sits in the middle, which the script only
    # finds while the flag is down, so the script scores 1 of 2 while any-span EM scores 2 of 2.
    docs = [{"doc_index": 0, "answers": answers[0]}, {"doc_index": 1, "answers": answers[1]}]
    gens = ["it is new york city today", "i think paris is it"]
    items = [utils.process_open_qa(doc, [g]) for doc, g in zip(docs, gens)]
    assert [item["exact_match"] for item in items] == [1, 1]
    assert utils.script_exact_match_rate([item["exact_match_script"] for item in items]) == 0.5
    assert utils.script_exact_match_rate([item["exact_match_script"] for item in reversed(items)]) == 0.5
    assert reference_open_qa(gens, answers) == (1.0, 0.5)


def test_qa_script_counts_a_record_once_per_matching_inner_word():
    utils = utils_module()
    item = utils.process_open_qa({"doc_index": 0, "answers": ["paris"]}, ["so paris or paris now"])
    assert item["exact_match"] == 1
    assert utils.script_exact_match_rate([item["exact_match_script"]]) == 2.0
    assert reference_open_qa(["so paris or paris now"], [["paris"]]) == (1.0, 2.0)


def test_summaries_lose_their_last_13_characters_only_in_the_script_metric():
    utils = utils_module()
    doc = {"summary": "Kate will bring drinks to the picnic."}
    generation = " TL;DR: Kate will bring drinks to the picnic."
    scores = utils.process_summarization(doc, [generation])
    assert scores["rouge"] == pytest.approx(1.0)
    assert scores["rouge_script"] == pytest.approx(reference_rouge(" Kate will bring drinks t", doc["summary"]))
    assert scores["rouge_script"] < 1.0
    assert utils.process_summarization(doc, ["..."]) == {"rouge": 0.0, "rouge_script": 0.0}


def test_nli_counts_true_and_false_anywhere_in_the_answer_and_nothing_else():
    utils = utils_module()
    assert utils.nli_counts(" True", "entailment") == (1, 1, 0)
    assert utils.nli_counts(" false", "not_entailment") == (1, 1, 0)
    assert utils.nli_counts(" True", "not_entailment") == (0, 1, 0)
    assert utils.nli_counts(" Yes", "entailment") == (0, 0, 1)
    assert math.isnan(utils.ratio([(0, 0), (0, 0)]))


# ------------------------------------------------------------------ data files

def test_default_sets_are_the_shipped_files_under_the_official_names():
    folder = default_prune_tasks_dir()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        ["test-reasoning.jsonl", "test-summarization.json", "test-OpenDomainQA.jsonl", "test-NLI.tsv"])
    for task in SUBTASKS:
        assert 10 <= len(load_task(task, folder)) < PRUNE_SAMPLE_COUNTS[task.removeprefix("prune_")]


@pytest.mark.parametrize("name, content, expected", [
    ("test-reasoning.jsonl", '{"question": "q", "answer": "no mark"}\n',
     "record 0 (line 1), field 'answer': has no '####' mark"),
    ("test-reasoning.jsonl", '{"question": "q", "answer": "a #### 1"}\n\n{"question": 3, "answer": "#### 2"}\n',
     "record 1 (line 3), field 'question': expected a string"),
    ("test-reasoning.jsonl", '{"question": "q", "answer": "a #### 1"}\n{"question": \n',
     "record 1 (line 2): invalid JSON"),
    ("test-OpenDomainQA.jsonl", '{"question": "q", "answer": "Paris", "output": ["p"]}\n',
     "record 0 (line 1), field 'answer': expected a non-empty list of strings"),
    ("test-OpenDomainQA.jsonl", '{"question": "q", "answer": ["Paris"]}\n', "record 0 (line 1), field 'output': missing"),
    ("test-summarization.json", '[{"dialogue": "A: hi", "summary": ""}]', "record 0, field 'summary': empty text"),
    ("test-NLI.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n",
     "record 0 (line 2), field 'label': expected one of"),
    ("test-NLI.tsv", "id\ts1\ts2\tgold\n0\ta\tb\tentailment\n", "line 1: expected the header"),
])
def test_a_malformed_file_names_the_file_the_record_and_the_field(tmp_path, name, content, expected):
    folder = copy_shipped(tmp_path, keep=2)
    (folder / name).write_text(content, encoding="utf-8")
    loader = {"test-reasoning.jsonl": load_reasoning_records, "test-OpenDomainQA.jsonl": load_open_qa_records,
              "test-summarization.json": load_summarization_records, "test-NLI.tsv": load_nli_records}[name]
    with pytest.raises(DataFormatError) as info:
        loader(folder)
    assert str(folder / name) in str(info.value)
    assert expected in str(info.value)


def test_a_missing_folder_or_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_nli_records(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="test-NLI.tsv: no such data file"):
        load_nli_records(tmp_path)


def test_only_the_official_number_of_leading_records_is_read(tmp_path):
    folder = copy_shipped(tmp_path, keep=12)
    assert len(load_reasoning_records(folder, limit=4)) == 4
    with open(folder / "test-reasoning.jsonl", "a", encoding="utf-8") as f:
        f.write("not json\n")  # beyond the limit: the script never reads it, neither do we
    assert len(load_reasoning_records(folder, limit=12)) == 12


def test_headline_scores_read_each_groups_numbers_out_of_the_results(default_run):
    _, _, out = default_run
    scores = lmeval.headline_scores(out)
    assert list(scores) == ["reasoning (GSM8K acc)", "summarization (SAMSum ROUGE)", "open-domain QA (NQ EM)",
                            "NLI (RTE acc)", "NLI (RTE, True vs False log-likelihood)"]
    assert scores["NLI (RTE, True vs False log-likelihood)"] == out["results"]["prune_nli"]["acc_loglik,none"]
