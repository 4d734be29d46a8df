"""Bit-exact copies of weights the plugin may change, and their restoration."""
from __future__ import annotations

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


def unchanged(model: torch.nn.Module, reference: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose parameter still equals the reference bit for bit."""
    return [n for n, ref in reference.items() if torch.equal(get_parameter(model, n).detach().to(ref.device), ref)]


def fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """A cheap checksum of a tensor's bit pattern: the integer sum of its words and a position-weighted sum.

    Tells whether an edit touched a matrix since the last look without keeping a second copy of it.
    """
    t = tensor.detach().contiguous()
    words = t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    flat = words.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) % 65521
    return int(flat.sum()), int((flat * weights).sum())
