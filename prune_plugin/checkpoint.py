"""Checkpoints of a sequential editing run: the edited matrices after n edits, and a manifest that says what they are.

A checkpoint is one folder, ``<dir>/edit-000025/``:

* ``matrices.safetensors`` -- the current value of every edited (target) matrix, in its own dtype. Never the whole
  model: W0 comes from the base model, which the manifest identifies by a checksum of each target's W0.
* ``manifest.json`` -- the edit count, the requests applied so far, the hparams, the model's identity, the state a
  resumed run needs to continue bit for bit (seed, the method's cached context templates, restraint rank hints) and
  a SHA-256 per file.
* ``bases.safetensors`` (when the restraint kept any) -- per matrix, the basis its last restraint captured of dW
  (float32, m x rank), where the next restraint starts: also state a resumed run needs to continue bit for bit.

The folder is written under a temporary name and renamed into place once complete, so a run killed mid-write leaves
only a ``.partial`` folder, which is never loaded. A file whose checksum does not match its manifest is refused.

Framework-agnostic: this module knows tensors, folders and JSON, nothing of EasyEdit or of the plugins.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .hashing import sha256_file

LOG = logging.getLogger("prune_plugin")

FORMAT = "prune-plugin-checkpoint"
VERSION = 1
MATRICES = "matrices.safetensors"
BASES = "bases.safetensors"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^edit-(\d{6,})$")
PARTIAL = ".partial"


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt, or not one; the message names the folder and the file."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another model, other hparams or other requests; the message names the mismatch."""


@dataclass
class Checkpoint:
    """A verified checkpoint: where it is, its manifest, and (once loaded) its matrices on the CPU."""

    path: Path
    manifest: dict[str, Any]

    @property
    def edits(self) -> int:
        return int(self.manifest["edits"])

    @property
    def requests(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("requests", []))

    @property
    def state(self) -> dict[str, Any]:
        return dict(self.manifest.get("state", {}))

    def matrices(self) -> dict[str, torch.Tensor]:
        """The saved matrices (read from disk each call: holding them is the caller's choice)."""
        from safetensors.torch import load_file

        return load_file(str(self.path / MATRICES))

    def bases(self) -> dict[str, torch.Tensor]:
        """The restraint's start bases saved with the matrices (empty for a checkpoint written without any)."""
        from safetensors.torch import load_file

        return load_file(str(self.path / BASES)) if BASES in self.manifest.get("files", {}) else {}


def folder_name(edits: int) -> str:
    return f"edit-{edits:06d}"


def parse_schedule(value: Any) -> tuple[list[int], int | None]:
    """`prune_checkpoint_at`: a list of edit counts (``[25, 50, 100]``) or an interval (``25``, or ``every: 25``).

    Returns (sorted counts, interval or None). Counts are positive integers; 0 is allowed in a list and means
    nothing to write (the unedited model is the base model itself)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a list of edit counts or an interval, got {value!r}")
    if isinstance(value, dict) and set(value) == {"every"}:
        value = value["every"]
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"an interval must be a positive integer, got {value!r}")
        return [], value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if any(v < 0 for v in value):
            raise ValueError(f"edit counts must be >= 0, got {list(value)!r}")
        return sorted(set(value)), None
    raise ValueError(f"must be a list of edit counts (e.g. [25, 50, 100]) or an interval (e.g. 25), got {value!r}")


def is_due(edits: int, counts: Sequence[int], interval: int | None) -> bool:
    """Whether a checkpoint is written after `edits` edits under the schedule."""
    return edits > 0 and (edits in counts or (interval is not None and edits % interval == 0))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape included), whatever its device: the identity of a W0."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """A JSON-representable copy (tuples as lists, anything else unknown as its repr-free str)."""
    return json.loads(json.dumps(value, default=str))


def write_checkpoint(directory: str | os.PathLike, edits: int, matrices: Mapping[str, torch.Tensor],
                     manifest: Mapping[str, Any], bases: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write `matrices` (name -> tensor), `bases` (the restraint's start bases, if any) and `manifest` as
    ``<directory>/edit-<edits>/``, atomically.

    The manifest gets the format, the edit count, the matrices' dtypes and shapes, and the files' checksums added.
    An existing checkpoint of the same count is replaced only once the new one is complete."""
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(edits)
    partial = root / f".{final.name}{PARTIAL}-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in matrices.items()}
        save_file(tensors, str(partial / MATRICES))
        _fsync(partial / MATRICES)
        files = [MATRICES]
        if bases:
            save_file({name: b.detach().to("cpu").contiguous() for name, b in bases.items()}, str(partial / BASES))
            _fsync(partial / BASES)
            files.append(BASES)
        body = {
            **json_safe(dict(manifest)), "format": FORMAT, "version": VERSION, "edits": edits,
            "matrices": {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                         for n, t in tensors.items()},
            "files": {f: {"sha256": sha256_file(partial / f), "bytes": (partial / f).stat().st_size} for f in files},
            "written": time.time(),
        }
        (partial / MANIFEST).write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        _fsync(partial / MANIFEST)
        if final.exists():  # same count written again (a resumed run): swap only once the new one is complete
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """The checkpoint in folder `path` (or the latest complete one when `path` is a checkpoint directory), with
    every file checked against the manifest's checksum. Raises CheckpointError naming what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if PARTIAL in folder.name:
        raise CheckpointError(f"{folder}: an incomplete checkpoint (the run was interrupted while writing it)")
    if not (folder / MANIFEST).exists() and not _NAME.match(folder.name):
        latest = latest_checkpoint(folder)
        if latest is None:
            raise CheckpointError(f"{folder}: holds no complete checkpoint (edit-NNNNNN folders with a manifest)")
        return latest
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint is incomplete and is not loaded")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_path}: format version {manifest.get('version')!r}, this plugin reads {VERSION}")
    for key in ("edits", "files", "matrices", "model"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path}: no {key!r} entry")
    if verify:
        for name, entry in manifest["files"].items():
            file = folder / name
            if not file.exists():
                raise CheckpointError(f"{file}: missing (named in {manifest_path})")
            if file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
                raise CheckpointError(f"{file}: corrupt (size or SHA-256 differs from {manifest_path}); not loaded")
    return Checkpoint(folder, manifest)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint folders in `directory` by edit count (complete-looking names only; partial ones are skipped)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The complete, intact checkpoint with the most edits; corrupt or incomplete ones are skipped with a warning."""
    for folder in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as err:
            LOG.warning("skipping checkpoint: %s", err)
    return None


def model_identity(model: torch.nn.Module, targets: Iterable[str], source: str | None = None,
                   originals: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """What the checkpoint's matrices are relative to: the model's class and name, and a SHA-256 of each target's W0
    (`originals`, or the model's current weights). `source` is how to load the base model again (None: the
    embedded default)."""
    config = getattr(model, "config", None)
    w0 = originals if originals is not None else {n: model.get_parameter(n) for n in targets}
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None),
        "source": source,
        "originals_sha256": {n: tensor_sha256(w0[n]) for n in targets},
    }


def check_model(checkpoint: Checkpoint, originals: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise CheckpointMismatchError unless the checkpoint was written for this model: same targets, same W0."""
    saved = checkpoint.manifest["model"]
    where = checkpoint.path / MANIFEST
    if saved.get("class") != type(model).__name__:
        raise CheckpointMismatchError(
            f"{where}: written for a {saved.get('class')} model ({saved.get('name_or_path')}), not this "
            f"{type(model).__name__}")
    want = saved.get("originals_sha256", {})
    if set(want) != set(originals):
        raise CheckpointMismatchError(f"{where}: edited matrices {sorted(want)}, this run edits {sorted(originals)}")
    for name, digest in want.items():
        if tensor_sha256(originals[name]) != digest:
            raise CheckpointMismatchError(
                f"{where}: written for another model: W0 of {name} differs (checkpoint model "
                f"{saved.get('name_or_path')!r}, this one {getattr(getattr(model, 'config', None), '_name_or_path', None)!r})")


def check_settings(checkpoint: Checkpoint, hparams: Mapping[str, Any], ignore: Iterable[str] = ()) -> None:
    """Raise CheckpointMismatchError naming the first hparams key whose value differs from the checkpoint's."""
    saved = checkpoint.manifest.get("hparams", {})
    now = json_safe(dict(hparams))
    skip = set(ignore)
    for key in sorted(set(saved) | set(now)):
        if key in skip:
            continue
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            raise CheckpointMismatchError(
                f"{checkpoint.path / MANIFEST}: written with other hparams: {key} was {saved.get(key, '<absent>')!r}, "
                f"now {now.get(key, '<absent>')!r}")


def check_requests(checkpoint: Checkpoint, requests: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Raise CheckpointMismatchError unless `requests` start with the checkpoint's applied requests (by `keys`)."""
    applied = checkpoint.requests
    where = checkpoint.path / MANIFEST
    if len(requests) < len(applied):
        raise CheckpointMismatchError(f"{where}: {len(applied)} requests applied, but this run has only {len(requests)}")
    for index, (done, want) in enumerate(zip(applied, requests)):
        for key in keys:
            if done.get(key) != want.get(key):
                raise CheckpointMismatchError(
                    f"{where}: request {index} differs: {key} was {done.get(key)!r}, now {want.get(key)!r}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
