"""Tiny random causal LMs built in-process, with a word-level tokenizer trained by `tokenizers`, and EasyEdit
settings that edit them for real: what the tests and the benchmarks' smoke runs use.

Tests must not touch a model hub, so every test model is made here in well under a second and saved to a
folder when a subprocess (the lm_eval CLI, the console script) needs to load it by path. Needs the ``model``
extra (transformers, tokenizers).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
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


# Where each tiny architecture keeps what the methods name in their hparams.
ARCH = {
    "llama": dict(build=tiny_llama, rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm", lm_head_module="lm_head"),
    "gpt2": dict(build=tiny_gpt2, rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                 ln_f_module="transformer.ln_f", lm_head_module="transformer.wte"),  # GPT-2's head is tied to wte
}

# Small but real settings: few optimisation steps, few context templates. The clamp is loose because a random
# model's hidden states are tiny, and ROME/MEMIT bound the new value by a multiple of the old one's norm.
METHOD = {
    "ROME": dict(layers=[1], fact_token="subject_last", v_num_grad_steps=10, v_lr=0.5, v_loss_layer=3,
                 v_weight_decay=1e-3, clamp_norm_factor=20, kl_factor=0.0625, mom2_adjustment=False,
                 context_template_length_params=[[4, 5]], mom2_dataset="wikipedia", mom2_n_samples=100,
                 mom2_dtype="float32"),
    "MEMIT": dict(layers=[1, 2], layer_selection="all", fact_token="subject_last", v_num_grad_steps=10, v_lr=0.5,
                  v_loss_layer=3, v_weight_decay=1e-3, clamp_norm_factor=20, kl_factor=0.0625, mom2_adjustment=True,
                  mom2_update_weight=100, mom2_dataset="wikipedia", mom2_n_samples=100, mom2_dtype="float32"),
    "FT": dict(layers=[1], num_steps=10, lr=5e-3, weight_decay=0, kl_factor=0, norm_constraint=False, batch_size=1),
}


def tiny_model(arch: str) -> tuple[torch.nn.Module, object]:
    """A tiny `arch` ("llama" or "gpt2") model that real edits can move: its final norm scaled up."""
    model, tok = ARCH[arch]["build"]()
    model.config._name_or_path = f"tiny-{arch}"  # easyeditor names covariance files after it
    # A random model's logits are flat (all within about +-1), so no edit could make a token likely; scaling the
    # final norm gives them the range of a trained model's (and leaves GPT-2's tied input embeddings alone).
    with torch.no_grad():
        model.get_submodule(ARCH[arch]["ln_f_module"]).weight.mul_(30)
    return model, tok


def tiny_model_folder_with_rome_yaml(folder: Path) -> tuple[Path, Path]:
    """The tiny Llama saved as a Hugging Face folder under `folder`, and a ROME hparams YAML for it: what the CLI
    takes as --model and --hparams."""
    model, tok = tiny_model("llama")
    saved = save_pretrained(model, tok, Path(folder) / "tiny")
    templates = {k: v for k, v in ARCH["llama"].items() if k != "build"}
    hparams = Path(folder) / "rome.yaml"
    hparams.write_text(yaml.safe_dump(dict(alg_name="ROME", model_name="tiny", device=0, stats_dir=str(folder),
                                           **templates, **METHOD["ROME"])))
    return saved, hparams
