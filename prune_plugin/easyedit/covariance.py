"""Covariance statistics for EasyEdit's MEMIT-family methods (and ROME with ``mom2_adjustment``), from local texts.

EasyEdit's ``layer_stats`` looks for a cached ``.npz`` of the second moment E[k kᵀ] of the keys (the inputs of the
rewritten module) and, when it is missing, downloads Wikipedia through the dataset hub. This module writes that file
from a corpus you supply, at the path and with the keys ``layer_stats`` reads, so no hub is needed. Both EasyEdit
generations read the same file format, but name the model's folder differently:

* the packaged 0.0.1.dev0: ``config._name_or_path`` with every "/" replaced by "_" (``/models/gpt2`` -> ``_models_gpt2``);
* the current EasyEdit (GitHub; its ``layer_stats`` since 2024): the last path component (``/models/gpt2`` -> ``gpt2``,
  ``EleutherAI/gpt-j-6B`` -> ``gpt-j-6B``).

The file is written where the EasyEdit that owns `hparams` looks (the package its class comes from), or where the
installed easyeditor looks when `hparams` is a plain object; ``generation=`` says it explicitly.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

__all__ = ["Generation", "covariance_path", "easyedit_generation", "precompute_covariance", "stats_model_name",
           "statistics_dir", "prepare_statistics"]

LOG = logging.getLogger("prune_plugin")
Generation = Literal["legacy", "current"]
_REQUIRED = ("stats_dir", "mom2_dataset", "mom2_n_samples", "mom2_dtype", "rewrite_module_tmp", "layers")


def _check_hparams(hparams: Any) -> None:
    missing = [key for key in _REQUIRED if not hasattr(hparams, key)]
    if missing:
        raise ValueError(f"{getattr(hparams, 'alg_name', type(hparams).__name__)} hparams have no {missing}: only "
                         "methods with covariance statistics (MEMIT, ROME, EMMET, AlphaEdit, PMET, ...) use "
                         "precompute_covariance")


def _max_positions(model: torch.nn.Module) -> int:
    # the same order of config fields as layer_stats, which truncates every text to this length
    for key in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        if hasattr(model.config, key):
            return int(getattr(model.config, key))
    raise ValueError(f"{type(model.config).__name__} names no maximum sequence length")


def easyedit_generation(hparams: Any = None) -> Generation:
    """Which EasyEdit generation's conventions apply: that of the easyeditor package `hparams`' class comes from,
    else that of the installed easyeditor distribution, else "current"."""
    from .installed import installed_easyeditor_version, is_legacy_easyeditor

    package = sys.modules.get(type(hparams).__module__.partition(".")[0]) if hparams is not None else None
    if package is not None and hasattr(package, "BaseEditor"):
        return "legacy" if is_legacy_easyeditor(package) else "current"
    if installed_easyeditor_version() is not None:
        return "legacy" if is_legacy_easyeditor() else "current"
    return "current"


def stats_model_name(model: torch.nn.Module, generation: Generation) -> str:
    """The folder under ``stats_dir`` that `generation`'s ``layer_stats`` names after the model."""
    name_or_path = model.config._name_or_path
    name = name_or_path.replace("/", "_") if generation == "legacy" else name_or_path.rsplit("/")[-1]
    if not name:
        # layer_stats would join "/{dataset}_stats/..." onto stats_dir, i.e. look in the filesystem root
        raise ValueError(f"model.config._name_or_path is empty{' after its last /' if name_or_path else ''} "
                         f"({name_or_path!r}); EasyEdit names the statistics folder after it, so set it (e.g. to the "
                         "checkpoint's name) before editing")
    return name


def _templates(hparams: Any) -> list[str]:
    # PMET rewrites several modules per layer (rewrite_module_tmps) and reads a covariance for each
    templates = getattr(hparams, "rewrite_module_tmps", None) or [hparams.rewrite_module_tmp]
    return list(dict.fromkeys(templates))


def covariance_path(model: torch.nn.Module, hparams: Any, layer: int, *, module_template: str | None = None,
                    generation: Generation | None = None) -> Path:
    """Where EasyEdit's ``layer_stats`` looks for the statistics of `layer`'s rewritten module.

    ``{stats_dir}/{model folder}/{mom2_dataset}_stats/{module}_{mom2_dtype}_mom2_{mom2_n_samples}.npz``, the model
    folder named as `generation` (default: :func:`easyedit_generation` of `hparams`) does. `module_template`
    defaults to ``hparams.rewrite_module_tmp``.
    """
    _check_hparams(hparams)
    model_name = stats_model_name(model, generation or easyedit_generation(hparams))
    precision = hparams.mom2_dtype or "float64"
    size_suffix = "" if hparams.mom2_n_samples is None else f"_{hparams.mom2_n_samples}"
    module = (module_template or hparams.rewrite_module_tmp).format(layer)
    return Path(hparams.stats_dir) / f"{model_name}/{hparams.mom2_dataset}_stats/{module}_{precision}_mom2{size_suffix}.npz"


class _Stop(Exception):
    """Raised after the deepest hooked module ran: the rest of the forward pass is not needed."""


def precompute_covariance(model: torch.nn.Module, tok: Any, hparams: Any, texts: Sequence[str], *,
                          batch_size: int = 16, overwrite: bool = False,
                          generation: Generation | None = None) -> list[Path]:
    """Write, for every layer in ``hparams.layers`` (and every module template, for PMET's
    ``rewrite_module_tmps``), the uncentred second moment of the rewritten module's inputs over the tokens of
    `texts`, where EasyEdit's ``layer_stats`` will find it (see :func:`covariance_path`).

    One forward pass per batch serves all modules and stops after the deepest one. Texts are tokenized and
    truncated as ``layer_stats`` does. Existing files are kept unless `overwrite`. Returns the paths, in layer
    order (templates in hparams order within a layer).

    EasyEdit only accepts a file whose ``sample_size`` equals ``hparams.mom2_n_samples`` (its cache key), so that
    value is recorded whatever the number of texts; the number of token vectors is the stat's ``count`` and the number
    of texts is stored as ``n_texts``.
    """
    _check_hparams(hparams)
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts must be a non-empty sequence of non-empty strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    generation = generation or easyedit_generation(hparams)
    jobs = [(layer, template) for layer in sorted(set(hparams.layers)) for template in _templates(hparams)]
    paths = {job: covariance_path(model, hparams, job[0], module_template=job[1], generation=generation)
             for job in jobs}
    todo = [job for job in jobs if overwrite or not paths[job].exists()]
    if not todo:
        return [paths[job] for job in jobs]

    modules = {job: model.get_submodule(job[1].format(job[0])) for job in todo}
    names = {module: name for name, module in model.named_modules()}
    deepest = max(modules.values(), key=list(names).index)  # the last of them in the forward pass
    dtype = getattr(torch, hparams.mom2_dtype or "float64")
    max_len = _max_positions(model)
    device = next(model.parameters()).device
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts = dict.fromkeys(todo, 0)
    mask: torch.Tensor | None = None

    def collect(job: tuple[int, str]) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            keys = inputs[0].reshape(-1, inputs[0].shape[-1])[mask.reshape(-1)].to(torch.float64)
            if job in sums:
                sums[job].addmm_(keys.T, keys)
            else:
                sums[job] = keys.T @ keys
            counts[job] += keys.shape[0]
        return hook

    def stop(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        raise _Stop

    handles = [modules[job].register_forward_pre_hook(collect(job)) for job in todo]
    handles.append(deepest.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                encoded = [tok(text, truncation=True, max_length=max_len)["input_ids"]
                           for text in texts[start:start + batch_size]]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.zeros((len(encoded), width), dtype=torch.long)
                attention = torch.zeros((len(encoded), width), dtype=torch.long)
                for row, ids in enumerate(encoded):  # right padding, as layer_stats' collation
                    input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention[row, :len(ids)] = 1
                mask = attention.bool().to(device)
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()

    for job in todo:
        _save(paths[job], {
            # the state_dict of easyeditor's CombinedStat(mom2=SecondMoment()) plus tally's cache key
            "mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
            "mom2.count": np.array(counts[job]),
            "mom2.mom2": sums[job].to(dtype).cpu().numpy(),
            "sample_size": np.array(hparams.mom2_n_samples),
            "n_texts": np.array(len(texts)),
        })
    return [paths[job] for job in jobs]


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write via a temporary file, so that an interrupted run never leaves a truncated file easyeditor would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def statistics_dir() -> Path:
    """Where the plugin keeps the key covariance statistics it computes (a cache shared by runs)."""
    from ..models import cache_root

    return cache_root() / "stats"


def prepare_statistics(model: torch.nn.Module, tok: Any, hparams: Any, sentences: Sequence[str]) -> bool:
    """MEMIT (and ROME with mom2_adjustment) need key covariance statistics, which EasyEdit would download from the
    dataset hub: compute the missing ones from the reference corpus into statistics_dir(), and point `hparams` at
    it. Returns whether the method needs them (False: `hparams` is left as it is)."""
    if not (hparams.alg_name == "MEMIT" or getattr(hparams, "mom2_adjustment", False)):
        return False
    hparams.stats_dir = str(statistics_dir())
    missing = [layer for layer in hparams.layers if not covariance_path(model, hparams, layer).exists()]
    if missing:
        LOG.info("computing key covariance for layers %s from %d reference sentences", missing, len(sentences))
        precompute_covariance(model, tok, hparams, sentences)
    return True
