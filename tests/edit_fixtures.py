"""A tiny model saved as a Hugging Face folder, with a ROME hparams YAML for it: what the CLI tests pass as
--model and --hparams."""
from pathlib import Path

import pytest
import yaml

from tiny_models import save_pretrained

# Needs the packaged easyeditor: skipped where it is not installed, deselected in CI's transformers-5 leg (conftest.py).
requires_easyeditor = pytest.mark.easyeditor


def tiny_model_folder_with_rome_yaml(tmp_path: Path) -> tuple[Path, Path]:
    from test_legacy_compat import ARCH, METHOD, tiny_model

    model, tok = tiny_model("llama")
    folder = save_pretrained(model, tok, tmp_path / "tiny")
    templates = {k: v for k, v in ARCH["llama"].items() if k != "build"}
    hparams = tmp_path / "rome.yaml"
    hparams.write_text(yaml.safe_dump(dict(alg_name="ROME", model_name="tiny", device=0, stats_dir=str(tmp_path),
                                           **templates, **METHOD["ROME"])))
    return folder, hparams
