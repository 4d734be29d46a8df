"""The prune-plugin console script: bad options are one clear line and exit status 2; the main job runs end to end."""
import json

import pytest
import torch
import yaml

from prune_plugin.cli import main
from prune_plugin.plugins.telemetry import read_telemetry
from helpers.editing import requires_easyeditor
from prune_plugin.testing import tiny_model_folder_with_rome_yaml


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize("argv,needle", [
    (["--method", "LORA"], "unknown method 'LORA' (choose ROME, MEMIT, FT)"),
    (["--alpha", "1"], "--alpha must be a log base > 1"),
    (["--alpha", "0.5"], "--alpha must be a log base > 1"),
    (["--edits", "0"], "must be a positive integer"),
    (["--mode", "sometimes"], "invalid choice: 'sometimes'"),
    (["--model", "./no/such/model", "--hparams", "x.yaml"], "--model: no such model folder: ./no/such/model"),
    (["--data", "/no/such/file.json"], "--data: cannot read /no/such/file.json"),
    (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_are_one_line_and_exit_2(capsys, argv, needle):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prune-plugin: error: ") and needle in err[0]


def test_a_malformed_data_file_names_the_file_record_and_field(capsys, tmp_path):
    bad = tmp_path / "edits.json"
    bad.write_text(json.dumps([{"case_id": 0, "prompt": "x", "subject": "x"}]))
    code, err = run_cli(capsys, "run", "--data", str(bad))
    assert code == 2 and len(err) == 1 and "edits.json" in err[0] and "record 0" in err[0]


def test_a_malformed_prune_tasks_file_is_refused_before_any_editing(capsys, tmp_path):
    from prune_plugin.datasets import default_prune_tasks_dir
    import shutil

    folder = shutil.copytree(default_prune_tasks_dir(), tmp_path / "tasks")
    (folder / "test-reasoning.jsonl").write_text('{"question": 3, "answer": "#### 1"}\n')
    code, err = run_cli(capsys, "run", "--prune-tasks-dir", str(folder))
    assert code == 2 and len(err) == 1
    assert "test-reasoning.jsonl" in err[0] and "record 0" in err[0] and "'question'" in err[0]
    code, err = run_cli(capsys, "run", "--prune-tasks-dir", str(tmp_path / "missing"))
    assert code == 2 and "no such folder" in err[0]


def test_invalid_json_is_one_line_too(capsys, tmp_path):
    bad = tmp_path / "edits.json"
    bad.write_text("[{")
    code, err = run_cli(capsys, "mine", "--data", str(bad))
    assert code == 2 and len(err) == 1 and "edits.json" in err[0]


def test_a_foreign_model_needs_its_hparams(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "--model needs --hparams" in err[0]


TWO_RECORDS = [
    {"case_id": 0, "prompt": "Toyota is a company from", "subject": "Toyota", "target_new": "Germany",
     "ground_truth": "Japan", "rephrase_prompt": "Toyota is a company from", "locality_prompt":
     "Rome is the capital of", "locality_ground_truth": "Italy"},
    {"case_id": 1, "prompt": "The Nile flows through", "subject": "The Nile", "target_new": "Brazil",
     "ground_truth": "Egypt", "rephrase_prompt": "The Nile flows through", "locality_prompt":
     "Berlin is the capital of", "locality_ground_truth": "Germany"},
]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """One main-job run on a tiny model: 2 edits, checkpoints after 1 and 2, two PRUNE bases."""
    import os

    tmp_path = tmp_path_factory.mktemp("main_job")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # EasyEdit writes logs/ into the working directory
    try:
        folder, hparams = tiny_model_folder_with_rome_yaml(tmp_path)
        records = tmp_path / "edits.json"
        records.write_text(json.dumps(TWO_RECORDS))
        out = tmp_path / "out"
        argv = ["run", "--model", str(folder), "--hparams", str(hparams), "--data", str(records), "--edits", "2",
                "--checkpoints", "1,2", "--alpha", "e,linear", "--eval-sentences", "8", "--out", str(out)]
        code = main(argv)
    finally:
        os.chdir(cwd)
    return code, out, argv, folder


@pytest.mark.slow
@requires_easyeditor
def test_main_job_edits_once_and_evaluates_every_arm_at_every_checkpoint(main_job):
    code, out, _, _ = main_job
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"no-restraint", "prune-a=e", "prune-a=linear"}
    assert list((out / "checkpoints").iterdir()) == [out / "checkpoints" / "edits"]  # one editing run for all arms
    assert sorted(p.name for p in (out / "checkpoints" / "edits").iterdir()) == ["edit-000001", "edit-000002"]
    edits = [r for r in read_telemetry(out / "edits.telemetry.jsonl") if r["event"] == "edit"]
    assert len(edits) == 2 and all(r["perplexity"] > 0 for r in edits)
    assert yaml.safe_load((out / "edits.yaml").read_text())["prune_checkpoint_at"] == [1, 2]
    for arm, curve in results["curves"].items():
        assert [p["edits"] for p in curve] == [0, 1, 2]  # from the unedited model at 0
        assert curve[0]["metrics"] == results["unedited"]
        for point in curve:
            assert 0 <= point["metrics"]["hardedit_efficacy/acc,none"] <= 1
            assert point["metrics"]["collapse_ppl_paper/mean_ppl,none"] > 1
        # PRUNE's general abilities (about a thousand generations with the official files) at 0 and the last edit
        assert ["prune_reasoning/acc,none" in p["metrics"] for p in curve] == [True, False, True]
        assert 0 <= curve[-1]["metrics"]["prune_summarization/rouge,none"] <= 1
    cond = {arm: curve[-1]["cond"]["model.layers.1.mlp.down_proj.weight"] for arm, curve in results["curves"].items()}
    restrained = results["curves"]["prune-a=e"][-1]["restraint"]["model.layers.1.mlp.down_proj.weight"]["restrained"]
    assert restrained > 0 and cond["prune-a=e"] < cond["no-restraint"]  # the arms separate
    assert cond["prune-a=linear"] != cond["prune-a=e"]
    assert "| reasoning (GSM8K acc) |" in (out / "table.md").read_text()
    for name in ("condition_number.png", "collapse_perplexity.png", "editing_metrics.png", "general_abilities.png",
                 "table.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
@requires_easyeditor
def test_resuming_a_finished_main_job_edits_nothing_and_keeps_its_evaluations(main_job, monkeypatch, caplog):
    code, out, argv, _ = main_job
    before = json.loads((out / "results.json").read_text())
    monkeypatch.chdir(out.parent)
    with caplog.at_level("INFO", logger="prune_plugin"):
        assert main([*argv, "--resume"]) == 0
    assert "edits: all 2 edits are checkpointed; nothing to edit" in caplog.text
    assert "evaluating" not in caplog.text
    assert json.loads((out / "results.json").read_text())["curves"] == before["curves"]
    caplog.clear()
    with caplog.at_level("INFO", logger="prune_plugin"):  # a task added later is evaluated on every branch alone
        assert main([*argv, "--resume", "--tasks", "hardedit,collapse_ppl,collapse_ppl_paper"]) == 0
    evaluated = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating")]
    assert len(evaluated) == 7 and all(m.endswith(": collapse_ppl_paper") for m in evaluated)  # 1 + 2 x 3 branches
    evaluations = json.loads((out / "evaluations.json").read_text())
    assert evaluations["no-restraint@1"]["tasks"] == ["hardedit", "collapse_ppl", "collapse_ppl_paper"]
    assert json.loads((out / "results.json").read_text())["curves"] == before["curves"]  # same weights, same numbers


@pytest.mark.slow
@requires_easyeditor
def test_eval_of_a_restrained_checkpoint_reproduces_the_main_jobs_number(main_job, capsys, tmp_path):
    _, out, _, _ = main_job
    checkpoint = out / "checkpoints" / "edits" / "edit-000002"
    metadata = json.dumps({"collapse_path": str(out / "eval_sentences.json")})
    assert main(["eval", f"{checkpoint}@e", "--tasks", "collapse_ppl", "--metadata", metadata,
                 "--out", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "collapse_ppl_paper: mean_ppl,none" in printed
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["edits"] == 2 and got["alpha"] == "e"
    want = json.loads((out / "results.json").read_text())["curves"]["prune-a=e"][-1]["metrics"]
    assert got["results"]["collapse_ppl_paper"]["mean_ppl,none"] == want["collapse_ppl_paper/mean_ppl,none"]


@pytest.mark.slow
@requires_easyeditor
def test_restrain_writes_one_checkpoint_per_base(main_job, capsys, tmp_path):
    from prune_plugin.checkpoint import read_checkpoint

    _, out, _, _ = main_job
    checkpoint = out / "checkpoints" / "edits" / "edit-000002"
    assert main(["restrain", str(checkpoint), "--alpha", "e,1.2,linear", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "a=1.2  model.layers.1.mlp.down_proj.weight:" in printed
    saved = {base: read_checkpoint(tmp_path / f"a={base}" / "edit-000002") for base in ("e", "1.2", "linear")}
    assert {s.manifest["restraint"]["alpha"] for s in saved.values()} == {"e", "1.2", "linear"}
    weights = [s.matrices()["model.layers.1.mlp.down_proj.weight"] for s in saved.values()]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


@pytest.mark.parametrize("argv,needle", [
    (["eval", "no/such/folder"], "no/such/folder: no such checkpoint folder"),
    (["restrain", "no/such/folder"], "no/such/folder: no such checkpoint folder"),
    (["run", "--checkpoints", "5,x"], "--checkpoints: must be edit counts separated by commas"),
    (["eval", "x", "--metadata", "[1]"], "--metadata: must be a JSON object"),
])
def test_checkpoint_commands_refuse_bad_input_in_one_line(capsys, argv, needle):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_eval_refuses_a_corrupt_checkpoint_naming_the_file(capsys, tmp_path):
    from prune_plugin.checkpoint import write_checkpoint

    path = write_checkpoint(tmp_path, 1, {"w": torch.zeros(2, 2)}, {"model": {}})
    (path / "matrices.safetensors").write_bytes(b"not what was written")
    code, err = run_cli(capsys, "eval", f"{path}@1.2")
    assert code == 2 and "matrices.safetensors: corrupt" in err[0]
