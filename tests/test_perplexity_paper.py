"""perplexity.sentence_perplexities / mean_perplexity (the collapse guard's scorer, and the route for tokenizers
lm-eval cannot split exactly) reproduce the Butterfly paper's metric within 1e-5 on its own ME-PPL sentences."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.lmeval import ME_PPL_DIR, bpe_tokenizer, paper_mean_ppl
from prune_plugin.perplexity import mean_perplexity, token_nll

FILES = [("ME-PPL_50.json", 50), ("ME-PPL_1k.json", 200)]


def large_vocabulary_llama(tokenizer, vocab_size: int = 49152) -> LlamaForCausalLM:
    """A tiny random Llama with SmolLM2's vocabulary size: the float32 sum behind a logsumexp over 49k classes is
    what drifts from the paper's float64 scorer (ids past the tokenizer's are never fed, only normalised over)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of a trained model's size (tens), not a random init's (0.1)
    return model


@pytest.mark.parametrize("name,count", FILES)
def test_mean_perplexity_reproduces_the_papers_metric_on_me_ppl(name, count):
    path = ME_PPL_DIR / name
    if not path.exists():
        pytest.skip(f"the paper's ME-PPL files are not at {ME_PPL_DIR} (they are not redistributed)")
    texts = [record["Text"] for record in json.loads(path.read_text(encoding="utf-8"))][:count]
    tok = bpe_tokenizer(texts, vocab_size=1500)
    model = large_vocabulary_llama(tok)
    paper = paper_mean_ppl(model, tok, texts, batch_size=10)
    ours = mean_perplexity(model, tok, texts, batch_size=10)
    assert abs(ours - paper) <= 1e-5 * paper, (ours, paper)


def test_token_nll_is_float64_log_softmax_whatever_the_chunking(monkeypatch):
    import prune_plugin.perplexity as perplexity

    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(3, 5, 7000, generator=g)
    targets = torch.randint(0, 7000, (3, 5), generator=g)
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_nll(logits, targets), expected, rtol=1e-14, atol=0)
    monkeypatch.setattr(perplexity, "_FLOAT64_ELEMENTS", 1)  # one row at a time
    assert torch.allclose(token_nll(logits, targets), expected, rtol=1e-14, atol=0)
