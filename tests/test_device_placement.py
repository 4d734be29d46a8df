"""Where the restraint runs: on each weight's own device, in float64, written back in the weight's dtype.

No accelerator is lent to this project's test machines, so a second and third device are emulated: `OnDevice`
is a tensor that claims to live on "lazy:0" or "lazy:1" while its data sit in an ordinary CPU tensor. (A CPU-only
torch build registers a no-op device guard for the `lazy` type, so tensors may claim it; the only other such type
is `meta`, which the plugin rightly treats as "values not present".) `EmulatedDevices`, a TorchDispatchMode, sees
every aten operation and

* runs it on the CPU data, the result claiming the device of the inputs (factory calls such as torch.randn(...,
  device=...) land on the device they name);
* raises, as CUDA does, when one operation mixes tensors of different devices (0-dim host scalars excepted);
* records each copy between devices (`.to(...)`, `copy_`) with the dtype that actually crosses: PyTorch's blocking
  copies convert dtypes on the host side (aten/src/ATen/native/cuda/Copy.cu, copy_kernel_cuda), so the bytes that
  move are always in the device-side tensor's dtype;
* records each operation with the device it ran on and its input dtypes.

A model "sharded" over lazy:0, lazy:1 and the CPU (what accelerate's device_map does across GPUs) must be
restrained exactly as the same model on one device, and the records show that nothing else crossed. The only
stand-in is the random generator: a CPU build cannot create an accelerator generator, so the restraint's request
for one on the matrix's device is recorded and served by a CPU generator with the same seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from prune_plugin.config import PruneConfig
from prune_plugin.originals import fingerprint
from prune_plugin.plugins import edit_session
from prune_plugin.session import EditSession
from prune_plugin.testing import tiny_llama

EMULATED_TYPE = "lazy"
DEV0, DEV1 = torch.device(EMULATED_TYPE, 0), torch.device(EMULATED_TYPE, 1)
aten = torch.ops.aten

# Three matrices of different shapes: 32 x 64, 64 x 32 and 32 x 32 in tiny_llama.
DOWN = "model.layers.1.mlp.down_proj.weight"
UP = "model.layers.2.mlp.up_proj.weight"
O_PROJ = "model.layers.3.self_attn.o_proj.weight"
TARGETS = [DOWN, UP, O_PROJ]
SHARDED = {DOWN: DEV0, UP: DEV1, O_PROJ: torch.device("cpu")}
HOST_GENERATOR = torch.Generator  # the real class, for the editor's own random numbers
LINALG = ("linalg_qr", "linalg_svd", "linalg_eigh", "linalg_svdvals", "linalg_vector_norm", "mm", "addmm", "matmul")


# ------------------------------------------------------------------------------------------ emulated devices
class OnDevice(torch.Tensor):
    """CPU data (`.inner`) presented as a tensor on an emulated device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=device, requires_grad=inner.requires_grad)
        wrapper.inner = inner
        return wrapper

    def __repr__(self) -> str:
        return f"OnDevice({self.device}, {self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, None)  # outside an EmulatedDevices block: same rules, no records


@dataclass(frozen=True)
class Transfer:
    source: str
    target: str
    dtype: torch.dtype  # the dtype of the bytes that cross
    numel: int
    converted_on_host: bool


@dataclass(frozen=True)
class Op:
    name: str
    device: str
    dtypes: tuple
    numel: int  # of its largest tensor input


@dataclass
class EmulatedDevices(TorchDispatchMode):
    transfers: list[Transfer] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, self)


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, OnDevice) else torch.device("cpu")


def _emulated(device) -> bool:
    return device is not None and torch.device(device).type == EMULATED_TYPE


def _run(func, args, kwargs, log: EmulatedDevices | None):
    flat, spec = tree_flatten((args, kwargs))
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    plain_args, plain_kwargs = tree_unflatten([x.inner if isinstance(x, OnDevice) else x for x in flat], spec)
    target = kwargs.get("device")
    if _emulated(target):
        plain_kwargs["device"] = torch.device("cpu")

    if func in (aten._to_copy.default, aten.copy_.default):
        if func is aten._to_copy.default:
            src = args[0]
            dst_device = torch.device(target) if target is not None else _device_of(src)
            out = func(*plain_args, **plain_kwargs)
            result = OnDevice(out, dst_device) if _emulated(dst_device) else out
            dst_dtype = out.dtype
        else:
            dst, src = args[0], args[1]
            dst_device = _device_of(dst)
            func(*plain_args, **plain_kwargs)
            result, dst_dtype = dst, dst.dtype
        src_device = _device_of(src)
        if src_device != dst_device and log is not None:
            device_side = dst_dtype if dst_device.type != "cpu" else src.dtype
            log.transfers.append(Transfer(str(src_device), str(dst_device), device_side, src.numel(),
                                          src.dtype != dst_dtype))
        return result

    devices = {_device_of(t) for t in tensors if isinstance(t, OnDevice) or t.dim() > 0}
    if target is not None:
        devices.add(torch.device(target))
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but {func} got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    out = func(*plain_args, **plain_kwargs)
    if log is not None and tensors:
        log.ops.append(Op(str(func).split(".")[1] if str(func).startswith("aten.") else str(func), str(device),
                          tuple(t.dtype for t in tensors), max(t.numel() for t in tensors)))
    if not _emulated(device):
        return out
    same = {id(x.inner): x for x in tensors if isinstance(x, OnDevice)}  # in-place ops return their input

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        return same[id(x)] if id(x) in same else OnDevice(x, device)

    out_flat, out_spec = tree_flatten(out)
    return tree_unflatten([wrap(x) for x in out_flat], out_spec)


@pytest.fixture
def generator_requests(monkeypatch) -> list[torch.device]:
    """torch.Generator(device=<emulated>) is served by a CPU generator; the requested devices are recorded.

    (The dispatcher hands a mode a new Python object for the same generator, so the emulation cannot tell which
    device a generator passed to an operation was made for; the tests check the requests instead.)"""
    real = torch.Generator
    requested: list[torch.device] = []

    def generator(device="cpu"):
        requested.append(torch.device(device))
        return real(device="cpu") if _emulated(device) else real(device=device)

    monkeypatch.setattr(torch, "Generator", generator)
    return requested


def place(model: torch.nn.Module, placement: dict[str, torch.device]) -> torch.nn.Module:
    """Move single parameters, as a device_map moves whole layers."""
    for name, device in placement.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        data = getattr(module, attr).detach().clone()
        value = OnDevice(data, device) if _emulated(device) else data
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    return model


def host_copy(param: torch.Tensor) -> torch.Tensor:
    return (param.inner if isinstance(param, OnDevice) else param).detach().clone()


def edit(model, name: str, seed: int, *, full_rank: bool = False, strength: float = 40.0) -> None:
    """A rank-one edit (what ROME writes), or a dense random one; computed on the host, added on the device
    (outside the recorded blocks: the editor's traffic is not the plugin's)."""
    g = HOST_GENERATOR().manual_seed(seed)
    w = model.get_parameter(name)
    m, n = w.shape
    if full_rank:
        update = strength * torch.randn(m, n, generator=g) / (m * n) ** 0.5
    else:
        u, v = torch.randn(m, generator=g), torch.randn(n, generator=g)
        update = strength * torch.outer(u / u.norm(), v / v.norm())
    with torch.no_grad():
        update = update.to(w.dtype)
        w.add_(OnDevice(update, w.device) if isinstance(w, OnDevice) else update)


def edit_sequence(model, session: EditSession, steps: int = 3, log: EmulatedDevices | None = None) -> None:
    """`steps` edits of every target; with `log`, the session's own work (not the editor's) is recorded."""
    log = log if log is not None else EmulatedDevices()
    for step in range(steps):
        with log:
            session.before_edit()
        for j, name in enumerate(TARGETS):
            edit(model, name, seed=10 * step + j, full_rank=name == O_PROJ)
        with log:
            session.after_edit({"prompt": f"edit {step}"})
    with log:
        session.end()


def run(model, **config) -> tuple[EditSession, EmulatedDevices]:
    session = edit_session(model, PruneConfig(prune=True, **config), TARGETS)
    log = EmulatedDevices()
    edit_sequence(model, session, log=log)
    return session, log


def assert_equal_to_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to within one unit in the last place (of the dtype) of the matrix's largest entry.

    The emulated and the reference run use the same kernels on the same values, and come out bit for bit equal in
    practice; LAPACK may still round differently for differently aligned buffers, and a float64 last-bit
    difference can flip one rounding to the storage dtype. NaN fails.
    """
    assert actual.dtype == expected.dtype
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0,
                               atol=eps * float(expected.double().abs().max()))


def same_figures(a, b) -> bool:
    """Telemetry figures agree: integers and paths exactly, floats to 1e-12 relative (timings ignored)."""
    x, y = dataclasses.asdict(a), dataclasses.asdict(b)
    for key in x.keys() - {"seconds"}:
        if isinstance(x[key], float):
            if not x[key] == pytest.approx(y[key], rel=1e-12, abs=0.0):
                return False
        elif x[key] != y[key]:
            return False
    return True


# ----------------------------------------------------------------------------------------------------- tests
def test_the_emulated_devices_refuse_mixed_operations_and_record_what_crosses():
    """The emulation itself: the checks below rely on it failing where a real accelerator would."""
    a = OnDevice(torch.ones(2, 3), DEV0)
    with EmulatedDevices() as log:
        with pytest.raises(RuntimeError, match="same device"):
            a + OnDevice(torch.ones(2, 3), DEV1)
        with pytest.raises(RuntimeError, match="same device"):
            a + torch.ones(2, 3)
        b = a * torch.tensor(2.0)  # a 0-dim host scalar is allowed, as on CUDA
        back = b.to("cpu", torch.float64)
        there = torch.zeros(3, dtype=torch.bfloat16).to(DEV1, torch.float64)
        made = torch.randn(4, device=DEV1)
    assert b.device == DEV0 and torch.equal(b.inner, torch.full((2, 3), 2.0))
    assert back.device.type == "cpu" and there.device == DEV1 and made.device == DEV1
    assert log.transfers == [Transfer("lazy:0", "cpu", torch.float32, 6, True),
                             Transfer("cpu", "lazy:1", torch.float64, 3, True)]


@pytest.mark.parametrize("originals", ["same", "cpu"])
@pytest.mark.parametrize("mode", ["online", "final"])
def test_a_sharded_model_is_restrained_exactly_as_on_one_device(mode, originals, generator_requests):
    reference, _ = tiny_llama()
    ref_session = edit_session(reference, PruneConfig(prune=True, prune_mode=mode), TARGETS)
    edit_sequence(reference, ref_session)

    sharded = place(tiny_llama()[0], SHARDED)
    session, _ = run(sharded, prune_mode=mode, prune_originals_device=originals)

    figures = session.last_restraint if mode == "final" else session.steps[-1].figures
    ref_figures = ref_session.last_restraint if mode == "final" else ref_session.steps[-1].figures
    assert {f.path for f in ref_figures.values()} == {"lowrank", "dense"}  # both restraint paths were taken
    assert all(f.restrained and f.n_restrained > 0 for f in ref_figures.values())
    for name, device in SHARDED.items():
        param = sharded.get_parameter(name)
        assert param.device == device and param.dtype == torch.float32
        assert_equal_to_one_ulp(host_copy(param), reference.get_parameter(name).detach())
        assert same_figures(figures[name], ref_figures[name]), name
        stored = session.originals[name]
        assert stored.device == (torch.device("cpu") if originals == "cpu" else device)
    # The sketch's random numbers are drawn on the matrix's own device.
    assert set(generator_requests) == set(SHARDED.values())


@pytest.mark.parametrize("mode", ["online", "final"])
def test_every_float64_pass_over_a_matrix_runs_on_the_matrixs_device(mode, generator_requests):
    """With every target on an accelerator, the host only ever sees small things (scalars, spectra)."""
    model = place(tiny_llama()[0], {DOWN: DEV0, UP: DEV1, O_PROJ: DEV0})
    _, log = run(model, prune_mode=mode, prune_originals_device="same")
    assert generator_requests and set(generator_requests) == {DEV0, DEV1}
    smallest = min(model.get_parameter(n).numel() for n in TARGETS)
    on_host = [op for op in log.ops if op.device == "cpu" and torch.float64 in op.dtypes and op.numel >= smallest]
    assert on_host == []
    linalg = [op for op in log.ops if op.name.lstrip("_") in LINALG]
    assert linalg and all(op.device.startswith(EMULATED_TYPE) for op in linalg)
    # With W0 kept beside each matrix, the restraint moves nothing between devices.
    assert log.transfers == []


@pytest.mark.parametrize("mode", ["online", "final"])
def test_with_originals_on_the_cpu_w0_crosses_in_the_parameters_dtype_and_nothing_comes_back(mode, generator_requests):
    dtype = torch.bfloat16
    model = place(tiny_llama()[0].to(dtype), {DOWN: DEV0, UP: DEV1, O_PROJ: DEV0})
    session, log = run(model, prune_mode=mode, prune_originals_device="cpu")
    restrained = [f.name for step in session.steps for f in step.figures.values()] if mode == "online" \
        else list(session.last_restraint)
    assert len(restrained) == (9 if mode == "online" else 3)
    restrained_elements = sum(model.get_parameter(n).numel() for n in restrained)
    to_device = [t for t in log.transfers if t.source == "cpu"]
    to_host = [t for t in log.transfers if t.target == "cpu"]
    # W0 travels in bf16 (never converted to float64 on the host) once per restraint; a restraint that streams it
    # in row blocks may send it twice (to form dW, then to write W0 + restrained dW), never more.
    assert all(t.dtype == dtype and not t.converted_on_host for t in to_device)
    assert restrained_elements <= sum(t.numel for t in to_device) <= 2 * restrained_elements
    # Host-bound: W0 is copied out once per matrix when it is first recorded, nothing afterwards.
    assert sorted(t.numel for t in to_host) == sorted(model.get_parameter(n).numel() for n in TARGETS)
    assert all(t.dtype == dtype for t in to_host)


def test_finding_the_matrices_an_edit_changed_moves_w0_only_to_confirm_an_unchanged_one():
    """The final restraint first asks which targets differ from W0: a fingerprint that changed settles it on the
    weight's device; only a matrix whose fingerprint still matches W0's is compared with W0 bit for bit."""
    model = place(tiny_llama()[0], {DOWN: DEV0, UP: DEV1, O_PROJ: DEV0})
    session = edit_session(model, PruneConfig(prune=True, prune_originals_device="cpu"), TARGETS)
    with EmulatedDevices():
        session.begin()
    edit(model, DOWN, seed=1)
    edit(model, O_PROJ, seed=2)
    with EmulatedDevices() as log:
        changed = session.changed_from_original()
    assert changed == [DOWN, O_PROJ]
    assert log.transfers == [Transfer("cpu", str(DEV1), torch.float32, model.get_parameter(UP).numel(), False)]


def test_restrain_parameter_streams_w0_from_the_host_in_its_own_dtype(generator_requests):
    """restraint.restrain_parameter, the in-place form that streams W0 in row blocks, with W0 on the host."""
    from prune_plugin.restraint import restrain_parameter
    from prune_plugin.spectrum import largest_singular_value

    g = HOST_GENERATOR().manual_seed(0)
    w0 = (torch.randn(96, 80, generator=g) / 10).to(torch.bfloat16)
    edited = (w0.double() + 20 * torch.randn(96, 2, generator=g, dtype=torch.float64)
              @ torch.randn(2, 80, generator=g, dtype=torch.float64) / 80).to(torch.bfloat16)
    smax0 = largest_singular_value(w0)
    expected = edited.clone()
    restrain_parameter(expected, w0, smax0, 2.0)

    weight = OnDevice(edited.clone(), DEV1)
    del generator_requests[:]
    with EmulatedDevices() as log:
        figures, wrote = restrain_parameter(weight, w0, smax0, 2.0)
    assert wrote and figures.n_restrained > 0 and weight.dtype == torch.bfloat16
    assert_equal_to_one_ulp(weight.inner, expected)
    assert log.transfers and all(t.source == "cpu" and t.dtype == torch.bfloat16 and not t.converted_on_host
                                 for t in log.transfers)
    assert sum(t.numel for t in log.transfers) <= 2 * w0.numel()
    assert not [op for op in log.ops if op.device == "cpu" and torch.float64 in op.dtypes and op.numel >= w0.numel()]
    assert set(generator_requests) == {DEV1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("originals", ["same", "cpu"])
def test_half_precision_weights_are_restrained_in_float64_written_back_in_their_dtype_and_restored_bit_exactly(
        dtype, originals, generator_requests):
    reference = tiny_llama()[0].to(dtype)
    w0 = {n: reference.get_parameter(n).detach().clone() for n in TARGETS}
    edit_sequence(reference, edit_session(reference, PruneConfig(prune=True, prune_mode="online"), TARGETS))

    model = place(tiny_llama()[0].to(dtype), SHARDED)
    session, log = run(model, prune_mode="online", prune_originals_device=originals)

    linalg = [op for op in log.ops if op.name.lstrip("_") in LINALG and op.device.startswith(EMULATED_TYPE)]
    assert linalg and all(set(op.dtypes) == {torch.float64} for op in linalg)
    for name, device in SHARDED.items():
        param = model.get_parameter(name)
        assert param.dtype == dtype and param.device == device
        assert_equal_to_one_ulp(host_copy(param), reference.get_parameter(name).detach())
        assert not torch.equal(host_copy(param), w0[name])  # the edits (restrained) really changed it
    with EmulatedDevices():
        session.restore()
    for name in TARGETS:
        restored = host_copy(model.get_parameter(name))
        assert restored.dtype == dtype
        assert torch.equal(restored.view(torch.int16), w0[name].view(torch.int16)), name  # bits, not values


def test_the_accelerator_fingerprint_sees_a_single_bit_and_stays_on_the_device():
    """fingerprint() has a separate path for non-CPU tensors (an on-device checksum); here it runs for real.

    5M int8 elements span two of its 4M-element chunks, so the position weights of the second chunk count too.
    """
    data = torch.randint(-128, 128, (5_000_000,), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    flipped = data.clone()
    flipped[4_500_000] ^= 1
    swapped = data.clone()
    swapped[[10, 4_200_000]] = data[[4_200_000, 10]]
    on_device = [OnDevice(t, DEV0) for t in (data, data.clone(), flipped, swapped)]
    with EmulatedDevices() as log:
        prints = [fingerprint(t) for t in on_device]
    assert prints[0] == prints[1]
    assert len(set(prints[1:])) == 3
    assert log.transfers == []
    assert all(op.device == str(DEV0) for op in log.ops if op.numel > 1)


def test_a_parameter_offloaded_by_accelerate_is_refused_with_the_reason(tmp_path):
    """A device_map with 'disk' (or, next to GPUs, 'cpu') entries leaves those weights on the meta device: their
    values exist only while accelerate's hooks run a forward pass, so there is nothing to restrain."""
    from accelerate import dispatch_model

    model, _ = tiny_llama()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert model.get_parameter(DOWN).is_meta
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*offload"):
        edit_session(model, PruneConfig(prune=True), [DOWN])
    edit_session(model, PruneConfig(prune=True), [UP])  # a resident layer of the same model is fine
