"""_prune_plugin_autoload: the start-up hook is cheap, inert until a hooked module is imported, runs its hook
right after that import, never breaks it, and can be switched off; its command manages the .pth file.

Every check runs in a fresh interpreter, because the hook lives in sys.meta_path for the life of a process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _prune_plugin_autoload as autoload
from helpers.editing import requires_easyeditor
from helpers.lmeval import REPO

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


def test_the_hook_imports_no_other_module_at_start():
    """Why an interpreter with the hook installed starts as fast as one without: in Python's own import tree
    (-X importtime) nothing hangs below _prune_plugin_autoload; it uses only os and sys, which are loaded
    before it. (The microseconds themselves depend on the machine and are not asserted.)"""
    err = python("import _prune_plugin_autoload", args=["-X", "importtime"]).stderr
    entries = []  # (depth, module) in the order Python reports them: a module's imports come just before it
    for line in err.splitlines():
        if line.startswith("import time:") and line.count("|") == 2 and not line.rstrip().endswith("| package"):
            field = line.rsplit("|", 1)[1]
            entries.append((len(field) - len(field.lstrip()), field.strip()))
    names = [name for _, name in entries]
    assert "_prune_plugin_autoload" in names, err
    at = names.index("_prune_plugin_autoload")
    below = []
    for depth, name in reversed(entries[:at]):
        if depth <= entries[at][0]:
            break
        below.append(name)
    assert below == []


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
    assert autoload.AROUND == {"easyeditor": "prune_plugin.easyedit:autoimport"}


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


@pytest.fixture
def around_hooks(fake_library: Path) -> Path:
    """fakelib records, while it executes, what the AROUND hook's context manager has set."""
    (fake_library / "fakelib" / "__init__.py").write_text(
        "import sys\ncalls = []\nVALUE = 41\nSEEN = list(getattr(sys, '_trace', []))\n", encoding="utf-8")
    (fake_library / "aroundhooks.py").write_text(textwrap.dedent("""
        import contextlib, sys
        @contextlib.contextmanager
        def trace():
            sys._trace = ["entered"]
            try:
                yield
            finally:
                sys._trace.append("left")
        def explode():
            raise RuntimeError("no context")
        class _Broken:
            def __enter__(self):
                raise RuntimeError("cannot enter")
            def __exit__(self, *exc):
                pass
        def broken():
            return _Broken()
    """), encoding="utf-8")
    return fake_library


def test_an_around_hook_wraps_the_execution_of_the_module(around_hooks):
    out = python("""
        import sys, _prune_plugin_autoload as a
        sys.meta_path.insert(0, a.PostImportFinder({}, {"fakelib": "aroundhooks:trace"}))
        import fakelib
        print(fakelib.SEEN, sys._trace)
    """, cwd=around_hooks).stdout
    assert out.split() == ["['entered']", "['entered',", "'left']"]


@pytest.mark.parametrize("hook, message", [("explode", "RuntimeError: no context"),
                                           ("broken", "RuntimeError: cannot enter")])
def test_a_failing_around_hook_is_a_warning_and_the_import_still_works(around_hooks, hook, message):
    proc = python(f"""
        import sys, warnings, _prune_plugin_autoload as a
        warnings.simplefilter("always")
        sys.meta_path.insert(0, a.PostImportFinder({{}}, {{"fakelib": "aroundhooks:{hook}"}}))
        import fakelib
        print(fakelib.VALUE, fakelib.SEEN)
    """, cwd=around_hooks)
    assert proc.stdout.split() == ["41", "[]"]
    assert f"the fakelib hook aroundhooks:{hook} failed ({message})" in proc.stderr


# --------------------------------------------------------------------------------------------- easyeditor

needs_placeholders = pytest.mark.skipif(
    any(importlib.util.find_spec(n) is not None for n in ("timm", "cv2")),
    reason="timm or cv2 is installed here: easyeditor would import them without placeholders")


@requires_easyeditor
@needs_placeholders
def test_a_plain_import_easyeditor_works_where_timm_and_cv2_are_missing():
    out = python("""
        import sys
        import easyeditor
        from easyeditor import BaseEditor, ROMEHyperParams
        import prune_plugin.easyedit as pe
        missing = []
        for name in ("timm", "cv2"):
            try:
                __import__(name)
            except ImportError:
                missing.append(name)
        print(pe.is_active(), missing, [n for n in ("timm", "cv2") if n in sys.modules])
    """, env={"PYTHONPATH": ""}).stdout
    assert out.split() == ["True", "['timm',", "'cv2']", "[]"]  # active, and timm/cv2 still absent for others


@requires_easyeditor
@needs_placeholders
@pytest.mark.parametrize("switch", ["PRUNE_PLUGIN_EASYEDIT_COMPAT", "PRUNE_PLUGIN_AUTOLOAD"])
def test_the_compat_layer_switches_off(switch):
    out = python("""
        try:
            import easyeditor
            print("imported")
        except ImportError as err:
            print(type(err).__name__)
    """, env={switch: "0", "PYTHONPATH": ""}).stdout
    assert out.split() == ["ModuleNotFoundError"]  # easyeditor's own failure, as without the plugin


@requires_easyeditor
def test_the_compat_layer_uses_a_package_that_imports(tmp_path):
    """Where a package exists, easyeditor gets it, not a placeholder (a stand-in cv2 plays the installed one)."""
    (tmp_path / "cv2").mkdir()
    (tmp_path / "cv2" / "__init__.py").write_text("REAL = True\n", encoding="utf-8")
    out = python("""
        import sys
        import easyeditor
        users = [m for name, m in list(sys.modules.items())
                 if name.startswith("easyeditor.") and getattr(m, "cv2", None) is not None]
        print(bool(users), all(getattr(m.cv2, "REAL", False) for m in users), "cv2" in sys.modules)
    """, env={"PYTHONPATH": str(tmp_path)}).stdout
    assert out.split() == ["True", "True", "True"]


# --------------------------------------------------------------------------------------------- lm-eval upstream

# A TaskManager as lm-eval 0.4.13 has it (records what it indexes), and one that reads the entry-point group
# itself, as lm-eval PR #4015 proposes: installed packages' task folders first, then the user's include_path.
UPSTREAM = '''
import importlib.metadata


class TaskManager:
    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        self.indexed = list(include_path or [])


class ReadsTheGroup(TaskManager):
    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        plugins = [str(d) for d in entry_point_dirs(importlib.metadata.entry_points(group="lm_eval.tasks"))]
        super().__init__(verbosity, plugins + list(include_path or []), include_defaults, metadata)
'''


@pytest.fixture
def managers(tmp_path, monkeypatch):
    (tmp_path / "fake_lm_eval_manager.py").write_text(
        "from prune_plugin.lmeval import entry_point_task_dirs as entry_point_dirs\n" + UPSTREAM, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_lm_eval_manager

    yield fake_lm_eval_manager
    sys.modules.pop("fake_lm_eval_manager", None)


def test_a_task_manager_that_reads_the_group_itself_indexes_our_tasks_once(managers, tmp_path):
    from prune_plugin import lmeval

    ours = str(lmeval.task_dir())
    mine = str(tmp_path / "my-tasks")
    assert not lmeval.reads_task_entry_points(managers.TaskManager)
    assert lmeval.reads_task_entry_points(managers.ReadsTheGroup)
    lmeval.register_entry_point_tasks(managers.TaskManager)  # what the start-up hook does to lm-eval's class
    assert [str(p) for p in managers.TaskManager(include_path=[mine]).indexed] == [ours, mine]
    assert [str(p) for p in managers.ReadsTheGroup(include_path=[mine]).indexed] == [ours, mine]  # not ours twice


def test_the_hook_leaves_a_task_manager_that_reads_the_group_alone(managers):
    from prune_plugin import lmeval

    original = managers.ReadsTheGroup.__init__
    lmeval.register_entry_point_tasks(managers.ReadsTheGroup)
    assert managers.ReadsTheGroup.__init__ is original
