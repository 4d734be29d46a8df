"""The collapse guard: perplexity on a fixed sample after every edit, and what it does past the limit."""
import json

import pytest
import torch

from prune_plugin.config import PruneConfig
from prune_plugin.perplexity import mean_perplexity, sentence_perplexities
from prune_plugin.plugins.guard import CollapseWarning, guard_sample
from prune_plugin.plugins.telemetry import read_telemetry
from prune_plugin.plugins import edit_session
from prune_plugin.testing import tiny_llama

TARGET = "lm_head.weight"  # after the final norm, an edit here reaches the logits undamped
SENTENCES = [
    "The Eiffel Tower is located in the city of Paris .",
    "Rome is the capital of Italy .",
    "A cat sat on the mat and a dog slept by the door .",
    "Water boils at one hundred degrees .",
    "She said that the weather would be fine tomorrow , and he agreed with her .",
    "Scientists measured the speed of light with great care .",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{"Corpus": "test", "Text": t} for t in SENTENCES]))
    return path


@pytest.fixture
def lm():
    # Untrained: near-uniform predictions (perplexity about the vocabulary size) that a large edit makes
    # confidently wrong, which is what a collapse looks like.
    return tiny_llama()


def destructive_edit(model, scale=50.0):
    w = model.get_parameter(TARGET)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w += scale * torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g))


def harmless_edit(model):
    with torch.no_grad():
        model.get_parameter(TARGET)[0, 0] += 1e-6


def guarded_session(lm, corpus, action, factor=1.5, **extra):
    model, tok = lm
    config = PruneConfig(prune_guard=action, prune_guard_factor=factor, prune_guard_corpus=str(corpus), **extra)
    return edit_session(model, config, [TARGET], tokenizer=tok)


def test_perplexity_is_the_papers_mean_of_per_sentence_values(lm):
    model, tok = lm
    per_sentence = sentence_perplexities(model, tok, SENTENCES, batch_size=4)
    ids = tok(SENTENCES[1], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp().item()  # first token never scored
    assert per_sentence[1].item() == pytest.approx(expected, rel=1e-5)
    assert mean_perplexity(model, tok, SENTENCES, 4) == pytest.approx(per_sentence.mean().item())


def test_batching_and_padding_do_not_change_the_numbers(lm):
    model, tok = lm
    one_by_one = sentence_perplexities(model, tok, SENTENCES, batch_size=1)
    batched = sentence_perplexities(model, tok, SENTENCES, batch_size=6)
    assert torch.allclose(one_by_one, batched, rtol=1e-5)


def test_values_come_back_in_the_order_given_although_batches_are_formed_by_length(lm):
    model, tok = lm
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in SENTENCES]
    assert lengths != sorted(lengths, reverse=True)  # so length batching really reorders them
    batched = sentence_perplexities(model, tok, SENTENCES, batch_size=3)
    alone = torch.cat([sentence_perplexities(model, tok, [t]) for t in SENTENCES])
    assert torch.allclose(batched, alone, rtol=1e-5)


def test_sample_is_spread_evenly_and_deterministic():
    assert guard_sample(list(range(10)), 3) == [0, 3, 6]
    assert guard_sample(list(range(2)), 5) == [0, 1]


def test_rollback_restores_the_pre_edit_weights_bit_exactly_and_the_run_continues(lm, corpus):
    model, _ = lm
    session = guarded_session(lm, corpus, "rollback")
    session.before_edit()
    harmless_edit(model)
    first = session.after_edit({"prompt": "harmless"})
    kept = model.get_parameter(TARGET).detach().clone()
    session.before_edit()
    destructive_edit(model)
    second = session.after_edit({"prompt": "destructive"})
    assert not first.rolled_back and second.rolled_back
    assert torch.equal(model.get_parameter(TARGET), kept)
    decision = second.decisions[0]
    assert decision["action"] == "rollback" and decision["ratio"] > 1.5
    assert decision["perplexity_after_rollback"] == pytest.approx(first.perplexity, rel=1e-6)
    session.before_edit()
    harmless_edit(model)
    assert not session.after_edit({"prompt": "again"}).rolled_back


def test_stop_asks_the_driver_to_apply_no_further_edits(lm, corpus):
    session = guarded_session(lm, corpus, "stop")
    session.before_edit()
    destructive_edit(lm[0])
    assert session.after_edit({}).stop


def test_warn_only_warns(lm, corpus):
    model, _ = lm
    session = guarded_session(lm, corpus, "warn")
    session.before_edit()
    destructive_edit(model)
    with pytest.warns(CollapseWarning, match="edit 0 raised perplexity"):
        step = session.after_edit({})
    assert not step.rolled_back and not step.stop


def test_every_decision_is_logged_with_its_numbers_in_telemetry(lm, corpus, tmp_path):
    model, _ = lm
    path = tmp_path / "t.jsonl"
    session = guarded_session(lm, corpus, "rollback", prune_telemetry=str(path))
    session.before_edit()
    destructive_edit(model)
    session.after_edit({})
    session.end()
    edit = [r for r in read_telemetry(path) if r["event"] == "edit"][0]
    assert edit["rolled_back"] and edit["perplexity"] > 0
    assert set(edit["decisions"][0]) >= {"perplexity", "baseline", "ratio", "factor", "action"}


def test_the_guard_needs_the_tokenizer(lm, corpus):
    model, _ = lm
    session = edit_session(model, PruneConfig(prune_guard="warn", prune_guard_corpus=str(corpus)), [TARGET])
    with pytest.raises(ValueError, match="tokenizer"):
        session.begin()
