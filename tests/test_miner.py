"""The hard-case miner: one edit per record on fresh weights, ranked by the perplexity jump, weights restored."""
import json

import pytest
import torch

from prune_plugin.cli import main
from prune_plugin.datasets import load_edit_records
from prune_plugin.miner import hard_subset
from helpers.editing import requires_easyeditor
from prune_plugin.testing import tiny_model_folder_with_rome_yaml

pytestmark = pytest.mark.slow

RECORDS = [
    {"case_id": 0, "prompt": "Toyota is a company from", "subject": "Toyota", "target_new": "Germany",
     "ground_truth": "Japan", "rephrase_prompt": "Toyota is a company from", "locality_prompt": "Rome is the capital of",
     "locality_ground_truth": "Italy"},
    {"case_id": 1, "prompt": "The Nile flows through", "subject": "The Nile", "target_new": "Brazil",
     "ground_truth": "Egypt", "rephrase_prompt": "The Nile flows through", "locality_prompt": "Berlin is the capital of",
     "locality_ground_truth": "Germany"},
    {"case_id": 2, "prompt": "Shakespeare wrote", "subject": "Shakespeare", "target_new": "chess",
     "ground_truth": "Hamlet", "rephrase_prompt": "Shakespeare wrote", "locality_prompt": "Tokyo is the capital of",
     "locality_ground_truth": "Japan"},
]


@requires_easyeditor
def test_mining_ranks_records_restores_weights_and_writes_a_hardedit_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder, hparams = tiny_model_folder_with_rome_yaml(tmp_path)
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "mined"
    code = main(["mine", "--model", str(folder), "--hparams", str(hparams), "--data", str(data), "--sentences", "4",
                 "--threshold", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ranked = json.loads((out / "ranked.json").read_text())
    ratios = [r["ppl_ratio"] for r in ranked]
    assert ratios == sorted(ratios, reverse=True) and all(r > 0 for r in ratios)
    assert {r["case_id"] for r in ranked} == {0, 1, 2}
    assert all(r["ppl_before"] == ranked[0]["ppl_before"] for r in ranked)  # one baseline: fresh weights each time
    hard = load_edit_records(out / "hardedit.json")  # the hardedit task's own loader accepts it
    assert [r["prompt"] for r in hard] == [r["prompt"] for r in ranked]


@requires_easyeditor
def test_mining_with_memit_computes_its_covariance_locally_instead_of_downloading_it(tmp_path, monkeypatch, capsys):
    import yaml

    from prune_plugin.testing import ARCH, METHOD

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNE_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a download attempt fails instead of reaching the hub
    folder, _ = tiny_model_folder_with_rome_yaml(tmp_path)
    templates = {k: v for k, v in ARCH["llama"].items() if k != "build"}
    memit = tmp_path / "memit.yaml"
    memit.write_text(yaml.safe_dump(dict(alg_name="MEMIT", model_name="tiny", device=0,
                                         stats_dir=str(tmp_path / "no-stats-here"), **templates, **METHOD["MEMIT"])))
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(RECORDS[:2]))
    code = main(["mine", "--method", "MEMIT", "--model", str(folder), "--hparams", str(memit), "--data", str(data),
                 "--sentences", "4", "--threshold", "0", "--out", str(tmp_path / "mined")])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "mined" / "ranked.json").read_text())) == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "stats").rglob("*.npz")) == [
        f"model.layers.{layer}.mlp.down_proj_float32_mom2_100.npz" for layer in METHOD["MEMIT"]["layers"]]


def test_the_hard_subset_keeps_records_at_or_above_the_threshold_with_fresh_ids():
    mined = [dict(RECORDS[0], ppl_ratio=3.0), dict(RECORDS[1], ppl_ratio=1.5), dict(RECORDS[2], ppl_ratio=1.1)]
    hard = hard_subset(mined, 1.5)
    assert [r["case_id"] for r in hard] == [0, 1] and "ppl_ratio" not in hard[0]


@requires_easyeditor
def test_the_editor_model_is_restored_bit_exactly_after_each_record(tmp_path, monkeypatch):
    from prune_plugin.easyedit import installed, legacy
    from prune_plugin.miner import mine_hard_cases
    from helpers.editing import write_yaml
    from prune_plugin.testing import tiny_model

    monkeypatch.chdir(tmp_path)
    ee = installed.import_easyeditor()
    model, tok = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = write_yaml(tmp_path, "ROME")
    editor = legacy.make_editor(ee.ROMEHyperParams.from_hparams(str(path)), model, tok)
    mine_hard_cases(editor, RECORDS[:2], ["Rome is the capital of Italy .", "The river flows to the sea ."])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
