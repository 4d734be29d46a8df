"""The package's dependencies point one way (docs/architecture.md): core <- contract <- plugins <- integrations.

The import graph is read from the source with `ast`: module-level and function-level imports alike (a lazy
import is still a dependency), except those under ``if TYPE_CHECKING:``, which exist only for annotations.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "prune_plugin"

#: The numerical and file-format core: imports nothing of the package outside this set.
CORE = {"restraint", "spectrum", "config", "originals", "seeding", "perplexity", "checkpoint", "datasets", "models",
        "switches", "hashing", "condition"}
#: The hook contract and the session that drives it: import the core (and each other), no plugin, no integration.
CONTRACT = {"hookspecs", "session"}
#: Hook implementations: import the contract and the core, never another plugin or an integration.
PLUGINS = "plugins"
#: Everything else (easyedit/, lmeval*, branches, the experiment, the miner, cli, plots, tasks) is an integration
#: or a program: it may import any of the above.


def source_modules() -> dict[str, Path]:
    """Dotted module name -> file, for prune_plugin/ and the task folders it ships as prune_plugin.tasks."""
    found = {}
    for root, prefix in ((REPO / PACKAGE, PACKAGE), (REPO / "tasks", f"{PACKAGE}.tasks")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere except under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import hookspecs` imports a module, `from .x import y` a name of x
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def layer(module: str) -> str:
    short = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    if short in CORE:
        return "core"
    if short in CONTRACT:
        return "contract"
    if short == PLUGINS or short.startswith(PLUGINS + "."):
        return "plugins"
    return "integration"


ALLOWED = {"core": {"core"}, "contract": {"core", "contract"}, "plugins": {"core", "contract", "plugins"},
           "integration": {"core", "contract", "plugins", "integration"}}


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_is_read_from_every_module_of_the_package(graph):
    assert {f"{PACKAGE}.session", f"{PACKAGE}.plugins.prune", f"{PACKAGE}.easyedit.driver",
            f"{PACKAGE}.tasks.hardedit.utils"} <= set(graph)
    assert f"{PACKAGE}.restraint" in graph[f"{PACKAGE}.spectrum"]  # a module-level import is an edge


def test_function_level_imports_count_and_type_checking_imports_do_not():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from .session import EditSession\n"
                     "def f():\n    from .restraint import restrain_values\n")
    known = {f"{PACKAGE}.session", f"{PACKAGE}.restraint", f"{PACKAGE}.x"}
    assert _imports(tree, f"{PACKAGE}.x", False, known) == {f"{PACKAGE}.restraint"}


def test_find_cycle_finds_a_cycle_through_a_lazy_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_there_is_no_import_cycle(graph):
    assert find_cycle(graph) is None


def test_each_layer_imports_only_the_layers_below_it(graph):
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in sorted(graph.items())
             for t in sorted(targets) if layer(t) not in ALLOWED[layer(m)]]
    assert wrong == []


def test_the_session_imports_no_plugin(graph):
    assert [t for t in graph[f"{PACKAGE}.session"] if layer(t) == "plugins"] == []


def test_plugins_do_not_import_each_other(graph):
    """They meet through hook arguments and the session, as a third-party plugin would. Only the package's
    __init__ (which builds the plugin manager and registers the built-ins) knows them all."""
    plugin_modules = [m for m in graph if m.startswith(f"{PACKAGE}.{PLUGINS}.")]
    wrong = [f"{m} imports {t}" for m in plugin_modules for t in graph[m] if layer(t) == "plugins"]
    assert wrong == []


def _imported_names(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in the file, relative imports left out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.module or "", [alias.name for alias in node.names]))
    return found


def test_test_modules_do_not_import_each_other():
    """What they share lives in tests/helpers/ (importable) and tests/conftest.py (fixtures)."""
    files = sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "tests" / "scripts").glob("*.py"))
    wrong = [f"{path.name} imports {module}" for path in files for module, _ in _imported_names(path)
             if module.split(".")[0].startswith("test_") or module.split(".")[0] == "conftest"]
    assert wrong == []


def test_benchmarks_import_nothing_from_tests_and_no_private_name_of_the_package():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} | {"helpers"}
    wrong = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if '"tests"' in text or "'tests'" in text:
            wrong.append(f"{path.name} names the tests/ folder")
        for module, names in _imported_names(path):
            if module.split(".")[0] in test_modules:
                wrong.append(f"{path.name} imports {module}")
            if module.startswith(PACKAGE) and (any(part.startswith("_") for part in module.split("."))
                                               or any(n.startswith("_") for n in names)):
                wrong.append(f"{path.name} imports a private name of {module}: {names}")
        for node in ast.walk(ast.parse(text)):  # session._seen, spectrum._KRYLOV_MIN, ...
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                wrong.append(f"{path.name}:{node.lineno} reads .{node.attr}")
    assert wrong == []


def test_the_architecture_doc_names_every_module_of_the_core_and_the_contract():
    """docs/architecture.md draws the layers this test checks; a module moved between layers moves there too."""
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    core_part, _, rest = doc.partition("- **contract**")
    assert [m for m in sorted(CORE) if f"`{m}.py`" not in core_part] == []
    assert [m for m in sorted(CONTRACT) if f"`{m}.py`" not in rest.partition("- **plugins**")[0]] == []
    assert [m for m in sorted(CORE) if not (REPO / PACKAGE / f"{m}.py").exists()] == []
