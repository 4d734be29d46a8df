"""PRUNE inside the real EasyEdit (packaged 0.0.1.dev0 on CPU): switched on by keys in the hparams YAML.

Each run edits a tiny model sequentially with real ROME, MEMIT or FT through BaseEditor.edit.
"""
from __future__ import annotations

import random

import pytest
import torch
import yaml

import prune_plugin.easyedit as pe
from prune_plugin.config import PruneConfigError
from prune_plugin.easyedit import installed, legacy
from prune_plugin.easyedit.covariance import precompute_covariance
from prune_plugin.plugins.telemetry import read_telemetry
from prune_plugin.restraint import restrain_values
from helpers.editing import changed, requires_easyeditor, sentences, snapshot, write_yaml
from prune_plugin.testing import tiny_model

pytestmark = [pytest.mark.slow, requires_easyeditor]

REQUESTS = dict(
    prompts=["The mother tongue of Danielle Darrieux", "The official language of Brazil", "Toyota is a company from"],
    subject=["Danielle Darrieux", "Brazil", "Toyota"],
    target_new=["English", "Japanese", "Germany"],
    ground_truth=["French", "Portuguese", "Japan"],
)


@pytest.fixture(scope="module")
def ee(legacy_easyeditor):
    pe.activate(legacy_easyeditor)
    yield legacy_easyeditor
    pe.deactivate()


def run_edits(ee, path, arch="llama", n=3):
    """Fresh tiny model, seeded, edited sequentially with the YAML at `path`; returns (editor, W0 snapshot)."""
    torch.manual_seed(0)
    random.seed(0)
    installed.reset_easyeditor_caches(ee)
    model, tok = tiny_model(arch)
    hparams = getattr(ee, f"{yaml.safe_load(path.read_text())['alg_name']}HyperParams").from_hparams(str(path))
    if hparams.alg_name == "MEMIT":
        precompute_covariance(model, tok, hparams, sentences())
    before = snapshot(model)
    editor = legacy.make_editor(hparams, model, tok)
    editor.edit(**{k: v[:n] for k, v in REQUESTS.items()}, keep_original_weight=False, verbose=False)
    return editor, before


@pytest.mark.parametrize("alg", ["ROME", "MEMIT", "FT"])
def test_prune_bounds_every_restrained_matrix_as_the_paper_says(ee, workdir, alg):
    telemetry = workdir / "t.jsonl"
    # 'linear' shrinks every value above smax(W0); a log base would need smax(W0) > 1/ln a to shrink anything, and
    # a tiny random model's smax(W0) is about 0.27 (the never-enlarge guard would keep the values unchanged).
    path = write_yaml(workdir, alg, prune=True, prune_alpha="linear", prune_mode="final", prune_telemetry=str(telemetry))
    editor, before = run_edits(ee, path)
    session = pe.session_of(editor)
    edits = [r for r in read_telemetry(telemetry) if r["event"] == "edit"]
    unrestrained = {f["name"]: f["smax_delta"] for f in edits[-1]["figures"]}  # measured before the final restraint
    final = [r for r in read_telemetry(telemetry) if r["event"] == "end"][0]["final_restraint"]
    assert any(f["restrained"] for f in final), "the edits never reached smax(W0): the test would prove nothing"
    for name in session.changed_from_original():
        w = editor.model.get_parameter(name)
        if w.ndim != 2:
            continue
        w0 = session.originals[name]
        smax0 = session.smax.get(name, w0)
        bound = restrain_values(torch.tensor([unrestrained[name]], dtype=torch.float64), smax0, "linear")[0].item()
        smax_after = torch.linalg.svdvals((w - w0).double())[0].item()
        assert smax_after <= max(bound, smax0) * (1 + 1e-5) + 1e-6, name
    # nothing outside the method's own targets moved
    targets = set(session.targets)
    assert changed(before, snapshot(editor.model)) <= targets


@pytest.mark.parametrize("alg", ["ROME", "FT"])
def test_with_prune_off_the_plugin_changes_nothing(ee, workdir, alg):
    plain, _ = run_edits(ee, write_yaml(workdir, alg))
    assert pe.session_of(plain) is None
    watched, _ = run_edits(ee, write_yaml(workdir, alg, prune=False, prune_telemetry=str(workdir / "t.jsonl")))
    assert pe.session_of(watched) is not None  # hooks ran (telemetry), but no restraint
    assert not changed(snapshot(plain.model), snapshot(watched.model))


def test_online_mode_restrains_after_each_edit_and_restore_gives_back_w0(ee, workdir):
    telemetry = workdir / "t.jsonl"
    editor, before = run_edits(ee, write_yaml(workdir, "ROME", prune=True, prune_mode="online", prune_alpha="e",
                                              prune_telemetry=str(telemetry)))
    edits = [r for r in read_telemetry(telemetry) if r["event"] == "edit"]
    assert len(edits) == 3 and any(f["restrained"] for e in edits for f in e["figures"])
    pe.session_of(editor).restore()
    assert not changed(before, snapshot(editor.model))


def test_the_users_own_from_hparams_accepts_prune_keys_only_when_active(ee, workdir):
    path = write_yaml(workdir, "ROME", prune=True, prune_alpha=2)
    hparams = ee.ROMEHyperParams.from_hparams(str(path))
    assert hparams.prune_config.prune and hparams.prune_config.prune_alpha == 2.0
    pe.deactivate()
    try:
        with pytest.raises(TypeError):
            ee.ROMEHyperParams.from_hparams(str(path))  # EasyEdit's own behaviour, untouched when inactive
    finally:
        pe.activate(ee)


def test_a_misspelled_key_names_the_key_the_file_and_the_line(ee, workdir):
    path = write_yaml(workdir, "ROME", prune=True, prune_mod="online")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("prune_mod:"))
    with pytest.raises(PruneConfigError, match=rf"{path.name}:{line}: unknown key 'prune_mod' \(did you mean 'prune_mode'\?\)"):
        ee.ROMEHyperParams.from_hparams(str(path))


def test_a_bad_alpha_names_the_key_and_the_file(ee, workdir):
    path = write_yaml(workdir, "MEMIT", prune=True, prune_alpha=0.9)
    with pytest.raises(PruneConfigError, match=rf"{path.name}:\d+: prune_alpha: must be a log base > 1"):
        ee.MEMITHyperParams.from_hparams(str(path))


def test_methods_that_do_not_edit_weights_in_place_get_a_clear_message():
    with pytest.raises(pe.PruneNotApplicableError, match="PRUNE does not apply to LoRA"):
        from prune_plugin.easyedit.editor import check_applicable

        check_applicable("LoRA")
