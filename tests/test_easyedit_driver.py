"""The EasyEdit driver on a current EasyEdit (one whose BaseEditor.edit has `sequential_edit`), stood in for by a
small fake package: what build_editor does around EasyEdit's own BaseEditor.from_hparams. The real current
EasyEdit runs in tests/test_easyedit_current.py (with PRUNE_EASYEDIT_SRC)."""
from __future__ import annotations

import sys
import types

import pytest

from prune_plugin.easyedit import driver, installed


class FakeHyperParams:
    def __init__(self, model_name="org/tiny-model", alg_name="ROME"):
        self.model_name, self.alg_name = model_name, alg_name


@pytest.fixture
def current_easyeditor(monkeypatch):
    """A module tree shaped like the current EasyEdit: BaseEditor with sequential_edit, and method modules whose
    caches hold what an earlier model left there."""
    package = types.ModuleType("easyeditor")
    built = []

    class BaseEditor:
        fail = False

        def __init__(self, hparams):
            self.hparams, self.model_name = hparams, hparams.model_name

        @classmethod
        def from_hparams(cls, hparams):
            built.append(hparams.model_name)
            if cls.fail:
                raise RuntimeError("EasyEdit could not build the editor")
            return cls(hparams)

        def edit(self, prompts, target_new, sequential_edit=False, **kwargs):
            raise AssertionError("not called here")

    package.BaseEditor = BaseEditor
    package.built = built
    monkeypatch.setitem(sys.modules, "easyeditor", package)
    caches = {
        "easyeditor.models.rome.rome_main": {"CONTEXT_TEMPLATES_CACHE": ["{} from another model"]},
        "easyeditor.models.memit.memit_main": {"CONTEXT_TEMPLATES_CACHE": ["{}"], "COV_CACHE": {"other": 1}},
        "easyeditor.models.rome.compute_u": {"inv_mom2_cache": {"other": 2}},
        "easyeditor.models.alphaedit.AlphaEdit_main": {"CONTEXT_TEMPLATES_CACHE": ["{}"], "COV_CACHE": {"x": 3}},
    }
    for name, values in caches.items():
        module = types.ModuleType(name)
        vars(module).update(values)
        monkeypatch.setitem(sys.modules, name, module)
    assert not installed.is_legacy_easyeditor(package)
    return package


def test_build_editor_resets_easyeditors_module_caches_for_a_current_easyedit(current_easyeditor):
    driver.build_editor(FakeHyperParams(), model=object(), tok=object())
    assert sys.modules["easyeditor.models.rome.rome_main"].CONTEXT_TEMPLATES_CACHE is None
    assert sys.modules["easyeditor.models.memit.memit_main"].CONTEXT_TEMPLATES_CACHE is None
    assert sys.modules["easyeditor.models.memit.memit_main"].COV_CACHE == {}
    assert sys.modules["easyeditor.models.rome.compute_u"].inv_mom2_cache == {}
    assert sys.modules["easyeditor.models.alphaedit.AlphaEdit_main"].COV_CACHE == {}


def test_reset_names_what_it_reset_and_leaves_other_packages_alone(current_easyeditor, monkeypatch):
    other = types.ModuleType("not_easyeditor.models.rome.rome_main")
    other.CONTEXT_TEMPLATES_CACHE = ["kept"]
    monkeypatch.setitem(sys.modules, other.__name__, other)
    reset = installed.reset_easyeditor_caches(current_easyeditor)
    assert "easyeditor.models.memit.memit_main.COV_CACHE" in reset and len(reset) == 6
    assert other.CONTEXT_TEMPLATES_CACHE == ["kept"]


def test_build_editor_hands_easyedit_the_model_and_keeps_the_hparams_model_name(current_easyeditor):
    model, tok = object(), object()
    hparams = FakeHyperParams()
    editor = driver.build_editor(hparams, model, tok)
    assert current_easyeditor.built == [(model, tok)]  # the in-memory pair, as the current BaseEditor takes it
    assert hparams.model_name == editor.model_name == "org/tiny-model"


def test_build_editor_restores_the_hparams_model_name_when_easyedit_fails(current_easyeditor):
    current_easyeditor.BaseEditor.fail = True
    hparams = FakeHyperParams()
    with pytest.raises(RuntimeError, match="could not build"):
        driver.build_editor(hparams, object(), object())
    assert hparams.model_name == "org/tiny-model"


DROPPED_LEGACY = r'''
import sys, types

sys.modules["prune_plugin.easyedit.legacy"] = None  # as if legacy.py were deleted: importing it fails

package, util, hparams_mod, editors, editor_mod = (types.ModuleType(n) for n in (
    "easyeditor", "easyeditor.util", "easyeditor.util.hparams", "easyeditor.editors", "easyeditor.editors.editor"))

class HyperParams:
    def __init__(self, model_name="tiny", alg_name="ROME"):
        self.model_name, self.alg_name = model_name, alg_name

class BaseEditor:
    def __init__(self, hparams):
        self.hparams, self.alg_name = hparams, hparams.alg_name
    @classmethod
    def from_hparams(cls, hparams):
        return cls(hparams)
    def edit(self, prompts, target_new, sequential_edit=False, **kwargs):
        return "edited"

BaseEditor.__module__ = "easyeditor.editors.editor"
hparams_mod.HyperParams, editor_mod.BaseEditor, package.BaseEditor = HyperParams, BaseEditor, BaseEditor
for module in (package, util, hparams_mod, editors, editor_mod):
    sys.modules[module.__name__] = module

import prune_plugin.easyedit as pe
from prune_plugin.easyedit.driver import build_editor

pe.activate(package)
editor = build_editor(HyperParams(), object(), object())
assert editor.edit(["p"], ["t"]) == "edited"
pe.deactivate()
print("ok without legacy.py")
'''


def test_a_current_easyedit_needs_nothing_of_legacy_py(tmp_path):
    """Dropping the packaged 0.0.1.dev0 is deleting easyedit/legacy.py: activation, editor construction and an
    edit call on a current EasyEdit never import it."""
    import os
    import subprocess

    script = tmp_path / "without_legacy.py"
    script.write_text(DROPPED_LEGACY)
    env = {**os.environ, "PRUNE_PLUGIN_AUTOLOAD": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok without legacy.py" in done.stdout


def test_once_a_step_asks_to_stop_the_wrapped_method_applies_no_further_request():
    """The collapse guard's 'stop': the editor's sequence state (not the session) remembers it."""
    import torch

    from prune_plugin.config import PruneConfig
    from prune_plugin.easyedit.editor import EditorSequence, wrap_apply_algo
    from prune_plugin.hookspecs import hookimpl
    from prune_plugin.plugins import make_plugin_manager
    from prune_plugin.session import EditSession

    class StopAfterFirst:
        @hookimpl
        def prune_after_edit(self, step):
            step.stop = True

    model = torch.nn.Linear(3, 2)
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(StopAfterFirst())
    session = EditSession(model, PruneConfig(), ["weight"], plugin_manager=pm)
    applied = []

    def apply_algo(model, tok, requests, hparams, **kwargs):
        applied.append(requests[0]["prompt"])
        with torch.no_grad():
            model.weight.add_(1.0)
        return model, {}

    sequence = EditorSequence()
    wrapped = wrap_apply_algo(apply_algo, session, sequence)
    hparams = types.SimpleNamespace(alg_name="ROME")
    wrapped(model, None, [{"prompt": "first"}], hparams)
    after_first = model.weight.detach().clone()
    assert sequence.stopped and applied == ["first"]
    assert wrapped(model, None, [{"prompt": "second"}], hparams) == (model, {})
    assert applied == ["first"] and torch.equal(model.weight, after_first)
