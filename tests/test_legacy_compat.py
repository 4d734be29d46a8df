"""The packaged EasyEdit (PyPI easyeditor 0.0.1.dev0) editing in-memory models on a CPU-only machine, through
prune_plugin.easyedit.installed (import, detection, hparams fit), .legacy (CUDA->CPU redirect, decoder tuples, editor)
and .covariance (MEMIT statistics).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import prune_plugin
from prune_plugin.easyedit import installed, legacy
from prune_plugin.easyedit.covariance import covariance_path, precompute_covariance
from helpers.editing import EDITS, changed, requires_easyeditor, sentences, snapshot
from prune_plugin.testing import ARCH, METHOD, tiny_gpt2, tiny_llama, tiny_model, train_tokenizer

pytestmark = requires_easyeditor
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where CUDA is missing")

@pytest.fixture(scope="module")
def ee(legacy_easyeditor: types.ModuleType) -> types.ModuleType:
    return legacy_easyeditor


def load_hparams(ee: types.ModuleType, folder: Path, alg: str, arch: str, **overrides: object) -> object:
    templates = {k: v for k, v in ARCH[arch].items() if k != "build"}
    config = {"alg_name": alg, "model_name": "tiny", "device": 0, **templates, **METHOD[alg], **overrides}
    if alg != "FT":
        config["stats_dir"] = str(folder / "stats")
    path = folder / f"{alg}-{arch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return getattr(ee, f"{alg}HyperParams").from_hparams(str(path))


def target_probability(model: torch.nn.Module, tok: object, edit: dict) -> float:
    ids = tok(edit["prompts"][0], return_tensors="pt")["input_ids"]
    target = tok(edit["target_new"][0])["input_ids"][0]
    with torch.no_grad():
        return model(ids).logits[0, -1].softmax(-1)[target].item()


# --------------------------------------------------------------------------------------------- import


def test_the_packaged_release_is_recognised_as_legacy(ee):
    assert installed.installed_easyeditor_version() == "0.0.1.dev0"
    assert installed.is_legacy_easyeditor()
    assert installed.is_legacy_easyeditor(ee)


def test_placeholders_serve_only_the_import_of_easyeditor(ee):
    absent = [name for name in installed.PLACEHOLDER_PACKAGES if importlib.util.find_spec(name) is None]
    if not absent:
        pytest.skip("every package easyeditor imports is installed here: no placeholder was needed")
    for name in absent:
        assert name not in sys.modules
        with pytest.raises(ImportError):
            importlib.import_module(name)


def test_easyeditor_code_that_needs_a_missing_package_says_which(ee):
    if importlib.util.find_spec("peft") is not None:
        pytest.skip("peft is installed here, so easyeditor's LoRA got the real package")
    lora = sys.modules["easyeditor.models.lora.lora_main"]
    with pytest.raises(ImportError, match="'peft'.*LoRA"):
        lora.get_peft_model(None, None)


# --------------------------------------------------------------------------------------------- devices


@cpu_only
def test_cuda_requests_land_on_the_cpu_inside_the_redirect():
    layer = torch.nn.Linear(3, 3)
    weight = layer.weight.detach().clone()
    batch = train_tokenizer()(["The river flows"], return_tensors="pt")
    with legacy.cpu_device_redirect() as active:
        made = [
            torch.zeros(2, device="cuda:0"), torch.tensor(1, device=torch.device("cuda", 1)), torch.ones(2).to("cuda"),
            torch.ones(2).cuda(), torch.ones(2).to(0), torch.ones(2).to(device="cuda:0"),
            torch.ones(2).to("cuda:0", torch.float64), batch.to("cuda:0")["input_ids"],
        ]
        layer.to("cuda:0")
        layer.cuda()
    assert active
    assert [t.device.type for t in made] == ["cpu"] * len(made)
    assert made[6].dtype == torch.float64
    assert layer.weight.device.type == "cpu" and torch.equal(layer.weight, weight)
    with pytest.raises((AssertionError, RuntimeError)):  # switched off again
        torch.zeros(1, device="cuda")


@cpu_only
def test_the_redirect_can_be_switched_off_and_nests():
    with legacy.cpu_device_redirect(enabled=False) as active:
        assert not active
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
    with legacy.cpu_device_redirect():
        with legacy.cpu_device_redirect() as inner:
            assert inner
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # leaving the inner block kept the outer one


def test_the_redirect_stays_off_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with legacy.cpu_device_redirect() as active:
        assert not active


# --------------------------------------------------------------------------------------------- decoder layers


def test_easyeditor_hooks_see_llama_decoder_outputs_as_tuples(ee):
    nethook = sys.modules["easyeditor.util.nethook"]
    original_trace = nethook.Trace
    model, tok = tiny_llama()
    batch = tok(["The river flows to the sea"], return_tensors="pt")
    reference = model(**batch).logits

    def shift(output, layer):  # the way MEMIT edits a layer's output: in place, through output[0]
        if layer == "model.layers.1":
            output[0][:, -1] += 1.0
        return output

    with legacy.decoder_tuple_outputs(ee):
        with nethook.TraceDict(model, ["model.layers.1", "model.layers.1.mlp"], edit_output=shift) as traces:
            logits = model(**batch).logits
    layer_out, mlp_out = traces["model.layers.1"].output, traces["model.layers.1.mlp"].output
    assert isinstance(layer_out, tuple) and layer_out[0].shape == (1, 6, 32)
    assert isinstance(mlp_out, torch.Tensor)  # not a decoder layer: as the model returns it
    assert not torch.allclose(logits[0, -1], reference[0, -1])  # the in-place edit reached the model's output
    assert nethook.Trace is original_trace
    assert not model.model.layers[1]._forward_hooks


def test_gpt2_blocks_keep_their_own_tuples(ee):
    nethook = sys.modules["easyeditor.util.nethook"]
    model, tok = tiny_gpt2()
    batch = tok(["The river flows to the sea"], return_tensors="pt")
    with legacy.decoder_tuple_outputs(ee), nethook.Trace(model, "transformer.h.1") as trace:
        model(**batch)
    assert isinstance(trace.output, tuple) and trace.output[0].shape == (1, 6, 32)


# --------------------------------------------------------------------------------------------- editor


def test_make_editor_wraps_the_in_memory_model_without_touching_the_callers_hparams(ee, workdir):
    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    tok.pad_token = None
    hparams = load_hparams(ee, workdir, "ROME", "llama")
    editor = legacy.make_editor(hparams, model, tok)
    assert isinstance(editor, ee.BaseEditor)
    assert editor.model is model and editor.tok is tok
    assert editor.model_name == editor.hparams.model_name == "tiny"  # a string again: the methods test it
    assert editor.hparams is not hparams and hparams.model_name == "tiny"
    assert tok.padding_side == "right" and tok.pad_token == tok.eos_token  # ROME, MEMIT and FT assume both


def test_a_new_editor_forgets_the_last_models_templates_and_covariances(ee, workdir):
    rome_main = sys.modules["easyeditor.models.rome.rome_main"]
    memit_main = sys.modules["easyeditor.models.memit.memit_main"]
    rome_main.CONTEXT_TEMPLATES_CACHE = ["{}", "stale . {}"]
    memit_main.COV_CACHE[("tiny-llama", "model.layers.1.mlp.down_proj")] = torch.eye(64)
    model, tok = tiny_model("llama")
    legacy.make_editor(load_hparams(ee, workdir, "ROME", "llama"), model, tok)
    assert rome_main.CONTEXT_TEMPLATES_CACHE is None
    assert memit_main.COV_CACHE == {}


@pytest.mark.parametrize("alg, arch, overrides, message", [
    ("ROME", "llama", dict(rewrite_module_tmp="model.layers.{}.mlp.out_proj"), "rewrite_module_tmp"),
    ("MEMIT", "llama", dict(layers=[1, 7]), "at layer 7"),
    ("FT", "gpt2", dict(rewrite_module_tmp="transformer.h.{}.ffn"), "matches no parameter"),
    ("MEMIT", "gpt2", dict(lm_head_module="lm_head"), "tied to the input embeddings, set lm_head_module: "
                                                       "transformer.wte"),
])
def test_make_editor_names_the_hparams_key_that_does_not_fit(ee, workdir, alg, arch, overrides, message):
    model, tok = tiny_model(arch)
    with pytest.raises(ValueError, match=message):
        legacy.make_editor(load_hparams(ee, workdir, alg, arch, **overrides), model, tok)


def test_make_editor_refuses_what_is_not_hparams_model_and_tokenizer(ee, workdir):
    model, tok = tiny_model("llama")
    hparams = load_hparams(ee, workdir, "FT", "llama")
    with pytest.raises(TypeError, match="hparams"):
        legacy.make_editor(vars(hparams), model, tok)
    with pytest.raises(TypeError, match="model"):
        legacy.make_editor(hparams, model.state_dict(), tok)


# One row per method and architecture: the parameters an edit may change, and whether it reads covariances.
CASES = [
    ("ROME", "llama", {"model.layers.1.mlp.down_proj.weight"}, dict(mom2_adjustment=True)),
    ("ROME", "gpt2", {"transformer.h.1.mlp.c_proj.weight"}, {}),
    ("MEMIT", "llama", {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}, {}),
    ("MEMIT", "gpt2", {"transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"}, {}),
    ("FT", "llama", {"model.layers.1.mlp.down_proj.weight"}, {}),
    ("FT", "gpt2", {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}, {}),  # FT: all of them
]


@pytest.mark.slow
@pytest.mark.parametrize("alg, arch, targets, overrides", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sequential_edits_change_only_the_target_weights_and_take_effect(ee, workdir, alg, arch, targets, overrides):
    model, tok = tiny_model(arch)
    hparams = load_hparams(ee, workdir, alg, arch, **overrides)
    if getattr(hparams, "mom2_adjustment", False):
        precompute_covariance(model, tok, hparams, sentences())
    original = previous = snapshot(model)
    editor = legacy.make_editor(hparams, model, tok)
    torch.manual_seed(0)  # the context templates are sampled
    for edit in EDITS:
        before = target_probability(model, tok, edit)
        _, edited, weights_copy = editor.edit(**edit, keep_original_weight=False, verbose=False)
        after = target_probability(model, tok, edit)
        now = snapshot(model)
        assert edited is model
        assert weights_copy == {}  # sequential mode: nothing kept, nothing restored
        assert changed(previous, now) == targets  # this edit wrote exactly the target weights...
        assert changed(original, now) == targets  # ...on top of the last one; all else is bit-identical
        assert after > 100 * before, f"{alg} on {arch}: p({edit['target_new'][0]}) {before:.3g} -> {after:.3g}"
        previous = now
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow
def test_keeping_the_original_weight_restores_it_after_each_edit(ee, workdir):
    model, tok = tiny_model("llama")
    original = snapshot(model)
    editor = legacy.make_editor(load_hparams(ee, workdir, "FT", "llama", num_steps=3), model, tok)
    _, _, weights_copy = editor.edit(**EDITS[0], keep_original_weight=True, verbose=False)
    assert set(weights_copy) == {"model.layers.1.mlp.down_proj.weight"}
    assert changed(original, snapshot(model)) == set()


@pytest.mark.slow
@cpu_only
def test_the_compat_is_undone_when_an_edit_returns(ee, workdir):
    nethook = sys.modules["easyeditor.util.nethook"]
    original_trace = nethook.Trace
    model, tok = tiny_model("llama")
    editor = legacy.make_editor(load_hparams(ee, workdir, "FT", "llama", num_steps=2), model, tok)
    editor.edit(**EDITS[0], keep_original_weight=False, verbose=False)
    assert nethook.Trace is original_trace
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


@cpu_only
def test_a_release_with_sequential_edit_gets_no_compat():
    class BaseEditor:
        def edit(self, prompts, target_new, sequential_edit=False):
            pass

    current = types.ModuleType("easyeditor_current")
    current.BaseEditor = BaseEditor
    assert not installed.is_legacy_easyeditor(current)
    with legacy.legacy_compat(current) as active:
        assert not active
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")


# --------------------------------------------------------------------------------------------- covariance


def test_covariance_file_is_what_easyeditors_layer_stats_loads(ee, workdir, monkeypatch):
    model, tok = tiny_model("llama")
    hparams = load_hparams(ee, workdir, "MEMIT", "llama")
    texts = sentences()
    paths = precompute_covariance(model, tok, hparams, texts, batch_size=7)
    assert paths == [covariance_path(model, hparams, layer) for layer in hparams.layers]
    assert paths[0] == workdir / "stats/tiny-llama/wikipedia_stats/model.layers.1.mlp.down_proj_float32_mom2_100.npz"

    layer_stats = sys.modules["easyeditor.models.rome.layer_stats"]
    monkeypatch.setattr(layer_stats, "load_dataset", lambda *a, **k: pytest.fail("easyeditor asked the dataset hub"))
    for layer in hparams.layers:
        name = hparams.rewrite_module_tmp.format(layer)
        keys = []  # the reference: each text alone, no padding, every token's input to the rewritten module
        handle = model.get_submodule(name).register_forward_pre_hook(lambda m, inputs: keys.append(inputs[0][0]))
        with torch.no_grad():
            for text in texts:
                model(tok(text, return_tensors="pt")["input_ids"])
        handle.remove()
        k = torch.cat(keys).double()
        stat = layer_stats.layer_stats(model, tok, name, hparams.stats_dir, hparams.mom2_dataset, to_collect=["mom2"],
                                       sample_size=hparams.mom2_n_samples, precision=hparams.mom2_dtype,
                                       hparams=hparams)
        assert stat.mom2.count == k.shape[0]
        torch.testing.assert_close(stat.mom2.moment().double(), k.T @ k / k.shape[0], rtol=1e-4, atol=1e-9)


def test_existing_statistics_are_kept_unless_overwritten(ee, workdir):
    model, tok = tiny_model("llama")
    hparams = load_hparams(ee, workdir, "MEMIT", "llama", layers=[2])
    [path] = precompute_covariance(model, tok, hparams, sentences(seed=1))
    first = np.load(path)["mom2.mom2"]
    precompute_covariance(model, tok, hparams, sentences(seed=2))
    assert np.array_equal(np.load(path)["mom2.mom2"], first)
    precompute_covariance(model, tok, hparams, sentences(seed=2), overwrite=True)
    assert not np.array_equal(np.load(path)["mom2.mom2"], first)
    assert list(path.parent.iterdir()) == [path]  # no temporary files left


@pytest.mark.parametrize("problem, message", [
    ("unnamed model", "_name_or_path is empty"),
    ("no texts", "non-empty sequence"),
    ("one string", "non-empty sequence"),
    ("FT hparams", "only methods with covariance statistics"),
])
def test_covariance_refuses_what_easyeditor_could_not_use(ee, workdir, problem, message):
    model, tok = tiny_model("llama")
    hparams = load_hparams(ee, workdir, "FT" if problem == "FT hparams" else "MEMIT", "llama")
    texts = {"no texts": [], "one string": "The river flows to the sea"}.get(problem, sentences(5))
    if problem == "unnamed model":
        model.config._name_or_path = ""  # easyeditor would then look in /wikipedia_stats/
    with pytest.raises(ValueError, match=message):
        precompute_covariance(model, tok, hparams, texts)
    assert not (workdir / "stats").exists()


# --------------------------------------------------------------------------------------------- shipped hparams


@pytest.mark.parametrize("alg", ["ROME", "MEMIT", "FT"])
def test_the_shipped_smollm2_hparams_load_and_fit_its_architecture(ee, alg):
    path = Path(prune_plugin.__file__).parent / "hparams" / alg / "smollm2-135m.yaml"
    hparams = getattr(ee, f"{alg}HyperParams").from_hparams(str(path))
    assert hparams.alg_name == alg
    assert all(4 <= layer <= 8 for layer in hparams.layers)  # early-middle of 30 layers
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # SmolLM2-135M's shapes, without its weights
        model = LlamaForCausalLM(config)
    installed.check_hparams_fit(model, hparams)
    for layer in hparams.layers:
        assert model.get_submodule(hparams.rewrite_module_tmp.format(layer)).weight.shape == (576, 1536)
