"""Every task of the plugin passes the checks of lm-eval's own task test suite (tests/test_tasks.py of
lm-evaluation-harness: download, split flags, decontamination flag, doc_to_text / doc_to_choice / doc_to_target on
10 docs, building and constructing requests), with no model and no tokenizer, as that suite runs them.

The checks are written out here (the suite itself is not installed with lm-eval).
"""
from __future__ import annotations

from itertools import islice

import pytest

from prune_plugin import lmeval
from prune_plugin.lmeval_ppl import MissingTokenizerError

LIMIT = 10
OUR_TASKS = ["hardedit_efficacy", "hardedit_generalization", "hardedit_locality", "collapse_ppl_paper",
             "collapse_ppl_rolling", "prune_reasoning", "prune_summarization", "prune_open_qa", "prune_nli"]


def model_free_tasks() -> dict:
    """Our tasks as lm-eval builds them for its suite: a TaskManager with no metadata, so no model arguments."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(lmeval.task_dir())], include_defaults=False)
    return dict(manager.load(OUR_TASKS)["tasks"])


@pytest.fixture(scope="module")
def tasks() -> dict:
    return model_free_tasks()


def first_docs(task) -> list[dict]:
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    return list(islice(docs, LIMIT))


def test_every_task_of_every_folder_is_checked(tasks):
    names = {path.stem for path in lmeval.task_dir().glob("*/*.yaml")}
    groups = {"hardedit", "prune_general"}
    assert set(tasks) == set(OUR_TASKS) == names - groups


@pytest.mark.parametrize("name", OUR_TASKS)
def test_lm_evals_task_checks_pass_without_a_model(tasks, name):
    task = tasks[name]
    task.download()
    assert task.dataset is not None
    for has, split in [(task.has_training_docs, "training_split"), (task.has_validation_docs, "validation_split"),
                       (task.has_test_docs, "test_split")]:
        assert has() in (True, False)
        if has():
            assert task._config[split] is not None
    assert task.should_decontaminate() in (True, False)
    if task.should_decontaminate():
        assert task._config["doc_to_decontamination_query"] is not None

    docs = first_docs(task)
    assert len(docs) == LIMIT
    delimiter = task.config.target_delimiter
    for text in (task.doc_to_text(doc) for doc in docs):
        assert isinstance(text, str)
        assert not (delimiter.isspace() and text and text[-1].isspace()), \
            "doc_to_text ends in a whitespace and the target delimiter is one too"
    if "multiple_choice" in task._config.output_type:
        choices = [task.doc_to_choice(doc) for doc in docs]
        assert all(isinstance(c, list) and isinstance(c[0], str) for c in choices)
        assert all(isinstance(task.doc_to_target(doc), (int, str)) for doc in docs)

    task.build_all_requests(rank=1, limit=LIMIT, world_size=1)
    assert task.instances is not None
    requests = [task.construct_requests(doc=doc, ctx=task.doc_to_text(doc)) for doc in docs]
    assert len(requests) == LIMIT


def test_collapse_ppl_paper_without_a_tokenizer_loads_but_says_so_when_scored(tasks):
    task = tasks["collapse_ppl_paper"]
    doc = first_docs(task)[0]
    assert doc["context"] + doc["continuation"] == doc["text"]
    with pytest.raises(MissingTokenizerError, match="needs the model's tokenizer"):
        task.process_results(doc, [(-3.0, False)])


def test_hardedit_without_a_tokenizer_loads_but_says_so_when_scored(tasks):
    task = tasks["hardedit_efficacy"]
    doc = first_docs(task)[0]
    assert len(task.construct_requests(doc=doc, ctx=task.doc_to_text(doc))) == 2  # the two answers, no token pieces
    with pytest.raises(MissingTokenizerError, match="hardedit needs the model's tokenizer to count answer tokens"):
        task.process_results(doc, [(-3.0, False), (-4.0, False)])
