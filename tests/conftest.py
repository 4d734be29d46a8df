"""Suite-wide test settings.

`@requires_easyeditor` (tests/edit_fixtures.py) marks a test `easyeditor`: it needs the packaged easyeditor
0.0.1.dev0. Such tests are skipped where easyeditor is not installed, and CI's transformers-5 environment, which
does not install it, deselects them with `-m "not easyeditor"`.
"""
import importlib.util

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # find_spec, not an import: the packaged easyeditor only imports through prune_plugin's compat layer.
    if importlib.util.find_spec("easyeditor") is not None:
        return
    skip = pytest.mark.skip(reason="easyeditor is not installed (pip install --no-deps easyeditor==0.0.1.dev0)")
    for item in items:
        if "easyeditor" in item.keywords:
            item.add_marker(skip)
