"""prune_plugin.lmeval_ppl: the (context, continuation) split that makes lm-eval score what the paper scores."""
from __future__ import annotations

import pytest
from tokenizers import processors

from helpers.lmeval import SENTENCES, bpe_tokenizer, llama_for, paper_mean_ppl, write_sentences
from prune_plugin import lmeval
from prune_plugin.lmeval_ppl import (
    paper_ppl_docs,
    parse_bool,
    register_tokenizer,
    resolve_tokenizer,
    split_first_token,
    unregister_tokenizer,
)
from prune_plugin.testing import save_pretrained, tiny_llama, train_tokenizer


def lm_eval_tokens(context: str, continuation: str, tokenizer, add_bos_token=None):
    """What lm-eval's HF model feeds and scores for a loglikelihood request, from a real HFLM."""
    from lm_eval.models.huggingface import HFLM

    model, _ = tiny_llama()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=add_bos_token, device="cpu")
    return lm._encode_pair(context, continuation)


@pytest.mark.parametrize("text", SENTENCES)
def test_word_level_split_feeds_the_papers_tokens_and_scores_all_but_the_first(text):
    tok = train_tokenizer()
    context, continuation, n_scored = split_first_token(text, tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert context + continuation == text
    context_ids, continuation_ids = lm_eval_tokens(context, continuation, tok)
    assert context_ids == ids[:1] and continuation_ids == ids[1:]
    assert n_scored == len(ids) - 1


def test_byte_level_bpe_split_keeps_the_leading_space_in_the_first_token():
    tok = bpe_tokenizer(SENTENCES * 3)
    text = " Scientists measured the speed of light with great care ."
    context, continuation, n_scored = split_first_token(text, tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:1])[0].startswith("Ġ")
    assert lm_eval_tokens(context, continuation, tok) == (ids[:1], ids[1:])
    assert n_scored == len(ids) - 1


def test_a_tokenizer_that_adds_bos_by_default_needs_add_bos_token_false():
    tok = train_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    text = SENTENCES[0]
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # a Llama-style default
    with pytest.raises(ValueError, match="add_bos_token=False"):
        split_first_token(text, tok)
    context, continuation, _ = split_first_token(text, tok, add_bos_token=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert lm_eval_tokens(context, continuation, tok, add_bos_token=False) == (ids[:1], ids[1:])


def test_a_whitespace_only_first_token_cannot_be_expressed_and_says_so():
    tok = bpe_tokenizer(SENTENCES * 3)
    text = "  The river flows to the sea ."  # two spaces: byte-level BPE makes the first one a token of its own
    assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"][:1]) == ["Ġ"]
    with pytest.raises(ValueError, match="whitespace only"):
        split_first_token(text, tok)


def test_a_one_token_sentence_has_nothing_to_score():
    with pytest.raises(ValueError, match="at least 2"):
        split_first_token(" Paris", train_tokenizer())


def test_docs_name_the_file_and_record_of_a_sentence_that_cannot_be_scored():
    with pytest.raises(ValueError, match=r"corpus\.json: record 1, field 'Text': has 1 token"):
        paper_ppl_docs([SENTENCES[0], "Paris"], train_tokenizer(), source="corpus.json")


def test_tokenizer_comes_from_the_tokenizer_or_pretrained_model_argument(tmp_path):
    model, tok = tiny_llama()
    folder = str(save_pretrained(model, tok, tmp_path / "m"))
    for metadata in ({"pretrained": folder}, {"tokenizer": folder, "pretrained": "not/used"}):
        assert resolve_tokenizer(metadata)(SENTENCES[0])["input_ids"] == tok(SENTENCES[0])["input_ids"]
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        resolve_tokenizer({"hardedit_path": "x"})


def test_in_memory_tokenizers_are_found_by_handle_until_unregistered():
    tok = train_tokenizer()
    handle = register_tokenizer(tok)
    assert resolve_tokenizer({"tokenizer": handle}) is tok
    unregister_tokenizer(handle)
    with pytest.raises(ValueError, match="no longer registered"):
        resolve_tokenizer({"tokenizer": handle})


def test_boolean_model_arguments_parse_like_lm_eval_passes_them():
    assert [parse_bool(v) for v in (None, False, "False", "true", "0", "1")] == [None, False, False, True,
                                                                                 False, True]
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_paper_metric_is_exact_with_a_bos_adding_tokenizer_when_add_bos_token_is_false(tmp_path):
    tok = bpe_tokenizer(SENTENCES * 3)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    model = llama_for(tok)
    metadata = {"collapse_path": str(write_sentences(tmp_path / "s.json"))}
    with pytest.raises(ValueError, match="add_bos_token=False"):
        lmeval.evaluate(model, tok, "collapse_ppl_paper", metadata=metadata, bootstrap_iters=0)
    out = lmeval.evaluate(model, tok, "collapse_ppl_paper", metadata=metadata,
                          model_kwargs={"add_bos_token": False}, bootstrap_iters=0)
    assert out["results"]["collapse_ppl_paper"]["mean_ppl,none"] == pytest.approx(
        paper_mean_ppl(model, tok, SENTENCES), rel=1e-4)
