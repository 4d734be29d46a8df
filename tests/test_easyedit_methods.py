"""Which EasyEdit methods PRUNE applies to, which matrices it restrains for each, and what session.restore()
resets beside the weights. No easyeditor needed: hparams and editors are stand-ins with the fields the methods have.
"""
from __future__ import annotations

import sys
import types

import pytest

from prune_plugin.config import PruneConfig
from prune_plugin.easyedit.editor import (
    METHOD_STATE,
    NOT_IN_PLACE,
    PruneNotApplicableError,
    check_applicable,
    forget_method_state,
    target_parameters,
)
from prune_plugin.testing import tiny_llama

# The in-place methods of the current EasyEdit's ALG_DICT (zjunlp/EasyEdit 14cea82).
IN_PLACE = ["ROME", "R-ROME", "MEMIT", "MEMIT-FE", "PMET", "EMMET", "EAMET", "AlphaEdit", "SPHERE", "CORE", "FT",
            "DINM", "SimIE", "KN"]
LLAMA = dict(layers=[1, 2], rewrite_module_tmp="model.layers.{}.mlp.down_proj")


def hparams(alg_name: str, **fields) -> types.SimpleNamespace:
    return types.SimpleNamespace(alg_name=alg_name, **fields)


@pytest.mark.parametrize("method", IN_PLACE)
def test_in_place_methods_are_applicable(method):
    check_applicable(method)
    assert method not in NOT_IN_PLACE


@pytest.mark.parametrize("method", sorted(NOT_IN_PLACE))
def test_methods_that_edit_outside_the_weights_are_refused_with_the_reason(method):
    with pytest.raises(PruneNotApplicableError, match=f"PRUNE does not apply to {method}: it keeps its edits in"):
        check_applicable(method)


def test_targets_come_from_the_methods_own_templates_and_layers():
    model, _ = tiny_llama()
    assert target_parameters(model, hparams("MEMIT", **LLAMA), PruneConfig()) == [
        "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


def test_pmet_restrains_every_module_of_rewrite_module_tmps():
    model, _ = tiny_llama()
    pmet = hparams("PMET", **LLAMA, rewrite_module_tmps=["model.layers.{}.self_attn.o_proj",
                                                         "model.layers.{}.mlp.down_proj"])
    assert sorted(target_parameters(model, pmet, PruneConfig())) == [
        f"model.layers.{i}.{m}.weight" for i in (1, 2) for m in ("mlp.down_proj", "self_attn.o_proj")]


def test_simie_restrains_what_its_base_method_edits():
    model, _ = tiny_llama()
    simie = hparams("SimIE", base_method="MEMIT", _base_hparams=hparams("MEMIT", **LLAMA))
    assert target_parameters(model, simie, PruneConfig()) == [
        "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


def test_kn_needs_prune_targets_and_takes_them():
    model, _ = tiny_llama()
    kn = hparams("KN", p=0.4, steps=1)
    with pytest.raises(PruneNotApplicableError, match="KN edits weights in place.*prune_targets"):
        target_parameters(model, kn, PruneConfig())
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
    assert target_parameters(model, kn, PruneConfig(prune_targets=names)) == names


def fake_editor(monkeypatch, alg_name: str, **hparams_fields) -> types.SimpleNamespace:
    """An editor of a package `fakeee` whose method modules hold the state METHOD_STATE names, as "past edits"."""
    package = types.ModuleType("fakeee")
    monkeypatch.setitem(sys.modules, "fakeee", package)
    for module_name, attr, fresh in METHOD_STATE.get(alg_name, []):
        module = types.ModuleType(f"fakeee.{module_name}")
        setattr(module, attr, not fresh)
        monkeypatch.setitem(sys.modules, f"fakeee.{module_name}", module)
    editor_cls = type("BaseEditor", (), {"__module__": "fakeee.editors.editor"})
    editor = editor_cls()
    editor.alg_name, editor.hparams = alg_name, hparams(alg_name, **hparams_fields)
    return editor


@pytest.mark.parametrize("method", ["AlphaEdit", "SPHERE"])
def test_restore_resets_the_sum_over_past_edits_keys(monkeypatch, method):
    editor = fake_editor(monkeypatch, method)
    [(module_name, attr, fresh)] = METHOD_STATE[method]
    assert forget_method_state(editor) == [f"{module_name}.{attr}"]
    assert getattr(sys.modules[f"fakeee.{module_name}"], attr) is fresh


def test_restore_drops_simies_instance_and_leaves_other_methods_alone(monkeypatch):
    simie = fake_editor(monkeypatch, "SimIE", _simie_instance=object())
    assert forget_method_state(simie) == ["hparams._simie_instance"] and simie.hparams._simie_instance is None
    assert forget_method_state(fake_editor(monkeypatch, "MEMIT")) == []
