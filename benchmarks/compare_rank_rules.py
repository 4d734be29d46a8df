"""How far the two rank rules are from the float64 reference on a real matrix (not part of benchmarks.run).

The embedded SmolLM2-135M's layer-6 down_proj (its real W0, stored in each dtype) gets sums of 1 or 10 rank-one
ROME-shaped updates (3 x smax(W0) each); both rules restrain it, and the relative error of the restrained W against
the float64 exact reference (F on the whole spectrum of the stored dW) is printed next to the dtype's own rounding
of that reference.

    OMP_NUM_THREADS=1 python -m benchmarks.compare_rank_rules
"""
from __future__ import annotations

import math
import sys
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from prune_plugin.models import load_model
    from prune_plugin.restraint import restrain_dense_reference, restrain_parameter
    from prune_plugin.spectrum import largest_singular_value

    model, _ = load_model(None)
    w0_32 = model.get_parameter("model.layers.6.mlp.down_proj.weight").detach().clone()
    m, n = w0_32.shape
    g = torch.Generator().manual_seed(0)
    for dtype in [torch.float32, torch.bfloat16, torch.float16, torch.float64]:
        w0 = w0_32.to(dtype)
        smax0 = largest_singular_value(w0)
        for edits in [1, 10]:
            d = sum(3 * smax0 * torch.outer(torch.randn(m, generator=g, dtype=torch.float64) / math.sqrt(m),
                                            torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n))
                    for _ in range(edits))
            w = (w0.double() + d).to(dtype)
            ref = w0.double() + restrain_dense_reference(w.double() - w0.double(), smax0, math.e, never_enlarge=True,
                                                         rank_rule="exact")
            out = {}
            for rule in ["exact", "official"]:
                x = w.clone()
                fig, _ = restrain_parameter(x, w0, smax0, math.e, rank_rule=rule)
                out[rule] = (float((x.double() - ref).norm() / ref.norm()), fig.rank)
            rounding = float((ref.to(dtype).double() - ref).norm() / ref.norm())
            print(f"{str(dtype):15s} edits={edits:2d} smax0={smax0:.3f} rel err vs f64 exact ref: exact "
                  f"{out['exact'][0]:.2e} official {out['official'][0]:.2e} (official rank {out['official'][1]}); "
                  f"dtype rounding of ref {rounding:.2e}", flush=True)


if __name__ == "__main__":
    main()
