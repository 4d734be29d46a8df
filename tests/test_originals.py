"""W0 bookkeeping: fingerprints that tell a changed weight from an unchanged one without a copy."""
import torch

from prune_plugin.originals import fingerprint


def test_fingerprint_sees_any_single_bit_and_ignores_copies():
    w = torch.randn(64, 96)
    base = fingerprint(w)
    assert fingerprint(w.clone()) == base and fingerprint(w.t().contiguous().t()) == base
    flipped = w.clone()
    flipped.view(torch.int32)[10, 20] ^= 1
    assert fingerprint(flipped) != base
    swapped = w.clone()
    swapped[0, 0], swapped[0, 1] = w[0, 1].item(), w[0, 0].item()
    assert fingerprint(swapped) != base
    assert fingerprint(w.bfloat16()) != fingerprint(w.bfloat16().clone().fill_(0))
