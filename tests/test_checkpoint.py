"""Checkpoints of a sequential run: the format (atomic, checksummed, refused when partial, corrupt or foreign),
kill-and-resume bit for bit, and edit once / restrain many equal to 'final' mode for every PRUNE base."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.editing import RECORDS, edit, requires_easyeditor, rome_yaml
from prune_plugin.checkpoint import (CheckpointError, CheckpointMismatchError, check_model, latest_checkpoint,
                                     list_checkpoints, model_identity, parse_schedule, read_checkpoint,
                                     write_checkpoint)
from prune_plugin.config import PruneConfig, PruneConfigError

SCRIPT = Path(__file__).parent / "scripts" / "checkpointed_rome.py"

def a_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))


def save(directory: Path, model: torch.nn.Module, edits: int, **manifest) -> Path:
    targets = ["0.weight", "1.weight"]
    body = {"requests": [{"prompt": f"p{i}"} for i in range(edits)], "hparams": {"layers": [1]},
            "model": model_identity(model, targets), **manifest}
    return write_checkpoint(directory, edits, {n: model.get_parameter(n) for n in targets}, body)


# ------------------------------------------------------------------------------------------------ the format


def test_a_checkpoint_holds_the_edited_matrices_and_a_manifest_with_checksums(tmp_path):
    model = a_model()
    path = save(tmp_path, model, 3)
    assert path.name == "edit-000003" and sorted(p.name for p in path.iterdir()) == ["manifest.json",
                                                                                   "matrices.safetensors"]
    checkpoint = read_checkpoint(path)
    assert checkpoint.edits == 3 and len(checkpoint.requests) == 3
    assert checkpoint.manifest["matrices"]["0.weight"] == {"dtype": "float32", "shape": [5, 6]}
    assert len(checkpoint.manifest["files"]["matrices.safetensors"]["sha256"]) == 64
    saved = checkpoint.matrices()
    assert set(saved) == {"0.weight", "1.weight"}  # the edited matrices only, not the biases
    assert torch.equal(saved["1.weight"], model.get_parameter("1.weight"))


def test_the_latest_complete_checkpoint_is_found_and_partial_ones_never_load(tmp_path):
    model = a_model()
    save(tmp_path, model, 1)
    save(tmp_path, model, 2)
    (tmp_path / ".edit-000003.partial-999").mkdir()  # killed while writing
    (tmp_path / ".edit-000003.partial-999" / "matrices.safetensors").write_bytes(b"half")
    (tmp_path / "edit-000004").mkdir()  # a folder without its manifest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["edit-000001", "edit-000002", "edit-000004"]
    assert latest_checkpoint(tmp_path).edits == 2
    assert read_checkpoint(tmp_path).edits == 2  # a run's directory means its latest complete checkpoint
    with pytest.raises(CheckpointError, match="edit-000004/manifest.json: missing, so the checkpoint is incomplete"):
        read_checkpoint(tmp_path / "edit-000004")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        read_checkpoint(tmp_path / ".edit-000003.partial-999")


def test_a_corrupt_matrix_file_is_refused_naming_it(tmp_path):
    path = save(tmp_path, a_model(), 2)
    data = bytearray((path / "matrices.safetensors").read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last weight
    (path / "matrices.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"edit-000002/matrices.safetensors: corrupt"):
        read_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None  # skipped, with a warning, never loaded


def test_a_damaged_manifest_is_refused(tmp_path):
    path = save(tmp_path, a_model(), 2)
    (path / "manifest.json").write_text('{"format": "prune-plugin-checkpoint", "vers')
    with pytest.raises(CheckpointError, match="manifest.json: not a checkpoint manifest"):
        read_checkpoint(path)


def test_writing_the_same_count_again_replaces_it_only_when_complete(tmp_path):
    model = a_model()
    save(tmp_path, model, 2)
    with torch.no_grad():
        model.get_parameter("0.weight").add_(1.0)
    save(tmp_path, model, 2)
    assert torch.equal(read_checkpoint(tmp_path / "edit-000002").matrices()["0.weight"], model.get_parameter("0.weight"))
    assert [p.name for p in tmp_path.iterdir()] == ["edit-000002"]  # no temporary folder left behind


def test_another_models_checkpoint_is_refused_naming_the_matrix(tmp_path):
    checkpoint = read_checkpoint(save(tmp_path, a_model(), 1))
    other = a_model()
    with torch.no_grad():
        other.get_parameter("1.weight")[0, 0] += 1e-3
    originals = {n: other.get_parameter(n) for n in ("0.weight", "1.weight")}
    with pytest.raises(CheckpointMismatchError, match="written for another model: W0 of 1.weight differs"):
        check_model(checkpoint, originals, other)
    with pytest.raises(CheckpointMismatchError, match=r"edited matrices \['0.weight', '1.weight'\], this run edits"):
        check_model(checkpoint, {"0.weight": originals["0.weight"]}, other)


@pytest.mark.parametrize("value,expected", [([50, 25, 100], ([25, 50, 100], None)), (25, ([], 25)),
                                            ({"every": 10}, ([], 10)), ([0, 5], ([0, 5], None))])
def test_the_schedule_is_a_list_of_edit_counts_or_an_interval(value, expected):
    assert parse_schedule(value) == expected


@pytest.mark.parametrize("key,value,message", [
    ("prune_checkpoint_at", 0, "an interval must be a positive integer"),
    ("prune_checkpoint_at", [10, "x"], "must be a list of edit counts"),
    ("prune_checkpoint_at", True, "must be a list of edit counts"),
    ("prune_checkpoint_dir", "", "must be a file path"),
    ("prune_seed", -1, "must be a non-negative integer"),
])
def test_bad_checkpoint_keys_name_the_key_file_and_line(key, value, message):
    with pytest.raises(PruneConfigError, match=rf"run.yaml:4: {key}: {message}"):
        PruneConfig.from_mapping({key: value}, source="run.yaml", lines={key: 4})


def test_checkpointed_runs_are_seeded_per_edit_unless_told_otherwise():
    assert PruneConfig().edit_seed is None  # a plain run leaves the editor's random state alone
    assert PruneConfig(prune_checkpoint_dir="ckpt").edit_seed == 0
    assert PruneConfig(prune_checkpoint_dir="ckpt", prune_seed=7).edit_seed == 7
    assert PruneConfig(prune_checkpoint_dir="ckpt").active


# ------------------------------------------------------------------------------------------------ real runs


def start_run(workdir: Path, mode: str, weights: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(workdir), mode, str(workdir / weights), *extra],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@requires_easyeditor
@pytest.mark.parametrize("mode", ["final", "online"])
def test_a_run_killed_mid_sequence_resumes_to_the_same_weights_bit_for_bit(tmp_path, mode):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    for folder in (uninterrupted, interrupted):
        folder.mkdir()
        (folder / "edits.json").write_text(json.dumps(RECORDS))
    reference = start_run(uninterrupted, mode, "weights.safetensors")
    assert finish(reference)["steps"] == [0, 1, 2, 3, 4, 5]

    victim = start_run(interrupted, mode, "weights.safetensors", "--pause", "1")
    deadline = time.monotonic() + 900
    while not (interrupted / "checkpoints" / "edit-000003").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its third checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)  # into the fourth edit's pause: no checkpoint of it yet
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (interrupted / "weights.safetensors").exists()
    assert latest_checkpoint(interrupted / "checkpoints").edits == 3

    resumed = finish(start_run(interrupted, mode, "weights.safetensors", "--resume"))
    assert resumed["steps"] == [3, 4, 5]  # the requests already applied are skipped
    want, got = load_file(str(uninterrupted / "weights.safetensors")), load_file(str(interrupted / "weights.safetensors"))
    assert set(want) == set(got) == {"model.layers.1.mlp.down_proj.weight"}
    assert all(torch.equal(want[n], got[n]) for n in want)
    final_counts = [read_checkpoint(p).edits for p in list_checkpoints(interrupted / "checkpoints")]
    assert final_counts == [1, 2, 3, 4, 5, 6]
    if mode == "online":  # the basis each restraint starts from travels with the checkpoint
        bases = read_checkpoint(interrupted / "checkpoints" / "edit-000003").bases()
        assert set(bases) == {"model.layers.1.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def ee(legacy_easyeditor):
    import prune_plugin.easyedit as pe

    pe.activate(legacy_easyeditor)
    return legacy_easyeditor


@pytest.mark.slow
@requires_easyeditor
def test_restraining_a_checkpoint_equals_final_mode_with_that_base_for_every_base(ee, tmp_path, monkeypatch):
    from prune_plugin.branches import apply_checkpoint, checkpoint_branch
    from prune_plugin.testing import tiny_model

    monkeypatch.chdir(tmp_path)
    records = RECORDS[:3]
    common = dict(prune_seed=3, prune_telemetry=str(tmp_path / "t.jsonl"))  # telemetry leaves rank hints behind
    edit(rome_yaml(tmp_path, prune_checkpoint_dir=str(tmp_path / "once"), **common), records)
    checkpoint = read_checkpoint(tmp_path / "once" / "edit-000003")
    target = "model.layers.1.mlp.down_proj.weight"
    for alpha in ("e", 2, 1.5, 1.2, "linear"):
        direct, _ = edit(rome_yaml(tmp_path, prune=True, prune_alpha=alpha, prune_mode="final", **common), records)
        model, _ = tiny_model("llama")
        session = apply_checkpoint(model, checkpoint, math.e if alpha == "e" else alpha)
        assert session.last_restraint[target].n_restrained > 0, f"a={alpha}: nothing was restrained, a weak test"
        assert torch.equal(model.get_parameter(target), direct.get_parameter(target)), f"a={alpha}"
    unrestrained, _ = tiny_model("llama")
    w0 = unrestrained.get_parameter(target).detach().clone()
    with checkpoint_branch(unrestrained, checkpoint) as branch:  # as saved: no restraint
        assert torch.equal(unrestrained.get_parameter(target), checkpoint.matrices()[target])
        assert branch.last_restraint == {}
    assert torch.equal(unrestrained.get_parameter(target), w0)  # W0 back after the branch


@pytest.mark.slow
@requires_easyeditor
def test_resuming_with_other_hparams_requests_or_model_is_refused_naming_the_mismatch(ee, tmp_path, monkeypatch):
    from prune_plugin.easyedit.driver import build_editor, load_hparams
    from prune_plugin.easyedit.resume import resume
    from prune_plugin.testing import tiny_model

    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    edit(rome_yaml(tmp_path, prune_checkpoint_dir=ckpt, prune_checkpoint_at=1), RECORDS[:2])

    def resumed(path: Path, records, model=None):
        model_, tok = tiny_model("llama")
        editor = build_editor(load_hparams(path), model if model is not None else model_, tok)
        before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
        try:
            return resume(editor, records)
        except CheckpointMismatchError:  # refused before any weight was touched
            assert all(torch.equal(p, before[n]) for n, p in editor.model.named_parameters())
            raise

    with pytest.raises(CheckpointMismatchError, match="written with other hparams: v_lr was 0.5, now 0.25"):
        resumed(rome_yaml(tmp_path, prune_checkpoint_dir=ckpt, v_lr=0.25), RECORDS)
    with pytest.raises(CheckpointMismatchError, match="request 1 differs: prompt was 'The Nile flows through'"):
        resumed(rome_yaml(tmp_path, prune_checkpoint_dir=ckpt), [RECORDS[0], RECORDS[2]])
    other, _ = tiny_model("llama")
    with torch.no_grad():
        other.get_parameter("model.layers.1.mlp.down_proj.weight").mul_(1.001)
    with pytest.raises(CheckpointMismatchError, match="written for another model: W0 of model.layers.1.mlp.down_proj"):
        resumed(rome_yaml(tmp_path, prune_checkpoint_dir=ckpt), RECORDS, model=other)
    # the same settings, a longer request list (and a new telemetry file): resumes after the two edits
    checkpoint, remaining = resumed(rome_yaml(tmp_path, prune_checkpoint_dir=ckpt,
                                              prune_telemetry=str(tmp_path / "new.jsonl")), RECORDS)
    assert checkpoint.edits == 2 and remaining == RECORDS[2:]


@pytest.mark.slow
@requires_easyeditor
def test_skipping_easyedits_own_metrics_gives_the_same_weights_and_one_sequence(ee, tmp_path, monkeypatch):
    from prune_plugin.easyedit.driver import build_editor, edit_sequentially, load_hparams
    from prune_plugin.testing import tiny_model

    monkeypatch.chdir(tmp_path)
    path = rome_yaml(tmp_path, prune=True, prune_alpha=1.2, prune_mode="final", prune_seed=1)
    target = "model.layers.1.mlp.down_proj.weight"
    weights, ends = [], []
    for metrics in (True, False):
        model, tok = tiny_model("llama")
        editor = build_editor(load_hparams(path), model, tok)
        returned = edit_sequentially(editor, RECORDS[:3], easyedit_metrics=metrics)
        assert len(returned) == (3 if metrics else 0)
        session = editor._prune_session
        ends.append((session.ended, [s.index for s in session.steps], sorted(session.last_restraint)))
        weights.append(model.get_parameter(target).detach().clone())
    assert ends[0] == ends[1] == (True, [0, 1, 2], [target])  # one sequence, restrained once at its end
    assert torch.equal(weights[0], weights[1])
