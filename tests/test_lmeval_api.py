"""prune_plugin.lmeval: evaluate() on an in-memory model, and the entry-point registration for TaskManager."""
from __future__ import annotations

import json
import logging
import math
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from helpers.lmeval import (
    ME_PPL_DIR,
    SENTENCES,
    bpe_tokenizer,
    llama_for,
    paper_mean_ppl,
    write_edit_records,
    write_sentences,
)
from prune_plugin import lmeval
from prune_plugin.datasets import COLLAPSE_PATH_ENV, HARDEDIT_PATH_ENV
from prune_plugin.testing import tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"hardedit_path": str(write_edit_records(folder / "edits.json")),
            "collapse_path": str(write_sentences(folder / "sents.json"))}


def test_evaluate_returns_lm_evals_results_dict_with_the_plugin_metrics(files):
    model, tok = tiny_llama()
    out = lmeval.evaluate(model, tok, ["hardedit", "collapse_ppl"], metadata=files, bootstrap_iters=0)
    results = out["results"]
    assert set(results) == {"hardedit", "hardedit_efficacy", "hardedit_generalization", "hardedit_locality",
                            "collapse_ppl_paper", "collapse_ppl_rolling"}
    for name in ("hardedit_efficacy", "hardedit_generalization", "hardedit_locality"):
        assert 0.0 <= results[name]["acc,none"] <= 1.0
    assert out["n-samples"]["hardedit_efficacy"]["effective"] == 8
    assert results["collapse_ppl_paper"]["mean_ppl,none"] == pytest.approx(
        paper_mean_ppl(model, tok, SENTENCES), rel=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(results["collapse_ppl_rolling"][metric])
    assert out["configs"]["hardedit_efficacy"]["output_type"] == "multiple_choice"


def test_evaluate_honours_limit(files):
    model, tok = tiny_llama()
    out = lmeval.evaluate(model, tok, "hardedit_locality", metadata=files, limit=3, bootstrap_iters=0)
    assert out["n-samples"]["hardedit_locality"]["effective"] == 3


def test_the_environment_is_collected_once_per_process_and_lm_eval_is_left_as_it_was(files, monkeypatch):
    import lm_eval.evaluator
    import torch.utils.collect_env

    calls = []
    monkeypatch.setattr(lmeval, "_ENV_INFO", {})
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: calls.append(1) or "env text")
    original = lm_eval.evaluator.add_env_info
    model, tok = tiny_llama()
    first, second = (lmeval.evaluate(model, tok, "hardedit_locality", metadata=files, limit=1, bootstrap_iters=0)
                     for _ in range(2))
    assert len(calls) == 1  # the `pip list` subprocesses behind it cost about 1.5 s a call
    assert first["pretty_env_info"] == second["pretty_env_info"] == "env text"
    assert second["transformers_version"] == first["transformers_version"]
    assert lm_eval.evaluator.add_env_info is original


def test_the_data_files_can_come_from_environment_variables(files, monkeypatch):
    monkeypatch.setenv(COLLAPSE_PATH_ENV, files["collapse_path"])
    monkeypatch.setenv(HARDEDIT_PATH_ENV, files["hardedit_path"])
    model, tok = tiny_llama()
    out = lmeval.evaluate(model, tok, ["collapse_ppl_rolling", "hardedit_locality"], bootstrap_iters=0)
    assert out["n-samples"]["collapse_ppl_rolling"]["effective"] == len(SENTENCES)  # not the shipped 340
    assert out["n-samples"]["hardedit_locality"]["effective"] == 8  # not the shipped 243


@pytest.mark.skipif(not (ME_PPL_DIR / "ME-PPL_50.json").exists(),
                    reason=f"the paper's ME-PPL files are not at {ME_PPL_DIR} (they are not redistributed)")
def test_me_ppl_50_scored_by_collapse_ppl_reproduces_the_papers_metric():
    """ME-PPL sentences begin with a space; with a GPT-2-style byte-level BPE tokenizer that space is part of
    the first word's token, which is the case lm-eval must reproduce exactly."""
    path = ME_PPL_DIR / "ME-PPL_50.json"
    texts = [record["Text"] for record in json.loads(path.read_text(encoding="utf-8"))]
    tok = bpe_tokenizer(texts, vocab_size=1500)  # large enough that every first word is one token, as in GPT-2
    model = llama_for(tok)
    assert max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) < 256  # no truncation
    results = lmeval.evaluate(model, tok, "collapse_ppl_paper", metadata={"collapse_path": str(path)},
                              batch_size=10, bootstrap_iters=0)
    assert results["n-samples"]["collapse_ppl_paper"]["effective"] == 50
    assert results["results"]["collapse_ppl_paper"]["mean_ppl,none"] == pytest.approx(
        paper_mean_ppl(model, tok, texts, batch_size=10), rel=1e-4)


def test_task_dir_holds_both_task_folders():
    folder = lmeval.task_dir()
    assert (folder / "hardedit" / "hardedit.yaml").is_file()
    assert (folder / "collapse_ppl" / "collapse_ppl_paper.yaml").is_file()


def test_tasks_are_found_when_prune_plugin_is_imported_from_the_source_checkout():
    # `python -m benchmarks.run` in the repository root imports the checkout's prune_plugin/, which has no tasks
    # subpackage (the installation maps tasks/ into it): the tasks/ folder beside it is used instead.
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = "import prune_plugin.lmeval as l; print(l.task_dir())"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "hardedit" / "hardedit.yaml").is_file()


def test_entry_point_names_a_module_whose_folder_holds_the_tasks():
    ep = EntryPoint(name="prune_plugin", value="prune_plugin.tasks", group=lmeval.ENTRY_POINT_GROUP)
    assert lmeval.entry_point_task_dirs([ep]) == [lmeval.task_dir()]


def test_installed_entry_points_include_this_plugin():
    assert lmeval.task_dir() in lmeval.entry_point_task_dirs()


def test_entry_point_may_name_a_path_or_a_callable_and_a_broken_one_is_skipped(tmp_path, monkeypatch, caplog):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    module = tmp_path / "plugin_paths.py"
    module.write_text(f"A = {str(tmp_path / 'a')!r}\ndef b():\n    return [{str(tmp_path / 'b')!r}]\n"
                      f"MISSING = {str(tmp_path / 'nowhere')!r}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name=n, value=v, group=lmeval.ENTRY_POINT_GROUP) for n, v in [
        ("a", "plugin_paths:A"), ("broken", "no_such_module_xyz"), ("gone", "plugin_paths:MISSING"),
        ("b", "plugin_paths:b"), ("a-again", "plugin_paths:A")]]
    with caplog.at_level(logging.WARNING, logger="prune_plugin.lmeval"):
        assert lmeval.entry_point_task_dirs(eps) == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert "'broken'" in caplog.text and "'gone'" in caplog.text and "is not a folder" in caplog.text


def test_merge_puts_plugins_before_the_users_paths_without_duplicates(tmp_path):
    plugin, other, user = tmp_path / "plugin", tmp_path / "other", tmp_path / "user"
    assert lmeval.merge_include_paths([plugin, other], str(user)) == [plugin, other, str(user)]
    assert lmeval.merge_include_paths([plugin, other], [user, str(plugin)]) == [other, user, str(plugin)]
    assert lmeval.merge_include_paths([plugin], None) == [plugin]
    assert lmeval.merge_include_paths([], None) is None


@pytest.fixture
def recorded_index_paths(monkeypatch):
    """Register on a TaskManager whose index build only records the folders it is given (the real build
    of lm-eval's 15k tasks takes ~20 s); unregister_entry_point_tasks gives the original __init__ back afterwards."""
    from lm_eval.tasks import manager

    was_registered = lmeval.unregister_entry_point_tasks()  # the start-up hook may have registered it already
    original = manager.TaskManager.__init__
    seen: list[list[Path]] = []
    monkeypatch.setattr(manager.TaskIndex, "build", staticmethod(lambda paths, **kw: seen.append(list(paths)) or {}))
    lmeval.register_entry_point_tasks()
    lmeval.register_entry_point_tasks()  # idempotent: wrapping twice would add the folders twice
    yield manager, seen
    assert lmeval.unregister_entry_point_tasks()
    assert manager.TaskManager.__init__ is original
    if was_registered:
        lmeval.register_entry_point_tasks()


def test_registered_task_manager_indexes_defaults_then_plugins_then_the_users_paths(recorded_index_paths, tmp_path):
    manager, seen = recorded_index_paths
    defaults = Path(manager.__file__).parent
    tm = manager.TaskManager(include_path=str(tmp_path))
    assert seen[-1] == [defaults, lmeval.task_dir(), tmp_path]
    assert tm.include_path == str(tmp_path)  # what the caller passed, unchanged
    manager.TaskManager()
    assert seen[-1] == [defaults, lmeval.task_dir()]


def test_registered_task_manager_leaves_include_defaults_false_alone(recorded_index_paths, tmp_path):
    manager, seen = recorded_index_paths
    manager.TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    assert seen[-1] == [tmp_path]


def test_unregistering_gives_back_the_task_managers_own_or_inherited_init():
    class Base:
        def __init__(self, include_path=None, include_defaults=True):
            self.include_path = include_path

    class Own(Base):
        def __init__(self, include_path=None, include_defaults=True):
            super().__init__(include_path, include_defaults)

    class Inherits(Base):
        pass

    own_init = Own.__init__
    for cls in (Own, Inherits):
        lmeval.register_entry_point_tasks(cls)
        assert getattr(cls.__init__, "__wrapped__", None) is not None
        assert lmeval.unregister_entry_point_tasks(cls)
        assert not lmeval.unregister_entry_point_tasks(cls)  # nothing left to undo
    assert Own.__init__ is own_init and "__init__" not in vars(Inherits)
