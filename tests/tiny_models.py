"""Tiny random causal LMs built in-process, with a word-level tokenizer trained by `tokenizers`.

Tests must not touch a model hub, so every test model is made here in well under a second and saved to a
folder when a subprocess (the lm_eval CLI) needs to load it by path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# A small vocabulary source: every word a test prompt or sentence uses should be in here, so that tokenization
# is word-level and subjects are whole tokens.
CORPUS = """
The Eiffel Tower is located in the city of Paris . Rome is the capital of Italy . Berlin is the capital of Germany .
Tokyo is the capital of Japan . The mother tongue of Danielle Darrieux is French . Apple was founded by Steve Jobs .
Microsoft was founded by Bill Gates . The Nile flows through Egypt . Mount Everest is in Nepal .
The Amazon river is in Brazil . Toyota is a company from Japan . Lionel Messi plays football . Shakespeare wrote Hamlet .
The official language of Brazil is Portuguese . The Louvre is a museum in Paris . London is the capital of England .
A cat sat on the mat and a dog slept by the door . Water boils at one hundred degrees .
She said that the weather would be fine tomorrow , and he agreed with her .
Scientists measured the speed of light with great care . The river flows to the sea .
Madrid Spain English German Italian Japanese Chinese Russian Spanish Arabic Canada Australia India Moscow
Beijing Toronto Sydney Lisbon Vienna Athens Oslo Dublin Prague Cairo Lima Seoul violin piano guitar chess
physics chemistry biology novel poem song film actor singer writer painter company city country river
is was in of the a an and to by from plays wrote located founded capital language tongue museum born
""".split()


def train_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    words = sorted(set(CORPUS + (extra_words or [])))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<bos>", "<eos>"])
    tok.train_from_iterator([" ".join(words)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.padding_side = "right"
    return fast


def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 32, mlp: int = 64):
    """A 4-layer Llama with an untied head; returns (model, tokenizer) in float32 eval mode."""
    torch.manual_seed(seed)
    tok = train_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def tiny_gpt2(seed: int = 0, layers: int = 4, hidden: int = 32):
    """A 4-layer GPT-2 (Conv1D weights, tied head); returns (model, tokenizer) in float32 eval mode."""
    torch.manual_seed(seed)
    tok = train_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    return model, tok


def save_pretrained(model, tok, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
