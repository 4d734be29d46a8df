"""The edit session: W0 bookkeeping, PRUNE's two modes, the hook contract, telemetry, rollback and restoration."""
import math

import pluggy
import pytest
import torch

from prune_plugin.config import PruneConfig
from prune_plugin.hookspecs import hookimpl
from prune_plugin.plugins.telemetry import read_telemetry
from prune_plugin.restraint import restrain_dense_reference, restrain_values
from prune_plugin.plugins import edit_session, make_plugin_manager
from prune_plugin.session import EditSession
from prune_plugin.spectrum import largest_singular_value
from prune_plugin.testing import tiny_llama

TARGET = "model.layers.1.mlp.down_proj.weight"


def rank_one_edit(model, seed: int, strength: float = 40.0, name: str = TARGET) -> None:
    """What ROME does to a matrix: W += u v^T."""
    g = torch.Generator().manual_seed(seed)
    w = model.get_parameter(name)
    u, v = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
    with torch.no_grad():
        w += strength * torch.outer(u / u.norm(), v / v.norm())


def edit(session, model, seed: int, request: dict | None = None, **kwargs):
    """One edit as an editor makes it under the session: before_edit, a rank-one edit, after_edit."""
    session.before_edit()
    rank_one_edit(model, seed=seed, **kwargs)
    return session.after_edit({} if request is None else request)


def run_sequence(session, model, n: int, **kwargs) -> list:
    steps = [edit(session, model, i, {"prompt": f"edit {i}", "target_new": "x"}, **kwargs) for i in range(n)]
    session.end()
    return steps


@pytest.fixture
def model():
    return tiny_llama()[0]


def params_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_final_mode_restrains_once_after_the_last_edit_like_the_official_code(model):
    w0 = model.get_parameter(TARGET).detach().clone()
    session = edit_session(model, PruneConfig(prune=True, prune_alpha=2.0, prune_mode="final"), [TARGET])
    for i in range(3):
        edit(session, model, i, {"prompt": str(i)})
        if i < 2:
            assert not torch.equal(model.get_parameter(TARGET), w0)  # edits land unrestrained until the end
    unrestrained = model.get_parameter(TARGET).detach().clone()
    session.end()
    expected = w0.double() + restrain_dense_reference(unrestrained - w0, largest_singular_value(w0), 2.0, never_enlarge=True)
    assert torch.allclose(model.get_parameter(TARGET).double(), expected, rtol=0, atol=1e-5)


def test_restrained_matrix_obeys_the_papers_bound(model):
    w0 = model.get_parameter(TARGET).detach().clone()
    smax0 = largest_singular_value(w0)
    session = edit_session(model, PruneConfig(prune=True, prune_alpha=math.e), [TARGET])
    for i in range(4):
        edit(session, model, i)
    smax_unrestrained = torch.linalg.svdvals((model.get_parameter(TARGET) - w0).double())[0].item()
    session.end()
    bound = restrain_values(torch.tensor([smax_unrestrained], dtype=torch.float64), smax0, math.e)[0].item()
    smax_after = torch.linalg.svdvals((model.get_parameter(TARGET) - w0).double())[0].item()
    assert smax_unrestrained > smax0  # the edits really were large enough to be restrained
    assert smax_after <= max(bound, smax0) + 1e-4


def test_online_mode_restrains_after_every_edit_and_only_edited_matrices(model):
    other = "model.layers.2.mlp.down_proj.weight"
    session = edit_session(model, PruneConfig(prune=True, prune_mode="online"), [TARGET, other])
    steps = run_sequence(session, model, 3)
    for step in steps:
        assert step.edited == [TARGET]
        assert step.figures[TARGET].restrained and step.figures[TARGET].n_restrained >= 1
    assert torch.equal(model.get_parameter(other), session.originals[other])


def test_restraint_never_touches_parameters_that_were_not_edited(model):
    before = params_snapshot(model)
    session = edit_session(model, PruneConfig(prune=True, prune_mode="online"), [TARGET])
    run_sequence(session, model, 2)
    for name, value in before.items():
        if name != TARGET:
            assert torch.equal(model.get_parameter(name), value), name


def test_restore_gives_back_w0_bit_exactly(model):
    before = params_snapshot(model)
    session = edit_session(model, PruneConfig(prune=True, prune_mode="online"), [TARGET])
    run_sequence(session, model, 3)
    assert not torch.equal(model.get_parameter(TARGET), before[TARGET])
    session.restore()
    for name, value in before.items():
        assert torch.equal(model.get_parameter(name), value), name


def test_originals_can_live_on_the_cpu_and_restore_in_the_parameters_dtype(model):
    model = model.to(torch.bfloat16)
    w0 = model.get_parameter(TARGET).detach().clone()
    session = edit_session(model, PruneConfig(prune=True, prune_originals_device="cpu"), [TARGET])
    run_sequence(session, model, 2)
    assert session.originals[TARGET].device.type == "cpu" and session.originals[TARGET].dtype == torch.bfloat16
    session.restore()
    assert torch.equal(model.get_parameter(TARGET), w0)


def test_prune_off_changes_nothing_the_edits_did(model):
    session = edit_session(model, PruneConfig(prune=False, prune_telemetry=None), [TARGET])
    run_sequence(session, model, 3)
    reference = tiny_llama()[0]
    for i in range(3):
        rank_one_edit(reference, seed=i)
    assert torch.equal(model.get_parameter(TARGET), reference.get_parameter(TARGET))


def test_restrain_now_applies_the_restraint_whatever_the_mode(model):
    session = edit_session(model, PruneConfig(prune=True, prune_mode="final"), [TARGET])
    edit(session, model, 0)
    figures = session.restrain_now()
    assert figures[TARGET].restrained


def final_mode_sequence(model, n_edits: int, explicit_restraint: bool) -> EditSession:
    session = edit_session(model, PruneConfig(prune=True, prune_mode="final"), [TARGET])
    for i in range(n_edits):
        edit(session, model, i)
    if explicit_restraint:
        session.restrain_now()
    session.end()
    return session


def test_restrain_now_then_end_in_final_mode_restrains_once(model, monkeypatch):
    from prune_plugin import session as session_module

    restrained = []
    original = session_module.plan_restraint
    monkeypatch.setattr(session_module, "plan_restraint",
                        lambda *a, **k: restrained.append(1) or original(*a, **k))
    final_mode_sequence(model, 2, explicit_restraint=True)
    assert len(restrained) == 1
    once = tiny_llama()[0]
    session = final_mode_sequence(once, 2, explicit_restraint=False)
    assert session.last_restraint[TARGET].n_restrained > 0  # F really changed something: twice would differ
    assert torch.equal(model.get_parameter(TARGET), once.get_parameter(TARGET))


def test_restrain_now_restrains_again_after_a_further_edit(model):
    session = edit_session(model, PruneConfig(prune=True, prune_mode="final"), [TARGET])
    edit(session, model, 0)
    first = session.restrain_now()[TARGET]
    assert session.restrain_now()[TARGET] is first  # nothing changed since: the same figures, no second pass
    edit(session, model, 1)
    second = session.restrain_now()[TARGET]
    assert second is not first and second.restrained
    session.restore()
    edit(session, model, 0)  # W0 + the first edit again, bit for bit: restrained afresh after restore()
    assert session.restrain_now()[TARGET] is not first


def test_unknown_target_is_a_clear_error(model):
    with pytest.raises(KeyError, match="model.layers.9.mlp"):
        edit_session(model, PruneConfig(prune=True), ["model.layers.9.mlp.down_proj.weight"])


@pytest.mark.parametrize("telemetry", [False, True], ids=["plain", "telemetry-with-condition-numbers"])
def test_non_finite_edit_is_refused_and_weights_are_not_rewritten(model, tmp_path, telemetry):
    w0 = model.get_parameter(TARGET).detach().clone()
    config = PruneConfig(prune=True, prune_mode="online",
                         prune_telemetry=str(tmp_path / "t.jsonl") if telemetry else None)
    session = edit_session(model, config, [TARGET])
    session.before_edit()
    with torch.no_grad():
        model.get_parameter(TARGET)[0, 0] = float("nan")  # what a diverged ROME edit writes
    broken = model.get_parameter(TARGET).detach().clone()
    with pytest.raises(FloatingPointError, match=f"{TARGET}: the edit left non-finite values"):
        session.after_edit({})
    assert torch.equal(model.get_parameter(TARGET)[1:], broken[1:])
    session.restore()
    assert torch.equal(model.get_parameter(TARGET), w0)


class TestTelemetry:
    def test_every_edit_is_one_json_line_with_the_per_matrix_figures(self, model, tmp_path):
        path = tmp_path / "run" / "telemetry.jsonl"
        session = edit_session(model, PruneConfig(prune=True, prune_mode="online", prune_telemetry=str(path)), [TARGET])
        run_sequence(session, model, 3)
        records = list(read_telemetry(path))
        assert [r["event"] for r in records] == ["start", "edit", "edit", "edit", "end"]
        figures = records[1]["figures"][0]
        assert figures["name"] == TARGET and figures["smax_original"] > 0 and figures["delta_fro"] > 0
        assert figures["cond_after"] <= figures["cond_before"]  # the restraint lowers the condition number
        assert figures["n_restrained"] >= 1 and records[1]["seconds"]["restraint"] > 0

    def test_without_restraint_telemetry_still_measures_the_edited_matrices(self, model, tmp_path):
        path = tmp_path / "t.jsonl"
        session = edit_session(model, PruneConfig(prune_telemetry=str(path)), [TARGET])
        run_sequence(session, model, 2)
        edits = [r for r in read_telemetry(path) if r["event"] == "edit"]
        growth = [e["figures"][0]["cond_after"] for e in edits]
        assert growth[1] > growth[0] > 0 and not edits[0]["figures"][0]["restrained"]

    def test_a_line_cut_off_by_a_crash_is_skipped_and_the_rest_is_kept(self, model, tmp_path):
        path = tmp_path / "t.jsonl"
        session = edit_session(model, PruneConfig(prune_telemetry=str(path)), [TARGET])
        run_sequence(session, model, 2)
        with open(path, "a") as f:
            f.write('{"event": "edit", "step": 2, "figu')
        assert len(list(read_telemetry(path))) == 4

    def test_a_corrupt_line_in_the_middle_names_file_and_line(self, tmp_path):
        path = tmp_path / "t.jsonl"
        path.write_text('{"event": "start"}\nnot json\n{"event": "end"}\n')
        with pytest.raises(ValueError, match=r"t.jsonl:2"):
            list(read_telemetry(path))


class TestHooks:
    def test_third_party_restraints_receive_the_lifecycle_in_order(self, model):
        calls = []

        class Recorder:
            @hookimpl
            def prune_edit_start(self, originals):
                calls.append(("start", sorted(originals)))

            @hookimpl
            def prune_after_edit(self, request, step, originals):
                calls.append(("edit", request["prompt"], step.index, step.edited))

            @hookimpl
            def prune_edit_end(self, steps):
                calls.append(("end", len(steps)))

        pm = make_plugin_manager(load_entry_points=False)
        pm.register(Recorder())
        session = EditSession(model, PruneConfig(), [TARGET], plugin_manager=pm)
        run_sequence(session, model, 2)
        assert calls == [("start", [TARGET]), ("edit", "edit 0", 0, [TARGET]), ("edit", "edit 1", 1, [TARGET]), ("end", 2)]

    def test_prune_runs_before_other_plugins_so_they_see_restrained_weights(self, model):
        seen = []

        class Observer:
            @hookimpl
            def prune_after_edit(self, step):
                seen.append(step.figures[TARGET].restrained)

        config = PruneConfig(prune=True, prune_mode="online")
        pm = make_plugin_manager(config, load_entry_points=False)
        pm.register(Observer())
        session = EditSession(model, config, [TARGET], plugin_manager=pm)
        run_sequence(session, model, 1)
        assert seen == [True]

    def test_plugins_are_discovered_through_the_prune_plugin_entry_point_group(self, monkeypatch):
        loaded = []
        monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints",
                            lambda self, group, name=None: loaded.append(group) or 0)
        make_plugin_manager()
        assert loaded == ["prune_plugin"]


def test_restore_forgets_what_the_restraint_learned_so_a_second_sequence_equals_the_first():
    """After restore() W is W0 again: the rank hints and kept bases of the undone edits go too, and the same edits
    then give the same weights bit for bit."""
    g = torch.Generator().manual_seed(21)
    w0 = torch.randn(160, 400, generator=g)
    w0 *= 3.0 / torch.linalg.svdvals(w0.double())[0].item()
    edits = [torch.randn(160, 1, generator=g) @ torch.randn(1, 400, generator=g) * 0.05 for _ in range(3)]
    model = torch.nn.Linear(400, 160, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    config = PruneConfig(prune=True, prune_alpha=math.e, prune_mode="online")
    session = edit_session(model, config, ["weight"])
    results = []
    for _ in range(2):
        for i, e in enumerate(edits):
            session.before_edit()
            with torch.no_grad():
                model.weight += e
            session.after_edit({"prompt": f"edit {i}"})
        assert session.bases and session.rank_hints  # the restraint kept what it found
        results.append(model.weight.detach().clone())
        session.restore()
        assert not session.bases and not session.rank_hints and torch.equal(model.weight, w0)
    assert torch.equal(results[0], results[1])
