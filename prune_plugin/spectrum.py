"""Spectral figures of weight matrices: smax(W0) (computed once per matrix) and condition numbers."""
from __future__ import annotations

import torch

# Below this many elements a float64 singular-value pass is cheap (SmolLM2's 576x1536 takes ~0.1 s).
_DENSE_LIMIT = 4_000_000


def largest_singular_value(weight: torch.Tensor) -> float:
    """smax(W) in float64. Large matrices go through the Gram matrix of the smaller side (m^2 n, one eigvalsh):
    exact to float64 round-off for the largest value, and several times cheaper than a dense SVD."""
    w = weight.detach().to(torch.float64)
    if w.numel() <= _DENSE_LIMIT:
        return float(torch.linalg.svdvals(w)[0])
    gram = w @ w.mT if w.shape[0] <= w.shape[1] else w.mT @ w
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def condition_number(weight: torch.Tensor) -> float:
    """smax(W) / smin(W) over the min(m, n) singular values, in float64 (inf for a rank-deficient W)."""
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    smin = float(s[-1])
    return float(s[0]) / smin if smin > 0 else float("inf")


class SmaxCache:
    """smax(W0) per parameter name: the threshold PRUNE compares against never changes during a sequence."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    def get(self, name: str, original: torch.Tensor) -> float:
        if name not in self._values:
            self._values[name] = largest_singular_value(original)
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def clear(self) -> None:
        self._values.clear()
