"""Bit-exact copies of weights the plugin may change, and their restoration."""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Mapping

import torch


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """The parameter called `name`; a clear KeyError naming it (and the model class) if there is none."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise KeyError(f"{type(model).__name__} has no parameter {name!r}") from None


class OriginalWeights(Mapping[str, torch.Tensor]):
    """W0 for each recorded parameter, kept where the user chose (the parameter's device, or 'cpu').

    Copies are taken once, before the first edit touches a parameter, and never written to afterwards.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        self._device = torch.device(device) if device is not None else None
        self._copies: dict[str, torch.Tensor] = {}

    def record(self, model: torch.nn.Module, names: Iterable[str]) -> list[str]:
        """Copy the current value of each not-yet-recorded parameter; returns the names newly recorded."""
        new = []
        for name in names:
            if name in self._copies:
                continue
            param = get_parameter(model, name)
            copy = param.detach().to(self._device if self._device is not None else param.device, copy=True)
            self._copies[name] = copy
            new.append(name)
        return new

    def restore(self, model: torch.nn.Module, names: Iterable[str] | None = None) -> None:
        """Write W0 back into the model, bit for bit (same dtype, copied onto the parameter's device)."""
        with torch.no_grad():
            for name in self._copies if names is None else names:
                get_parameter(model, name).copy_(self._copies[name])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._copies.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._copies[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._copies)

    def __len__(self) -> int:
        return len(self._copies)


def snapshot(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the named parameters as they are now (used to roll one edit back)."""
    return {name: get_parameter(model, name).detach().clone() for name in names}


#: Elements per chunk of the on-device checksum: bounds its int64 temporaries to a few tens of MiB.
_CHUNK = 1 << 22


def fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """A cheap checksum of a tensor's bit pattern, to tell whether an edit touched a matrix since the last look
    without keeping a second copy of it.

    On the CPU: a SHA-1 digest of the raw bytes (read in place, no copy; about one memory pass), as two integers.
    On an accelerator: the integer sum of its words and a position-weighted sum, computed on the device chunk by
    chunk so that the int64 temporaries stay small.
    """
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cpu":
        raw = t.reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.sha1(memoryview(raw), usedforsecurity=False).digest()
        return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")
    return _device_checksum(t)


def _device_checksum(t: torch.Tensor) -> tuple[int, int]:
    size = t.element_size()
    words = t.reshape(-1).view(torch.uint8 if size == 1 else {2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    weighted = torch.zeros((), dtype=torch.int64, device=t.device)
    positions = torch.arange(1, min(_CHUNK, words.numel()) + 1, device=t.device, dtype=torch.int64)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start:start + _CHUNK].to(torch.int64)
        total += chunk.sum()
        weights = (positions[: chunk.numel()] + start) % 65521
        weighted += (chunk * weights).sum()
    return int(total), int(weighted)
