"""The real `lm_eval` command line finds this plugin's tasks without --include_path and scores them correctly.

Each lm_eval process indexes all of lm-eval's ~15k built-in tasks first (about 20 s), so the runs are few and
shared between tests. Offline throughout: tiny random models saved to a temporary folder, local JSON data.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from helpers.lmeval import (
    SENTENCES,
    TARGETS,
    paper_mean_ppl,
    read_results,
    rolling_bits_per_byte,
    run_lm_eval,
    write_edit_records,
    write_sentences,
)
from prune_plugin.testing import save_pretrained, tiny_gpt2

pytestmark = pytest.mark.slow


def bias_toward(model, tokenizer, words: list[str], strength: float = 30.0):
    """Edit a tiny GPT-2 so that every position prefers `words`: a constant hidden channel (final LayerNorm
    weight 0, bias 1 in dimension 0) times a large output weight on the words' tokens acts as a logit bias."""
    ids = tokenizer.convert_tokens_to_ids(words)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[ids, 0] += strength  # tied to the input embedding; the bias is what matters
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    return {"edits": write_edit_records(folder / "edits.json"), "sentences": write_sentences(folder / "sents.json")}


def evaluate_cli(model_dir: Path, tasks: str, data: dict[str, Path], tmp: Path) -> dict:
    out = tmp / "out"
    metadata = f'{{"hardedit_path": "{data["edits"]}", "collapse_path": "{data["sentences"]}"}}'
    run_lm_eval(["run", "--model", "hf", "--model_args", f"pretrained={model_dir}", "--device", "cpu",
                 "--tasks", tasks, "--batch_size", "4", "--metadata", metadata, "--output_path", str(out)], tmp)
    return read_results(out)["results"]


@pytest.fixture(scope="module")
def unedited(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("unedited")
    model, tok = tiny_gpt2()
    model_dir = save_pretrained(model, tok, tmp / "model")
    return model, tok, evaluate_cli(model_dir, "hardedit,collapse_ppl", data, tmp)


@pytest.fixture(scope="module")
def edited(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("edited")
    model, tok = tiny_gpt2()
    model_dir = save_pretrained(bias_toward(model, tok, TARGETS), tok, tmp / "model")
    return evaluate_cli(model_dir, "hardedit", data, tmp)


def test_collapse_ppl_paper_equals_the_papers_metric_computed_independently(unedited):
    model, tok, results = unedited
    expected = paper_mean_ppl(model, tok, SENTENCES)
    got = results["collapse_ppl_paper"]["mean_ppl,none"]
    assert got == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(results["collapse_ppl_paper"]["mean_ppl_stderr,none"])


def test_collapse_ppl_rolling_reports_lm_evals_standard_metrics_which_score_the_first_token(unedited):
    model, tok, results = unedited
    rolling = results["collapse_ppl_rolling"]
    assert rolling["bits_per_byte,none"] == pytest.approx(rolling_bits_per_byte(model, tok, SENTENCES), rel=1e-4)
    assert rolling["byte_perplexity,none"] == pytest.approx(2 ** rolling["bits_per_byte,none"], rel=1e-6)
    assert math.isfinite(rolling["word_perplexity,none"]) and rolling["word_perplexity,none"] > 1


def test_hardedit_reports_each_metric_and_the_group_mean(unedited):
    _, _, results = unedited
    subtasks = ["hardedit_efficacy", "hardedit_generalization", "hardedit_locality"]
    for name in subtasks:
        for metric in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
            assert math.isfinite(results[name][metric]), (name, metric)
    mean = sum(results[name]["acc,none"] for name in subtasks) / 3
    assert results["hardedit"]["acc,none"] == pytest.approx(mean)


def test_editing_toward_the_targets_raises_efficacy_and_generalization_and_costs_locality(unedited, edited):
    _, _, before = unedited
    assert before["hardedit_efficacy"]["acc,none"] < 1.0
    assert edited["hardedit_efficacy"]["acc,none"] == 1.0
    assert edited["hardedit_generalization"]["acc,none"] == 1.0
    assert before["hardedit_locality"]["acc,none"] > 0.0
    assert edited["hardedit_locality"]["acc,none"] == 0.0


def test_lm_eval_ls_lists_plugin_tasks_and_a_users_own_task_of_the_same_name_wins(tmp_path):
    mine = tmp_path / "my_tasks"
    mine.mkdir()
    (mine / "my_efficacy.yaml").write_text(
        "task: hardedit_efficacy\ndataset_path: json\noutput_type: loglikelihood\ntest_split: train\n"
        "doc_to_text: q\ndoc_to_target: a\n", encoding="utf-8")
    out = run_lm_eval(["ls", "tasks", "--include_path", str(mine)], tmp_path).stdout

    def location(name: str) -> str:
        match = re.search(rf"^\|\s*{name}\s*\|\s*([^|]+?)\s*\|", out, re.MULTILINE)
        assert match, f"{name} not listed"
        return match.group(1)

    assert location("hardedit_efficacy") == str(mine / "my_efficacy.yaml")
    for name, file in [("hardedit", "hardedit/hardedit.yaml"),
                       ("hardedit_locality", "hardedit/hardedit_locality.yaml"),
                       ("collapse_ppl_paper", "collapse_ppl/collapse_ppl_paper.yaml"),
                       ("collapse_ppl_rolling", "collapse_ppl/collapse_ppl_rolling.yaml"),
                       ("prune_general", "prune_general/prune_general.yaml"),
                       ("prune_reasoning", "prune_general/prune_reasoning.yaml"),
                       ("prune_summarization", "prune_general/prune_summarization.yaml"),
                       ("prune_open_qa", "prune_general/prune_open_qa.yaml"),
                       ("prune_nli", "prune_general/prune_nli.yaml")]:
        assert location(name).endswith(file)
    assert re.search(r"^\|\s*collapse_ppl\s*\|$", out, re.MULTILINE), "collapse_ppl tag not listed"

