"""Shared helpers of the benchmark suite: thread setup, timing, synthetic matrices, tables.

Nothing here knows a result in advance: every number a benchmark prints is measured in the same run.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pin_threads(threads: int | None) -> int:
    """Fix the BLAS/OpenMP thread count. Must run before torch/numpy are imported to reach numpy's OpenBLAS.

    With threads=None the existing OMP_NUM_THREADS is kept (and copied to the MKL/OpenBLAS variables), or
    1 is used when it is unset, so that a run never silently uses every core of a shared machine.
    """
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    return threads


def machine_summary() -> dict[str, Any]:
    import numpy
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# -- timing ------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock seconds of `repeats` measured runs (after `warmup` unmeasured ones)."""

    samples: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median of the measured runs: how noisy the machine was."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0

    def __str__(self) -> str:
        return fmt_seconds(self.median)


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, setup: Callable[[], Any] | None = None,
          collect: bool = False) -> tuple[Timing, Any]:
    """Median-able timing of fn(): `warmup` unmeasured calls, then `repeats` measured ones.

    `setup` runs (untimed) before every call, e.g. to put the edited weights back; `collect` runs the garbage
    collector there too (worth it for big tensors, a waste of ~0.2 s per call for small ones). Returns (timing,
    last result).
    """
    result = None
    timing = Timing(warmup=warmup)
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if collect:
            gc.collect()
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            timing.samples.append(elapsed)
    return timing, result


def paired_ratio(a: Callable[[], Any], b: Callable[[], Any], *, pairs: int, setup_a: Callable[[], Any] | None = None,
                 setup_b: Callable[[], Any] | None = None, collect: bool = False) -> tuple[float, Timing, Timing]:
    """(median of the per-pair ratios a / b, a's timing, b's timing) over `pairs` interleaved calls a, b, a, b, ...
    (each after its own untimed setup). Load and the order of timed blocks then hit both sides alike, so the
    ratio of two calls of tens of milliseconds holds still where two separate timed blocks' medians do not."""
    ta, tb = Timing(), Timing()
    for fn, setup, timing in [(a, setup_a, ta), (b, setup_b, tb)] * pairs:
        if setup is not None:
            setup()
        if collect:
            gc.collect()
        t0 = time.perf_counter()
        fn()
        timing.samples.append(time.perf_counter() - t0)
    return statistics.median(x / y for x, y in zip(ta.samples, tb.samples)), ta, tb


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(r: float | None) -> str:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "-"
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


# -- tables ------------------------------------------------------------------------------------------------------
def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    """Print (and return) a GitHub-markdown table, so the output can be pasted into docs/benchmarks.md."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


# -- synthetic weights ---------------------------------------------------------------------------------------------
#: The edited-matrix shapes the per-matrix benchmarks (restraint, spectrum, condition, memory) measure.
MATRIX_SHAPES = [
    ("SmolLM2-135M down_proj", 576, 1536),
    ("GPT-2 XL c_proj", 6400, 1600),
    ("Llama-2-7B down_proj", 4096, 11008),
]


def make_original(m: int, n: int, *, smax: float = 12.0, spikes: int = 4, seed: int = 0):
    """A float32 W0 with the shape of a trained down-projection's spectrum: a Gaussian bulk (the Marchenko-Pastur
    edge at about smax/2) plus `spikes` outlier directions, the largest at about `smax`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bulk_edge = 0.5 * smax
    sigma = bulk_edge / (math.sqrt(m) + math.sqrt(n))
    w0 = torch.randn(m, n, generator=g, dtype=torch.float32).mul_(sigma)
    if spikes:
        a = torch.randn(m, spikes, generator=g, dtype=torch.float32)
        b = torch.randn(spikes, n, generator=g, dtype=torch.float32)
        a /= a.norm(dim=0, keepdim=True)
        b /= b.norm(dim=1, keepdim=True)
        strength = torch.linspace(smax * 0.85, smax * 0.55, spikes, dtype=torch.float32)
        w0.addmm_(a * strength, b)
    return w0


def make_update(m: int, n: int, rank: int, smax0: float, *, seed: int = 1):
    """dW = sum of `rank` rank-one updates c_i a_i b_i^T (unit a_i, b_i), float64.

    Strengths are log-spaced from 6 down to 0.3 x smax(W0) (3 x smax(W0) for a single update), so that a good share
    of dW's singular values lie above smax(W0) and the restraint really acts, and some lie below it and must be
    left alone.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, n, generator=g, dtype=torch.float64)
    a /= a.norm(dim=0, keepdim=True)
    b /= b.norm(dim=1, keepdim=True)
    if rank == 1:
        strength = torch.tensor([3.0 * smax0], dtype=torch.float64)
    else:
        strength = smax0 * torch.logspace(math.log10(6.0), math.log10(0.3), rank, dtype=torch.float64)
    return (a * strength) @ b


def make_full_rank_update(m: int, n: int, spikes: int, smax0: float, *, bulk: float = 0.5, seed: int = 1):
    """A full-rank dW as fine-tuning leaves it: a Gaussian bulk whose largest singular value is about
    `bulk` x smax(W0), plus `spikes` orthonormal directions with strengths log-spaced from 6 down to 1.2 x smax(W0):
    exactly `spikes` singular values reach smax(W0). float64."""
    import torch

    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(m, n, generator=g, dtype=torch.float64).mul_(bulk * smax0 / (math.sqrt(m) + math.sqrt(n)))
    a = torch.linalg.qr(torch.randn(m, spikes, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(n, spikes, generator=g, dtype=torch.float64))[0]
    strength = smax0 * torch.logspace(math.log10(6.0), math.log10(1.2), spikes, dtype=torch.float64)
    return delta.addmm_(a * strength, b.mT)


def make_case(m: int, n: int, rank: int, *, seed: int = 0, smax: float = 12.0):
    """(W0, W) in float32: W = W0 + dW rounded to float32, as an editor leaves it in a float32 model."""
    import torch

    w0 = make_original(m, n, smax=smax, seed=seed)
    from prune_plugin.spectrum import largest_singular_value

    smax0 = largest_singular_value(w0)
    delta = make_update(m, n, rank, smax0, seed=seed + 1)
    w = delta.add_(w0).to(torch.float32)
    del delta
    return w0, w, smax0


def relative_difference(a, b) -> float:
    """||a - b||_F / ||b||_F in float64 (numpy arrays or torch tensors)."""
    import torch

    a = torch.as_tensor(a).to(torch.float64)
    b = torch.as_tensor(b).to(torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def one_matrix_model(w0):
    """A module whose only parameter `weight` starts as W0 (what an EditSession needs to hold one target)."""
    import torch

    model = torch.nn.utils.skip_init(torch.nn.Linear, w0.shape[1], w0.shape[0], bias=False, dtype=w0.dtype)
    with torch.no_grad():
        model.weight.copy_(w0)
    return model


def previous_edit_state(session, rank: int | None = None, name: str = "weight") -> None:
    """What the previous edit of an online run leaves for this restraint, when a benchmark restrains the same W
    again: the basis the last restraint kept, less its last column (the direction a new edit adds, which the
    first block's fresh columns must catch, instead of a start that already spans all of dW), and with `rank`
    the rank hint rank - 1 (no basis at all for rank 1, as on an online run's first restraint)."""
    if rank is not None:
        session.rank_hints[name] = rank - 1
    basis = session.bases.pop(name, None)
    keep = (basis.shape[1] if basis is not None else 0) - 1 if rank is None else rank - 1
    if basis is not None and keep > 0:
        session.bases[name] = basis[:, :min(keep, basis.shape[1])]


def select_shapes(shapes, wanted: Sequence[str] | None):
    """The (label, m, n) entries whose 'MxN' is in `wanted` (all of them when nothing is wanted)."""
    if not wanted:
        return shapes
    chosen = [s for s in shapes if f"{s[1]}x{s[2]}" in wanted]
    if not chosen:
        raise SystemExit(f"--shape {wanted}: none of {[f'{s[1]}x{s[2]}' for s in shapes]}")
    return chosen


# -- memory ------------------------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
    return values


class PeakRSS:
    """Peak extra resident memory of a block of code: the kernel's high-water mark (VmHWM) is reset to the current
    RSS on entry (write '5' to /proc/self/clear_refs, Linux >= 4.0) and read on exit, so peak_extra = HWM - RSS at
    entry. It sees every allocation (torch, numpy, LAPACK workspaces), which tracemalloc does not. `available` is
    False where the reset is not permitted; peak_extra is then None."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.available = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = _proc_status()["VmRSS"]
        except OSError:
            self.available = False
            self.before = 0
        self.peak_extra = None
        self.retained = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            status = _proc_status()
            self.peak_extra = status["VmHWM"] - self.before
            self.retained = status["VmRSS"] - self.before
