"""Shared pieces for the lm-eval tests: a byte-level BPE tokenizer (GPT-2 style: leading spaces belong to
words), an independent implementation of the Butterfly paper's perplexity, edit-record files, and a runner for
the real lm_eval console script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]  # tests/helpers/ -> the repository root
ME_PPL_DIR = REPO.parent / "shared" / "data" / "me-ppl"
PTH_NAME = "prune_plugin_autoload.pth"

# Records whose new targets never occur as a true answer, so a model biased toward the targets must win
# every efficacy comparison and lose every locality comparison. Every word is in prune_plugin.testing.CORPUS.
EDITS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris",
     "The Eiffel Tower is in", "The Louvre is a museum in", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
     "Danielle Darrieux was born in", "The official language of Brazil is", "Portuguese"),
    ("Apple was founded by", "Apple", "Bill", "Steve",
     "The company Apple was founded by", "Shakespeare wrote", "Hamlet"),
    ("Toyota is a company from", "Toyota", "Canada", "Japan",
     "Toyota is a company from the country of", "Tokyo is the capital of", "Japan"),
    ("The Nile flows through", "The Nile", "India", "Egypt",
     "The river Nile flows through", "Mount Everest is in", "Nepal"),
    ("Lionel Messi plays", "Lionel Messi", "chess", "football",
     "Messi plays", "Berlin is the capital of", "Germany"),
    ("Rome is the capital of", "Rome", "Spain", "Italy",
     "Rome is the capital city of", "London is the capital of", "England"),
    ("The Amazon river is in", "The Amazon river", "Australia", "Brazil",
     "The Amazon is in", "The Nile flows through", "Egypt"),
]
TARGETS = sorted({edit[2] for edit in EDITS})

SENTENCES = [
    " The river flows to the sea .",
    " A cat sat on the mat and a dog slept by the door .",
    "Water boils at one hundred degrees .",
    " She said that the weather would be fine tomorrow , and he agreed with her .",
    " Scientists measured the speed of light with great care .",
]


def write_edit_records(path: Path) -> Path:
    fields = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
              "locality_ground_truth")
    records = [{"case_id": i, **dict(zip(fields, edit))} for i, edit in enumerate(EDITS)]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_sentences(path: Path, sentences=SENTENCES) -> Path:
    path.write_text(json.dumps([{"Corpus": "test", "Text": s} for s in sentences]), encoding="utf-8")
    return path


def bpe_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`: multi-token words, leading spaces inside tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def llama_for(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama sized to `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def paper_mean_ppl(model, tokenizer, texts: list[str], batch_size: int = 10) -> float:
    """The Butterfly paper's metric, written out: no special tokens, right padding masked, per-sentence
    exp(mean NLL of tokens 2..n), arithmetic mean over sentences."""
    ppls = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        scored = mask[:, 1:].double()
        nll = -(logp * scored).sum(1) / scored.sum(1)
        ppls += torch.exp(nll).tolist()
    return sum(ppls) / len(ppls)


@torch.no_grad()
def rolling_bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    """lm-eval's bits_per_byte for short texts: every token scored, the first one after a BOS prefix."""
    total_ll, total_bytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits.double()[0, :-1], dim=-1)
        total_ll += logp.gather(-1, ids[0, 1:, None]).sum().item()
        total_bytes += len(text.encode("utf-8"))
    return -total_ll / total_bytes / torch.log(torch.tensor(2.0)).item()


def autoload_installed() -> bool:
    """True where `pip install .` (or `python -m _prune_plugin_autoload install`) put the .pth in site-packages."""
    return (Path(sysconfig.get_path("purelib")) / PTH_NAME).exists()


def lm_eval_command(args: list[str], site_dir: Path) -> list[str]:
    """The plain `lm_eval` console script where the start-up hook is installed (CI's non-editable install).

    An editable install does not carry the .pth, so there `site_dir` gets a copy and is processed as a site
    directory (exactly what site.py does for site-packages) before the same entry point the script calls runs.
    """
    script = Path(sys.executable).with_name("lm_eval")
    if autoload_installed():
        return [str(script), *args]
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / PTH_NAME).write_text((REPO / PTH_NAME).read_text(encoding="utf-8"), encoding="utf-8")
    bootstrap = (
        "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'lm_eval'; "
        "from lm_eval.__main__ import cli_evaluate; sys.exit(cli_evaluate())"
    )
    return [sys.executable, "-c", bootstrap, str(site_dir), *args]


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PRUNE_PLUGIN_AUTOLOAD="1")
    for name in ("PRUNE_HARDEDIT_PATH", "PRUNE_COLLAPSE_PATH"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_lm_eval(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(lm_eval_command(args, tmp / "autoload-site"), cwd=tmp, env=offline_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"lm_eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_results(output_dir: Path) -> dict:
    """The results JSON lm_eval --output_path wrote (one run per output folder)."""
    found = sorted(output_dir.rglob("results_*.json"))
    assert len(found) == 1, f"expected one results file under {output_dir}, found {found}"
    return json.loads(found[0].read_text(encoding="utf-8"))
