"""Evaluation beyond one process: lm-eval's data-parallel runs (`accelerate launch`, one process per GPU) and the
model backends other than `hf`.

Data parallel, checked for real on two CPU processes (gloo): lm-eval splits every task's documents over the
ranks, pads the shorter ranks, gathers each rank's per-sample metric values on rank 0 and only then aggregates
(lm_eval/evaluator.py, `lm.gather_object`). So the paper's collapse number, a MEAN of per-sentence perplexities,
and lm-eval's pooled perplexities and the hardedit group mean must come out as in one process. A per-rank
aggregate would not: with 5 sentences split 3/2, the mean of the two ranks' means is another number, and the
test checks that it is.

On CPUs lm-eval's HFLM does not split the work by itself: it enables data parallelism only when it sees more
than one GPU (HFLM.__init__, `elif gpus > 1:`), so `accelerate launch` on a CPU-only machine makes every process
evaluate everything. The launched script below therefore takes that branch's rank and world size from the
accelerator, exactly as it does on GPUs; everything else is lm-eval's own code path.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.lmeval import (
    PTH_NAME,
    REPO,
    SENTENCES,
    autoload_installed,
    offline_env,
    read_results,
    write_edit_records,
    write_sentences,
)
from prune_plugin.lmeval_ppl import resolve_tokenizer
from prune_plugin.testing import save_pretrained, tiny_gpt2

TASKS = "hardedit,collapse_ppl"
LIMIT = 7  # 7 of the 8 edit records (split 4/3) and all 5 sentences (split 3/2): both ranks need padding

# Run inside each process of `accelerate launch`: the plugin's start-up hook (where the install does not carry
# it), HFLM's multi-GPU data-parallel branch taken on CPUs, and a count of the requests each rank scored.
DATA_PARALLEL_LM_EVAL = '''\
import json, os, site, sys

if sys.argv[1].startswith("--site-dir="):
    site.addsitedir(sys.argv.pop(1).split("=", 1)[1])
sys.argv[0] = "lm_eval"

from lm_eval.models.huggingface import HFLM

_init = HFLM.__init__


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    accelerator = getattr(self, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
        self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes


HFLM.__init__ = __init__


def counted(method):
    original = getattr(HFLM, method)

    def wrapper(self, requests, *args, **kwargs):
        path = os.path.join(os.environ["REQUEST_COUNTS"], f"rank{self.rank}.json")
        counts = json.load(open(path)) if os.path.exists(path) else {"world_size": self.world_size}
        counts[method] = counts.get(method, 0) + len(requests)
        json.dump(counts, open(path, "w"))
        return original(self, requests, *args, **kwargs)

    setattr(HFLM, method, wrapper)


counted("loglikelihood")
counted("loglikelihood_rolling")

from lm_eval.__main__ import cli_evaluate

sys.exit(cli_evaluate())
'''


def accelerate_launch(num_processes: int, script: Path, args: list[str]) -> list[str]:
    """`accelerate launch` with num_processes CPU processes (gloo): --multi_gpu starts them through torchrun;
    ACCELERATE_USE_CPU (see launch_env) makes each one a CPU rank."""
    executable = Path(sys.executable).with_name("accelerate")
    launcher = [str(executable)] if executable.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    if executable.exists():
        launcher.append("launch")
    return [*launcher, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script), *args]


def launch_env(counts: Path) -> dict[str, str]:
    # ACCELERATE_TORCH_DEVICE: without it a CPU rank's device is "cpu:0", which safetensors refuses to load onto.
    return offline_env(ACCELERATE_USE_CPU="true", ACCELERATE_TORCH_DEVICE="cpu", REQUEST_COUNTS=str(counts))


def site_dir_args(tmp: Path) -> list[str]:
    """Where the install does not carry the start-up hook's .pth (editable installs), a folder holding a copy."""
    if autoload_installed():
        return []
    site = tmp / "autoload-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / PTH_NAME).write_text((REPO / PTH_NAME).read_text(encoding="utf-8"), encoding="utf-8")
    return [f"--site-dir={site}"]


def one_process(model_dir: Path, metadata: dict) -> dict:
    """The reference: the same tasks, model, batch size and limit, evaluated in this one process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from prune_plugin.lmeval import task_dir

    task_metadata = {"pretrained": str(model_dir), **metadata}
    manager = TaskManager(include_path=[str(task_dir())], include_defaults=False, metadata=task_metadata)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=TASKS.split(","),
                                   device="cpu", batch_size=1, limit=LIMIT, task_manager=manager,
                                   log_samples=True)


def numbers(results: dict) -> dict[tuple[str, str], float]:
    return {(task, key): value for task, metrics in results.items() for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


@pytest.mark.slow
def test_two_data_parallel_processes_give_the_numbers_of_one(tmp_path):
    model, tok = tiny_gpt2()
    model_dir = save_pretrained(model, tok, tmp_path / "model")
    metadata = {"hardedit_path": str(write_edit_records(tmp_path / "edits.json")),
                "collapse_path": str(write_sentences(tmp_path / "sents.json"))}
    script = tmp_path / "data_parallel_lm_eval.py"
    script.write_text(DATA_PARALLEL_LM_EVAL, encoding="utf-8")
    counts, out = tmp_path / "counts", tmp_path / "out"
    counts.mkdir()
    # batch_size 1: every request is scored alone, in either run, so only the order of the sums can differ.
    args = [*site_dir_args(tmp_path), "run", "--model", "hf", "--model_args", f"pretrained={model_dir}",
            "--tasks", TASKS, "--batch_size", "1", "--limit", str(LIMIT), "--metadata", json.dumps(metadata),
            "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(accelerate_launch(2, script, args), cwd=tmp_path, env=launch_env(counts),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    reference = one_process(model_dir, metadata)
    parallel = read_results(out)

    # The work really was split: each rank scored only part of the requests one process scores.
    per_rank = [json.loads((counts / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [c["world_size"] for c in per_rank] == [2, 2]
    single = {"loglikelihood": sum(len(reference["samples"][t]) * 2 for t in
                                   ("hardedit_efficacy", "hardedit_generalization", "hardedit_locality"))
              + len(reference["samples"]["collapse_ppl_paper"]),
              "loglikelihood_rolling": len(reference["samples"]["collapse_ppl_rolling"])}
    for method, total in single.items():
        scored = [c[method] for c in per_rank]
        assert all(0 < n < total for n in scored) and sum(scored) >= total, (method, scored, total)

    # Same metrics, same values: counts exactly, perplexities and stderrs to 1e-9 relative (summation order).
    expected, got = numbers(reference["results"]), numbers(parallel["results"])
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert math.isfinite(value), key
        assert got[key] == pytest.approx(value, rel=1e-9, abs=0.0), key
    assert parallel["n-samples"] == reference["n-samples"]

    # Rank 0 holds every sentence's own perplexity, and the reported mean is over all of them ...
    samples = [json.loads(line) for path in out.rglob("samples_collapse_ppl_paper_*.jsonl")
               for line in path.read_text(encoding="utf-8").splitlines()]
    ppl = {s["doc_id"]: s["mean_ppl"] for s in samples}
    assert sorted(ppl) == list(range(len(SENTENCES)))
    mean_ppl = parallel["results"]["collapse_ppl_paper"]["mean_ppl,none"]
    assert mean_ppl == pytest.approx(sum(ppl.values()) / len(ppl), rel=1e-12)
    # ... which a mean of per-rank means (rank r holds docs r, r + 2, ...) would have missed.
    by_rank = [[value for doc, value in ppl.items() if doc % 2 == rank] for rank in (0, 1)]
    mean_of_rank_means = sum(sum(values) / len(values) for values in by_rank) / 2
    assert abs(mean_of_rank_means - mean_ppl) > 1e-6 * mean_ppl


# ------------------------------------------------------------------------------------ other model backends
@pytest.fixture
def tokenizer_loads(monkeypatch) -> list[tuple[str, dict]]:
    """AutoTokenizer.from_pretrained calls (name, keyword arguments), answered with a tiny tokenizer."""
    import transformers

    from prune_plugin.testing import train_tokenizer

    calls: list[tuple[str, dict]] = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return train_tokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    return calls


def test_vllm_model_args_name_the_tokenizer_its_revision_and_its_mode(tokenizer_loads):
    """lm-eval's vllm backend loads get_tokenizer(tokenizer or pretrained, tokenizer_mode=...,
    revision=tokenizer_revision, ...); the task must load the same one."""
    resolve_tokenizer({"pretrained": "org/model", "tokenizer": "org/tok", "tokenizer_mode": "slow",
                       "tokenizer_revision": "v2", "revision": "v1", "tensor_parallel_size": 2,
                       "gpu_memory_utilization": 0.8})
    resolve_tokenizer({"pretrained": "org/model", "tokenizer_mode": "auto", "trust_remote_code": "True"})
    assert tokenizer_loads == [
        ("org/tok", {"revision": "v2", "trust_remote_code": False, "use_fast": False}),
        ("org/model", {"revision": "main", "trust_remote_code": True, "use_fast": True}),
    ]


def test_sglang_names_its_tokenizer_tokenizer_path(tokenizer_loads):
    resolve_tokenizer({"pretrained": "org/model", "tokenizer_path": "org/tok", "dp_size": 2})
    assert [name for name, _ in tokenizer_loads] == ["org/tok"]


def test_a_tokenizer_mode_that_is_not_a_hugging_face_tokenizer_is_refused(tokenizer_loads):
    with pytest.raises(ValueError, match="tokenizer_mode='mistral'"):
        resolve_tokenizer({"pretrained": "mistralai/Mistral-7B-v0.3", "tokenizer_mode": "mistral"})
    assert tokenizer_loads == []


def test_api_backends_name_the_model_with_model_and_an_explicit_tokenizer_wins(tokenizer_loads):
    """local-completions: tokenizer = `tokenizer` or `model` (or `pretrained`), with revision/use_fast_tokenizer."""
    resolve_tokenizer({"model": "org/served", "base_url": "http://127.0.0.1:8000/v1/completions"})
    resolve_tokenizer({"model": "served-name", "tokenizer": "org/tok", "use_fast_tokenizer": "False"})
    assert tokenizer_loads == [
        ("org/served", {"revision": "main", "trust_remote_code": False, "use_fast": True}),
        ("org/tok", {"revision": "main", "trust_remote_code": False, "use_fast": False}),
    ]


def test_collapse_ppl_paper_builds_the_same_documents_from_vllm_model_args(tmp_path):
    """End to end through the task's loader, on a real saved tokenizer: vllm's arguments give the documents the
    hf arguments give."""
    from prune_plugin.tasks.collapse_ppl.utils import load_paper_docs
    model, tok = tiny_gpt2()
    folder = str(save_pretrained(model, tok, tmp_path / "model"))
    path = str(write_sentences(tmp_path / "s.json"))
    hf = load_paper_docs(collapse_path=path, pretrained=folder, dtype="float32")
    vllm = load_paper_docs(collapse_path=path, pretrained=folder, tokenizer=folder, tokenizer_mode="auto",
                           tensor_parallel_size=1, gpu_memory_utilization=0.8, max_model_len=128)
    assert list(vllm["test"]) == list(hf["test"])
    assert [d["n_scored"] for d in hf["test"]] == [len(tok(s)["input_ids"]) - 1 for s in SENTENCES]


def test_no_tokenizer_argument_at_all_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        resolve_tokenizer({"base_url": "http://127.0.0.1:8000/v1/completions"})
