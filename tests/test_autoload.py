"""_prune_plugin_autoload: the start-up hook is cheap, inert until a hooked module is imported, runs its hook
right after that import, never breaks it, and can be switched off; its command manages the .pth file.

Every check runs in a fresh interpreter, because the hook lives in sys.meta_path for the life of a process.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _prune_plugin_autoload as autoload
from lmeval_helpers import REPO

HEAVY = ("torch", "lm_eval", "prune_plugin", "transformers", "easyeditor")


def python(code: str, *, cwd: Path | None = None, env: dict | None = None, args=()) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PRUNE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def fake_library(tmp_path: Path) -> Path:
    """A package `fakelib` (with a submodule) and a module of hooks that record their calls in fakelib."""
    (tmp_path / "fakelib").mkdir()
    (tmp_path / "fakelib" / "__init__.py").write_text("calls = []\nVALUE = 41\n", encoding="utf-8")
    (tmp_path / "fakelib" / "sub.py").write_text("import fakelib\nfakelib.VALUE += 1\n", encoding="utf-8")
    (tmp_path / "fakehooks.py").write_text(textwrap.dedent("""
        import sys
        def record():
            sys.modules["fakelib"].calls.append(sys.modules["fakelib"].VALUE)
        def explode():
            raise RuntimeError("boom")
    """), encoding="utf-8")
    return tmp_path


def with_hooks(hooks: dict[str, str], code: str) -> str:
    """`code` run after a finder with `hooks` went to the front of sys.meta_path."""
    setup = f"import sys, _prune_plugin_autoload as a\nsys.meta_path.insert(0, a.PostImportFinder({hooks!r}))\n"
    return setup + textwrap.dedent(code)


def test_importing_the_hook_loads_nothing_heavy_and_adds_one_finder():
    out = python(f"""
        import sys
        before = set(sys.modules)
        import _prune_plugin_autoload, json, email.message
        new = [m for m in set(sys.modules) - before if m.split('.')[0] in {HEAVY!r}]
        finders = [f for f in sys.meta_path if getattr(f, '_prune_plugin_autoload', False)]
        print(new, len(finders), sys.meta_path.index(finders[0]))
    """).stdout
    assert out.split() == ["[]", "1", "0"]


def test_start_cost_is_under_5_ms(tmp_path):
    """-X importtime, with bytecode cached as a normal install has it; best of five against machine noise."""
    env = {"PYTHONPYCACHEPREFIX": str(tmp_path / "pyc"), "PYTHONDONTWRITEBYTECODE": ""}
    costs = []
    for _ in range(6):
        err = python("import _prune_plugin_autoload", env=env, args=["-X", "importtime"]).stderr
        costs.append(int(re.search(r"\|\s*(\d+)\s*\|\s*_prune_plugin_autoload\s*$", err, re.MULTILINE).group(1)))
    assert min(costs[1:]) < 5000, f"import cost in microseconds: {costs}"


def test_hook_runs_once_right_after_the_module_has_executed(fake_library):
    out = python(with_hooks({"fakelib": "fakehooks:record"}, """
        import importlib.util
        assert importlib.util.find_spec("fakelib") is not None  # an availability check does not use it up
        import fakelib
        import fakelib
        import importlib; importlib.import_module("fakelib")
        print(fakelib.calls, type(fakelib.__loader__).__name__, type(fakelib.__spec__.loader).__name__)
    """), cwd=fake_library).stdout
    assert out.split() == ["[41]", "SourceFileLoader", "SourceFileLoader"]


def test_hook_on_a_submodule_waits_for_that_submodule(fake_library):
    out = python(with_hooks({"fakelib.sub": "fakehooks:record"}, """
        import fakelib
        print(fakelib.calls)
        import fakelib.sub
        print(fakelib.calls)
    """), cwd=fake_library).stdout
    assert out.split() == ["[]", "[42]"]


def test_a_failing_hook_is_a_warning_and_the_import_still_works(fake_library):
    proc = python(with_hooks({"fakelib": "fakehooks:explode", "fakelib.sub": "nosuchmodule:f"}, """
        import warnings
        warnings.simplefilter("always")
        import fakelib.sub
        print(fakelib.VALUE)
    """), cwd=fake_library)
    assert proc.stdout.split() == ["42"]
    assert "RuntimeWarning: prune_plugin: the fakelib hook fakehooks:explode failed (RuntimeError: boom)" in proc.stderr
    assert "the fakelib.sub hook nosuchmodule:f failed (ModuleNotFoundError" in proc.stderr


def test_hooks_for_modules_imported_before_install_run_at_install(fake_library):
    out = python("""
        import fakelib, _prune_plugin_autoload as a, sys
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_prune_plugin_autoload", False)]
        a.install({"fakelib": "fakehooks:record"})
        print(fakelib.calls)
    """, cwd=fake_library).stdout
    assert out.split() == ["[41]"]


def test_importing_lm_eval_tasks_registers_the_entry_points():
    out = python("""
        import _prune_plugin_autoload
        from lm_eval.tasks import TaskManager
        print(getattr(TaskManager.__init__, "_prune_plugin_entry_points", False))
    """).stdout
    assert out.split() == ["True"]


def test_prune_plugin_autoload_0_switches_the_hook_off():
    out = python("""
        import sys, _prune_plugin_autoload
        from lm_eval.tasks import TaskManager
        print(any(getattr(f, "_prune_plugin_autoload", False) for f in sys.meta_path),
              getattr(TaskManager.__init__, "_prune_plugin_entry_points", False))
    """, env={"PRUNE_PLUGIN_AUTOLOAD": "0"}).stdout
    assert out.split() == ["False", "False"]


def test_the_hooks_name_lm_eval_and_easyeditor():
    assert autoload.HOOKS == {"lm_eval.tasks": "prune_plugin.lmeval:register_entry_point_tasks",
                              "easyeditor": "prune_plugin.easyedit:autoactivate"}


def test_shipped_pth_file_is_the_line_the_command_installs():
    assert (REPO / autoload.PTH_NAME).read_text(encoding="utf-8") == autoload.PTH_LINE


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "_prune_plugin_autoload", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PRUNE_PLUGIN_AUTOLOAD": "1"})


def test_command_installs_a_pth_that_a_site_dir_runs_then_removes_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    assert command("install", "--site-dir", str(site)).returncode == 0
    assert (site / autoload.PTH_NAME).read_text(encoding="utf-8") == "import _prune_plugin_autoload\n"
    assert f".pth files: {site / autoload.PTH_NAME}" in command("status", "--site-dir", str(site)).stdout
    # What site.py does for site-packages at start-up, done here for the temporary folder:
    out = python(f"""
        import site, sys
        site.addsitedir({str(site)!r})
        print(any(getattr(f, "_prune_plugin_autoload", False) for f in sys.meta_path))
    """, env={"PYTHONPATH": ""}).stdout
    assert out.split() == ["True"]
    assert command("uninstall", "--site-dir", str(site)).returncode == 0
    assert not (site / autoload.PTH_NAME).exists()
    assert "nothing to remove" in command("uninstall", "--site-dir", str(site)).stdout


def test_command_will_not_remove_a_pth_it_did_not_write(tmp_path):
    (tmp_path / autoload.PTH_NAME).write_text("import something_else\n", encoding="utf-8")
    proc = command("uninstall", "--site-dir", str(tmp_path))
    assert proc.returncode == 1 and "not ours" in proc.stderr
    assert (tmp_path / autoload.PTH_NAME).exists()


def test_status_reports_the_switch_and_the_hooks(tmp_path):
    out = command("status", "--site-dir", str(tmp_path)).stdout
    assert "PRUNE_PLUGIN_AUTOLOAD: 1 -> on" in out
    assert "lm_eval.tasks -> prune_plugin.lmeval:register_entry_point_tasks" in out
