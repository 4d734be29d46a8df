"""Suite-wide test settings and the fixtures several test modules share (importable helpers: tests/helpers/).

`@requires_easyeditor` (tests/helpers/editing.py) marks a test `easyeditor`: it needs the packaged easyeditor
0.0.1.dev0. Such tests are skipped where easyeditor is not installed, and CI's transformers-5 environment, which
does not install it, deselects them with `-m "not easyeditor"`.
"""
import importlib.util
import types
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # find_spec, not an import: the packaged easyeditor only imports through prune_plugin's compat layer.
    if importlib.util.find_spec("easyeditor") is not None:
        return
    skip = pytest.mark.skip(reason="easyeditor is not installed (pip install --no-deps easyeditor==0.0.1.dev0)")
    for item in items:
        if "easyeditor" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def legacy_easyeditor() -> types.ModuleType:
    """The packaged easyeditor 0.0.1.dev0, imported through the plugin's compat layer (skips without it)."""
    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("easyeditor is not installed (pip install --no-deps easyeditor==0.0.1.dev0)")
    from prune_plugin.easyedit import installed

    module = installed.import_easyeditor()
    if not installed.is_legacy_easyeditor(module):
        pytest.skip("drives the packaged 0.0.1.dev0; see test_easyedit_current.py for the current EasyEdit")
    return module


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory: EasyEdit's BaseEditor writes logs/run.log into the current one."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
