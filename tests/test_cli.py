"""The prune-plugin console script: bad options are one clear line and exit status 2; the main job runs end to end."""
import json

import pytest
import yaml

from prune_plugin.cli import main
from prune_plugin.plugins.telemetry import read_telemetry
from edit_fixtures import requires_easyeditor, tiny_model_folder_with_rome_yaml


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


def test_invalid_json_is_one_line_too(capsys, tmp_path):
    bad = tmp_path / "edits.json"
    bad.write_text("[{")
    code, err = run_cli(capsys, "mine", "--data", str(bad))
    assert code == 2 and len(err) == 1 and "edits.json" in err[0]


def test_a_foreign_model_needs_its_hparams(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "--model needs --hparams" in err[0]


@pytest.mark.slow
@requires_easyeditor
def test_main_job_runs_both_arms_and_writes_table_json_and_plots(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, hparams = tiny_model_folder_with_rome_yaml(tmp_path)
    records = tmp_path / "edits.json"
    records.write_text(json.dumps([
        {"case_id": 0, "prompt": "Toyota is a company from", "subject": "Toyota", "target_new": "Germany",
         "ground_truth": "Japan", "rephrase_prompt": "Toyota is a company from", "locality_prompt":
         "Rome is the capital of", "locality_ground_truth": "Italy"},
        {"case_id": 1, "prompt": "The Nile flows through", "subject": "The Nile", "target_new": "Brazil",
         "ground_truth": "Egypt", "rephrase_prompt": "The Nile flows through", "locality_prompt":
         "Berlin is the capital of", "locality_ground_truth": "Germany"},
    ]))
    out = tmp_path / "out"
    code = main(["run", "--model", str(folder), "--hparams", str(hparams), "--data", str(records), "--edits", "2",
                 "--alpha", "linear", "--eval-sentences", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| efficacy (rewrite prefers target_new) |" in printed and "no-restraint" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"no-restraint", "prune"}
    for arm in results["arms"].values():
        assert 0 <= arm["metrics"]["hardedit_efficacy/acc,none"] <= 1
        assert arm["metrics"]["collapse_ppl_paper/mean_ppl,none"] > 1
        edits = [r for r in read_telemetry(arm["telemetry"]) if r["event"] == "edit"]
        assert len(edits) == 2 and all(r["perplexity"] > 0 for r in edits)
    for name in ("condition_number.png", "collapse_perplexity.png", "editing_metrics.png", "table.md"):
        assert (out / name).stat().st_size > 0
    assert yaml.safe_load((out / "prune.yaml").read_text())["prune"] is True
