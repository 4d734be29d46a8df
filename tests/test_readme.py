"""README.md works as written: its code blocks are taken out of the file and run (or, where they need hardware or
hours, checked against the code they name), so the README cannot drift from the code.

- Quick start: the YAML keys and the Python block run as they stand, in a fresh interpreter (so the start-up hook
  does what a user's `import easyeditor` gets), on a tiny GPT-2 saved where the block's hparams file points.
- lm-eval: the Python `evaluate(...)` block and the `lm_eval run ...` command run on a tiny model, with the data
  paths set through the environment variables the README names.
- Every other shell line is recognised: set-up and test commands are the ones .ci/run runs, `prune-plugin ...`
  lines parse with the CLI's own parser, `python -m X` names an importable module, `pytest FILE` names a file.
  A shell line the test does not recognise fails it: teach the test how to check a new kind of line.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.editing import requires_easyeditor
from helpers.lmeval import (
    PTH_NAME,
    REPO,
    SENTENCES,
    autoload_installed,
    lm_eval_command,
    offline_env,
    write_edit_records,
    write_sentences,
)

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def sections() -> dict[str, str]:
    """README text by '## ' heading (sub-headings stay in their section)."""
    parts = re.split(r"^## ", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {part.split("\n", 1)[0].strip(): part for part in parts[1:]}


def section(prefix: str) -> str:
    found = [text for title, text in sections().items() if title.startswith(prefix)]
    assert len(found) == 1, f"README.md has no single section starting with {prefix!r}"
    return found[0]


def blocks(text: str, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(text) if lang == language]


def shell_lines(text: str) -> list[str]:
    """The commands of every bash block: continuation lines joined, comments dropped."""
    commands = []
    for code in blocks(text, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def ci_script() -> str:
    return (REPO / ".ci" / "run").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- quick start


def tiny_gpt2_folder(folder: Path) -> Path:
    """A tiny GPT-2 saved with the slow GPT2Tokenizer's files (vocab.json, merges.txt): the packaged easyeditor
    loads any model whose name contains 'gpt' with GPT2Tokenizer.from_pretrained."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from prune_plugin.testing import CORPUS

    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(CORPUS)] * 4, vocab_size=400, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    tok = GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=4, n_head=4, n_positions=128,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(30)  # a trained model's logit range, so that an edit has an effect
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# ROME's method keys for the tiny GPT-2 (the "... your usual ROME keys ..." of the README's YAML block).
TINY_ROME = dict(
    model_name="./hugging_cache/gpt2-xl", device=0, stats_dir="./data/stats", fact_token="subject_last",
    v_num_grad_steps=10, v_lr=0.5, v_loss_layer=3, v_weight_decay=1e-3, clamp_norm_factor=20, kl_factor=0.0625,
    mom2_adjustment=False, context_template_length_params=[[4, 5]], rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
    layer_module_tmp="transformer.h.{}", mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
    ln_f_module="transformer.ln_f", lm_head_module="transformer.wte", mom2_dataset="wikipedia", mom2_n_samples=100,
    mom2_dtype="float32", max_length=40, model_parallel=False,
)

AFTER_QUICK_START = """
import json as _json
from safetensors.torch import load_file as _load
_saved = _load("hugging_cache/gpt2-xl/model.safetensors")
_params = dict(model.named_parameters())
print(_json.dumps({
    "session": session is not None,
    "edited": [name for step in session.steps for name in step.edited],
    "targets": session.targets,
    "restored": all((_params[k].detach().cpu() == v).all().item() for k, v in _saved.items() if k in _params),
    "device": str(next(model.parameters()).device),
}))
"""


def with_start_up_hook(code: str, tmp: Path) -> str:
    """`code` as a pip-installed interpreter runs it; where the install is editable (no .pth in site-packages), a
    copy of the .pth is processed first, as site.py would (the same as helpers.lmeval.lm_eval_command)."""
    if autoload_installed():
        return code
    site_dir = tmp / "autoload-site"
    site_dir.mkdir(exist_ok=True)
    (site_dir / PTH_NAME).write_text((REPO / PTH_NAME).read_text(encoding="utf-8"), encoding="utf-8")
    return f"import site; site.addsitedir({str(site_dir)!r})\n" + code


@pytest.mark.slow
@requires_easyeditor
def test_quick_start_runs_as_written(tmp_path):
    quick = section("Quick start")
    (keys_yaml,) = blocks(quick, "yaml")
    python_blocks = blocks(quick, "python")
    assert len(python_blocks) == 1, "the quick start has one Python block"
    keys = yaml.safe_load(keys_yaml)
    assert keys["prune"] is True and keys["alg_name"] == "ROME"
    # The block's own hparams path, with its own keys over the tiny model's ROME keys.
    path = re.search(r'ROMEHyperParams\.from_hparams\("([^"]+)"\)', python_blocks[0]).group(1)
    tiny_gpt2_folder(tmp_path / "hugging_cache" / "gpt2-xl")
    keys["layers"] = [1]  # the README's layer of a large model; the tiny one has four
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(yaml.safe_dump({**TINY_ROME, **keys}), encoding="utf-8")

    env = offline_env()
    env.pop("PYTHONPATH", None)  # a user's interpreter: the installed package and its start-up hook, nothing else
    proc = subprocess.run([sys.executable, "-c", with_start_up_hook(python_blocks[0], tmp_path) + AFTER_QUICK_START],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["session"] and result["targets"] == ["transformer.h.1.mlp.c_proj.weight",
                                                        "transformer.h.1.mlp.c_proj.bias"]
    assert "transformer.h.1.mlp.c_proj.weight" in result["edited"]  # the edit changed the weights ...
    assert result["restored"]  # ... and session.restore() wrote W0 back, bit for bit
    assert result["device"] == "cpu"


# --------------------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def small_task_data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("readme-data")
    return {"PRUNE_HARDEDIT_PATH": str(write_edit_records(folder / "edits.json")),
            "PRUNE_COLLAPSE_PATH": str(write_sentences(folder / "sentences.json", SENTENCES))}


def assert_both_groups_ran(results: dict) -> None:
    """hardedit is a group; collapse_ppl a tag over collapse_ppl_paper and collapse_ppl_rolling."""
    assert results["group_subtasks"]["hardedit"]
    assert set(results["group_subtasks"]["hardedit"]) <= set(results["results"])
    assert {"collapse_ppl_paper", "collapse_ppl_rolling"} <= set(results["results"])


@pytest.mark.slow
def test_lm_eval_python_block_runs_as_written(small_task_data, monkeypatch):
    from prune_plugin.testing import tiny_llama

    (code,) = [c for c in blocks(section("lm-eval tasks"), "python") if "evaluate(" in c]
    for name, value in small_task_data.items():
        monkeypatch.setenv(name, value)
    model, tokenizer = tiny_llama()
    namespace = {"model": model, "tokenizer": tokenizer}
    exec(compile(code, "README.md (lm-eval tasks)", "exec"), namespace)
    assert_both_groups_ran(namespace["results"])


@pytest.mark.slow
def test_lm_eval_command_runs_as_written(tmp_path, small_task_data):
    from prune_plugin.testing import save_pretrained, tiny_gpt2

    # the section's command for both task families (others there are only classified, by check_shell_line)
    command = next(c for c in shell_lines(section("lm-eval tasks"))
                   if c.startswith("lm_eval ") and "--tasks hardedit,collapse_ppl" in c)
    model_dir = save_pretrained(*tiny_gpt2(), tmp_path / "edited-model")
    args = shlex.split(command.replace("/path/to/edited-model", str(model_dir)))[1:]
    out = tmp_path / "out"
    proc = subprocess.run([*_lm_eval(tmp_path), *args, "--output_path", str(out)], cwd=tmp_path,
                          env=offline_env(**small_task_data), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_both_groups_ran(json.loads(next(out.rglob("results_*.json")).read_text(encoding="utf-8")))


def _lm_eval(tmp: Path) -> list[str]:
    return lm_eval_command([], tmp / "autoload-site")


# --------------------------------------------------------------------------------------------- every shell line


def _ci_commands() -> list[str]:
    return [" ".join(line.split()) for line in ci_script().splitlines() if line.strip() and not line.startswith("#")]


def check_shell_line(line: str) -> str:
    """How `line` is known to be right; raises AssertionError when it is not, or when it is of an unknown kind."""
    ci = _ci_commands()
    if line.startswith("python3 -m venv .venv"):  # the set-up command: CI runs each of its pip installs
        for step in line.split(" && "):
            if step.startswith("python -m pip install"):
                assert any(c.replace(" -q", "") == step for c in ci), f".ci/run does not run {step!r}"
        return "set-up: .ci/run runs its installs"
    if line.endswith("pytest -q") and line.startswith("OMP_NUM_THREADS="):
        assert line in ci, f".ci/run does not run README's test command {line!r}"
        return "the test command .ci/run runs"
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[:1] == ["pytest"]:
        for word in words[1:]:
            if not word.startswith("-"):
                assert (REPO / word).exists(), f"{line!r}: no {word}"
        for key in env:
            assert any(key in p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("*.py")), key
        return "pytest: the files and variables exist"
    if words[:1] == ["prune-plugin"]:
        from prune_plugin.cli import build_parser

        argv = words[1:]
        argv = argv if argv and argv[0] in ("run", "restrain", "eval", "mine", "plot") else ["run", *argv]
        build_parser().parse_args(argv)  # argparse exits on an unknown option or a bad value
        return "prune-plugin: parses"
    if words[:1] == ["pip"] and words[1:2] == ["install"]:
        local = [w for w in words[2:] if not w.startswith("-")]
        assert local and all((REPO / w).is_dir() for w in local), f"{line!r}: not a folder of this repository"
        return "pip install of an example: installed and run by its test (test_example_rect.py)"
    if words[:2] == ["python", "-m"]:
        import importlib.util

        in_checkout = (REPO / (words[2].replace(".", "/") + ".py")).exists()  # run from the repository root
        assert in_checkout or importlib.util.find_spec(words[2]) is not None, f"{line!r}: no module {words[2]}"
        return "python -m: the module exists"
    if words[:1] == ["lm_eval"] and "parallelize=True" in line:
        return "lm_eval on several GPUs: the same tasks as the command that runs"
    if words[:2] == ["accelerate", "launch"]:
        return "accelerate launch: lm-eval's data-parallel launcher, tested in test_multiprocess_eval.py"
    if words[:1] == ["lm_eval"]:
        return "lm_eval: runs (test_lm_eval_command_runs_as_written)"
    raise AssertionError(f"README shell line of a kind tests/test_readme.py does not check: {line!r}")


def test_every_shell_line_of_the_readme_is_checked():
    lines = shell_lines(README.read_text(encoding="utf-8"))
    assert len(lines) >= 8
    for line in lines:
        check_shell_line(line)


def test_the_ci_script_runs_the_readme_test_command_and_fails_on_failure():
    script = ci_script()
    assert script.splitlines()[1:].count("set -euo pipefail") == 1
    setup = [c for c in shell_lines(section("Set-up")) if c.endswith("pytest -q")]
    assert setup and setup[0] in _ci_commands()


def test_the_hook_entry_point_block_names_the_group_the_session_loads():
    from prune_plugin.hookspecs import PROJECT

    (toml,) = blocks(section("Quick start"), "toml")
    assert re.search(rf"^\[project\.entry-points\.{PROJECT}\]$", toml, re.MULTILINE), toml
    # the worked example registers itself exactly as the README shows
    assert toml.strip() in (REPO / "examples" / "rect" / "pyproject.toml").read_text(encoding="utf-8")


def test_quick_start_blocks_parse():
    quick = section("Quick start")
    for code in blocks(quick, "python"):
        compile(code, "README.md", "exec")
    for code in blocks(quick, "yaml"):
        assert isinstance(yaml.safe_load(code), dict)


def test_readme_names_the_versions_ci_tests():
    setup = section("Set-up")
    for constraints in ("constraints.txt", "constraints-tf5.txt"):
        pins = dict(line.split("==") for line in (REPO / constraints).read_text(encoding="utf-8").splitlines()
                    if "==" in line and not line.startswith("#"))
        assert f"transformers {pins['transformers']}" in setup, (constraints, pins)
        assert constraints in ci_script()


def test_the_support_table_names_every_method_and_matches_the_plugin():
    from prune_plugin.easyedit.editor import NOT_IN_PLACE, check_applicable

    rows = [line.split("|")[1:3] for line in section("EasyEdit methods").splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    verdicts = {name.strip(): verdict.strip() for names, verdict in rows for name in names.split(",")}
    assert len(verdicts) == 27  # the current EasyEdit's ALG_DICT
    applies = [name for name, verdict in verdicts.items() if verdict.startswith("applies")]
    assert len(applies) == 14
    for name in applies:
        check_applicable(name)
    assert {name for name, verdict in verdicts.items() if verdict.startswith("not applicable")} == set(NOT_IN_PLACE) - {
        "SERAC_MULTI", "ICE"}  # NOT_IN_PLACE also names the multimodal SERAC and ICE, which are not in ALG_DICT


def test_the_covariance_block_runs_as_written(tmp_path):
    import types

    from prune_plugin.testing import CORPUS, tiny_llama

    (code,) = blocks(section("EasyEdit methods"), "python")
    model, tokenizer = tiny_llama()
    model.config._name_or_path = "owner/tiny-llama"
    hparams = types.SimpleNamespace(alg_name="MEMIT", layers=[1, 2], rewrite_module_tmp="model.layers.{}.mlp.down_proj",
                                    stats_dir=str(tmp_path), mom2_dataset="wikipedia", mom2_n_samples=100,
                                    mom2_dtype="float32")
    namespace = {"model": model, "tokenizer": tokenizer, "hparams": hparams, "texts": [" ".join(CORPUS[:20])]}
    exec(compile(code, "README.md (EasyEdit methods)", "exec"), namespace)
    assert len(namespace["paths"]) == 2 and all(path.exists() for path in namespace["paths"])


@pytest.mark.slow
@requires_easyeditor
def test_the_resume_block_runs_as_written(tmp_path, monkeypatch):
    """An interrupted checkpointed run (one of two records applied) continued with the README's call."""
    monkeypatch.chdir(tmp_path)  # BaseEditor writes logs/run.log into the working directory
    from helpers.editing import RECORDS, edit, rome_yaml

    import prune_plugin.easyedit as pe
    from prune_plugin.easyedit import installed

    pe.activate(installed.import_easyeditor())
    path = rome_yaml(tmp_path, prune_checkpoint_dir=str(tmp_path / "ckpt"), prune_checkpoint_at=[1, 2])
    edit(path, RECORDS[:1])  # the "interrupted" run: its checkpoint after edit 1 is on disk
    from prune_plugin.easyedit.driver import build_editor, load_hparams
    from prune_plugin.testing import tiny_model

    model, tok = tiny_model("llama")
    editor = build_editor(load_hparams(path), model, tok)
    (code,) = blocks(section("The main job"), "python")
    exec(compile(code, "README.md (long runs)", "exec"), {"editor": editor, "records": RECORDS[:2]})
    session = pe.session_of(editor)
    assert [s.request["prompt"] for s in session.steps] == [RECORDS[1]["prompt"]]  # only the record left
    assert (tmp_path / "ckpt" / "edit-000002").is_dir()


# The Python blocks above run; a new one fails this test until a test runs it too.
RUN_PYTHON_BLOCKS = {"Quick start": 1, "lm-eval tasks": 1, "EasyEdit methods": 1, "The main job, the miner, plots": 1}


def test_every_python_block_of_the_readme_is_run():
    found = {title: len(blocks(text, "python")) for title, text in sections().items() if blocks(text, "python")}
    assert {title.split(":")[0]: count for title, count in found.items()} == RUN_PYTHON_BLOCKS
