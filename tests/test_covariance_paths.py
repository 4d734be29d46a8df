"""Covariance statistics land where the EasyEdit that will read them looks: the packaged 0.0.1.dev0 names the
model's folder after `_name_or_path` with "/" as "_", the current EasyEdit after its last path component.

The current generation's own layer_stats reads the files in tests/test_easyedit_current.py (optional: it needs a
checkout); here the packaged one's does, for a model loaded from a local path, the case where the two differ.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.editing import requires_easyeditor
from prune_plugin.easyedit.covariance import covariance_path, easyedit_generation, precompute_covariance, stats_model_name
from prune_plugin.testing import tiny_llama

TEXTS = ["The river flows to the sea .", "Rome is the capital of Italy .", "A cat sat on the mat and a dog slept ."]


def named(model: torch.nn.Module, name_or_path: str) -> torch.nn.Module:
    model.config._name_or_path = name_or_path
    return model


def memit_hparams(stats_dir: Path, **overrides) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{
        "alg_name": "MEMIT", "layers": [1, 2], "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
        "stats_dir": str(stats_dir), "mom2_dataset": "wikipedia", "mom2_n_samples": 100, "mom2_dtype": "float32",
        **overrides})


@pytest.mark.parametrize("name_or_path, legacy, current", [
    ("gpt2-xl", "gpt2-xl", "gpt2-xl"),
    ("EleutherAI/gpt-j-6B", "EleutherAI_gpt-j-6B", "gpt-j-6B"),
    ("/models/llama-7b", "_models_llama-7b", "llama-7b"),
    ("./hugging_cache/gpt2-xl", "._hugging_cache_gpt2-xl", "gpt2-xl"),
])
def test_each_generation_names_the_model_folder_its_own_way(name_or_path, legacy, current):
    model = named(tiny_llama()[0], name_or_path)
    assert stats_model_name(model, "legacy") == legacy
    assert stats_model_name(model, "current") == current


@pytest.mark.parametrize("name_or_path, generation", [("", "legacy"), ("", "current"), ("/models/llama/", "current")])
def test_a_name_that_gives_an_empty_folder_is_refused(name_or_path, generation):
    with pytest.raises(ValueError, match="_name_or_path is empty"):
        stats_model_name(named(tiny_llama()[0], name_or_path), generation)


def fake_easyeditor(monkeypatch, package: str, sequential: bool) -> type:
    """A package shaped like easyeditor (BaseEditor.edit with or without sequential_edit) and an hparams class of it."""
    module = types.ModuleType(package)

    class BaseEditor:
        def edit(self, prompts, target_new, sequential_edit=False):  # the current generation's switch
            pass

    if not sequential:
        def edit(self, prompts, target_new, keep_original_weight=False):
            pass
        BaseEditor.edit = edit
    module.BaseEditor = BaseEditor
    hparams_cls = type("MEMITHyperParams", (types.SimpleNamespace,), {"__module__": f"{package}.models.memit"})
    monkeypatch.setitem(sys.modules, package, module)
    return hparams_cls


def test_the_generation_is_that_of_the_package_the_hparams_come_from(monkeypatch, tmp_path):
    current = fake_easyeditor(monkeypatch, "fake_current_easyeditor", sequential=True)
    legacy = fake_easyeditor(monkeypatch, "fake_legacy_easyeditor", sequential=False)
    model = named(tiny_llama()[0], str(tmp_path / "models" / "tiny-llama"))
    fields = vars(memit_hparams(tmp_path / "stats"))
    assert easyedit_generation(current(**fields)) == "current"
    assert easyedit_generation(legacy(**fields)) == "legacy"
    assert covariance_path(model, current(**fields), 1) == (
        tmp_path / "stats/tiny-llama/wikipedia_stats/model.layers.1.mlp.down_proj_float32_mom2_100.npz")
    assert covariance_path(model, legacy(**fields), 1).parts[-3] == str(tmp_path / "models/tiny-llama").replace("/", "_")


def test_pmet_gets_one_file_per_rewritten_module(tmp_path):
    model, tok = tiny_llama()
    named(model, "owner/tiny-llama")
    hparams = memit_hparams(tmp_path, layers=[2, 1], rewrite_module_tmps=["model.layers.{}.self_attn.o_proj",
                                                                          "model.layers.{}.mlp.down_proj"])
    paths = precompute_covariance(model, tok, hparams, TEXTS, generation="current")
    assert [p.name for p in paths] == [f"model.layers.{layer}.{module}_float32_mom2_100.npz"
                                       for layer in (1, 2) for module in ("self_attn.o_proj", "mlp.down_proj")]
    assert {p.parent for p in paths} == {tmp_path / "tiny-llama" / "wikipedia_stats"}
    for path in paths:  # each the second moment of that module's own inputs
        module = model.get_submodule(path.name.split("_float32")[0])
        keys = []
        handle = module.register_forward_pre_hook(lambda m, inputs: keys.append(inputs[0][0]))
        with torch.no_grad():
            for text in TEXTS:
                model(tok(text, return_tensors="pt")["input_ids"])
        handle.remove()
        k = torch.cat(keys).double()
        stored = np.load(path)
        assert int(stored["mom2.count"]) == k.shape[0]
        np.testing.assert_allclose(stored["mom2.mom2"], (k.T @ k).float().numpy(), rtol=1e-5, atol=1e-6)


@requires_easyeditor
def test_the_packaged_layer_stats_finds_them_for_a_model_loaded_from_a_path(tmp_path, monkeypatch):
    from prune_plugin.easyedit import installed

    ee = installed.import_easyeditor()
    layer_stats = sys.modules["easyeditor.models.rome.layer_stats"]
    monkeypatch.setattr(layer_stats, "load_dataset", lambda *a, **k: pytest.fail("easyeditor asked the dataset hub"))
    model, tok = tiny_llama()
    named(model, str(tmp_path / "models" / "tiny-llama"))
    hparams = memit_hparams(tmp_path / "stats")
    assert easyedit_generation(hparams) == "legacy"  # plain hparams: the installed easyeditor decides
    paths = precompute_covariance(model, tok, hparams, TEXTS)
    assert ee.MEMITHyperParams.__module__.startswith("easyeditor.")
    for layer, path in zip(hparams.layers, paths):
        stat = layer_stats.layer_stats(model, tok, hparams.rewrite_module_tmp.format(layer), hparams.stats_dir,
                                       hparams.mom2_dataset, to_collect=["mom2"], sample_size=hparams.mom2_n_samples,
                                       precision=hparams.mom2_dtype, hparams=hparams)
        assert stat.mom2.count == int(np.load(path)["mom2.count"])
