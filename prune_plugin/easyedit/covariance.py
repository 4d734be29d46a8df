"""Covariance statistics for the packaged EasyEdit's MEMIT (and ROME with ``mom2_adjustment``), from local texts.

easyeditor's ``layer_stats`` looks for a cached ``.npz`` of the second moment E[k kᵀ] of the keys (the inputs of the
rewritten module) and, when it is missing, downloads Wikipedia through the dataset hub. This module writes that file
from a corpus you supply, at the path and with the keys ``layer_stats`` reads, so no hub is needed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["covariance_path", "precompute_covariance"]

_REQUIRED = ("stats_dir", "mom2_dataset", "mom2_n_samples", "mom2_dtype", "rewrite_module_tmp", "layers")


def _check_hparams(hparams: Any) -> None:
    missing = [key for key in _REQUIRED if not hasattr(hparams, key)]
    if missing:
        raise ValueError(f"{getattr(hparams, 'alg_name', type(hparams).__name__)} hparams have no {missing}: only "
                         "methods with covariance statistics (MEMIT, ROME) use precompute_covariance")


def _max_positions(model: torch.nn.Module) -> int:
    # the same order of config fields as layer_stats, which truncates every text to this length
    for key in ("n_positions", "max_sequence_length", "max_position_embeddings"):
        if hasattr(model.config, key):
            return int(getattr(model.config, key))
    raise ValueError(f"{type(model.config).__name__} names no maximum sequence length")


def covariance_path(model: torch.nn.Module, hparams: Any, layer: int) -> Path:
    """Where easyeditor's ``layer_stats`` looks for the statistics of `layer`'s rewritten module.

    ``{stats_dir}/{config._name_or_path with / as _}/{mom2_dataset}_stats/{module}_{mom2_dtype}_mom2_{mom2_n_samples}.npz``
    """
    _check_hparams(hparams)
    model_name = model.config._name_or_path.replace("/", "_")
    if not model_name:
        # layer_stats would join "/{dataset}_stats/..." onto stats_dir, i.e. look in the filesystem root
        raise ValueError("model.config._name_or_path is empty; easyeditor names the statistics file after it, so set "
                         "it (e.g. to the checkpoint's name) before editing")
    precision = hparams.mom2_dtype or "float64"
    size_suffix = "" if hparams.mom2_n_samples is None else f"_{hparams.mom2_n_samples}"
    module = hparams.rewrite_module_tmp.format(layer)
    return Path(hparams.stats_dir) / f"{model_name}/{hparams.mom2_dataset}_stats/{module}_{precision}_mom2{size_suffix}.npz"


class _Stop(Exception):
    """Raised after the deepest hooked module ran: the rest of the forward pass is not needed."""


def precompute_covariance(model: torch.nn.Module, tok: Any, hparams: Any, texts: Sequence[str], *,
                          batch_size: int = 16, overwrite: bool = False) -> list[Path]:
    """Write, for every layer in ``hparams.layers``, the uncentred second moment of the inputs of
    ``rewrite_module_tmp`` over the tokens of `texts`, where easyeditor's MEMIT/ROME will find it.

    One forward pass per batch serves all layers and stops after the deepest one. Texts are tokenized and truncated
    as ``layer_stats`` does. Existing files are kept unless `overwrite`. Returns the paths, in layer order.

    easyeditor only accepts a file whose ``sample_size`` equals ``hparams.mom2_n_samples`` (its cache key), so that
    value is recorded whatever the number of texts; the number of token vectors is the stat's ``count`` and the number
    of texts is stored as ``n_texts``.
    """
    _check_hparams(hparams)
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts must be a non-empty sequence of non-empty strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    layers = sorted(set(hparams.layers))
    paths = {layer: covariance_path(model, hparams, layer) for layer in layers}
    todo = [layer for layer in layers if overwrite or not paths[layer].exists()]
    if not todo:
        return [paths[layer] for layer in layers]

    modules = {layer: model.get_submodule(hparams.rewrite_module_tmp.format(layer)) for layer in todo}
    dtype = getattr(torch, hparams.mom2_dtype or "float64")
    max_len = _max_positions(model)
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    counts = dict.fromkeys(todo, 0)
    mask: torch.Tensor | None = None

    def collect(layer: int) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            keys = inputs[0].reshape(-1, inputs[0].shape[-1])[mask.reshape(-1)].to(torch.float64)
            if layer in sums:
                sums[layer].addmm_(keys.T, keys)
            else:
                sums[layer] = keys.T @ keys
            counts[layer] += keys.shape[0]
        return hook

    def stop(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        raise _Stop

    handles = [modules[layer].register_forward_pre_hook(collect(layer)) for layer in todo]
    handles.append(modules[todo[-1]].register_forward_hook(stop))
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

    for layer in todo:
        _save(paths[layer], {
            # the state_dict of easyeditor's CombinedStat(mom2=SecondMoment()) plus tally's cache key
            "mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
            "mom2.count": np.array(counts[layer]),
            "mom2.mom2": sums[layer].to(dtype).cpu().numpy(),
            "sample_size": np.array(hparams.mom2_n_samples),
            "n_texts": np.array(len(texts)),
        })
    return [paths[layer] for layer in layers]


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
