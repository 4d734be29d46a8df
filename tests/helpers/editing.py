"""Real edits of the tiny models (prune_plugin.testing) with the packaged easyeditor: requests, CounterFact-form
records, hparams YAMLs and weight snapshots shared by the test modules (which do not import each other)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from prune_plugin.testing import ARCH, CORPUS, METHOD, tiny_model

# Needs the packaged easyeditor: skipped where it is not installed, deselected in CI's transformers-5 leg (conftest.py).
requires_easyeditor = pytest.mark.easyeditor

# Each prompt ends with its subject: attention in a random 4-layer model mixes positions almost uniformly, so an
# edit at a subject token far from the end would barely reach the prediction.
EDITS = [
    dict(prompts=["The mother tongue of Danielle Darrieux"], subject=["Danielle Darrieux"], target_new=["English"],
         ground_truth=["French"]),
    dict(prompts=["The official language of Brazil"], subject=["Brazil"], target_new=["Japanese"],
         ground_truth=["Portuguese"]),
]

# CounterFact-form records whose words the tiny tokenizer knows (prune_plugin.testing.CORPUS)
RECORDS = [dict(case_id=i, prompt=p, subject=s, target_new=t, ground_truth=g, rephrase_prompt=p,
                locality_prompt="Rome is the capital of", locality_ground_truth="Italy")
           for i, (p, s, t, g) in enumerate([
               ("Toyota is a company from", "Toyota", "Germany", "Japan"),
               ("The Nile flows through", "The Nile", "Brazil", "Egypt"),
               ("Tokyo is the capital of", "Tokyo", "Canada", "Japan"),
               ("Mount Everest is in", "Mount Everest", "India", "Nepal"),
               ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs"),
               ("The Louvre is a museum in", "The Louvre", "Madrid", "Paris"),
           ])]


def write_yaml(folder: Path, alg: str, arch: str = "llama", **keys: object) -> Path:
    """An EasyEdit hparams YAML for `alg` on the tiny `arch` model, with `keys` added (prune_* keys, overrides)."""
    templates = {k: v for k, v in ARCH[arch].items() if k != "build"}
    config = dict(alg_name=alg, model_name="tiny", device=0, **templates, **METHOD[alg])
    if alg != "FT":
        config["stats_dir"] = str(folder / "stats")
    config.update(keys)
    path = folder / f"{alg}-{arch}-{len(keys)}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rome_yaml(folder: Path, **keys: object) -> Path:
    """A ROME YAML for the tiny Llama, numbered so that each call writes a new file."""
    templates = {k: v for k, v in ARCH["llama"].items() if k != "build"}
    path = folder / f"rome-{len(list(folder.glob('rome-*.yaml')))}.yaml"
    config = {"alg_name": "ROME", "model_name": "tiny", "device": 0, "stats_dir": str(folder / "stats"), **templates,
              **METHOD["ROME"], **keys}
    path.write_text(yaml.safe_dump(config))
    return path


def edit(path: Path, records: list[dict], *, resume: bool = False) -> tuple[torch.nn.Module, object]:
    """A fresh tiny Llama edited with the YAML at `path` through the driver; returns (model, editor)."""
    from prune_plugin.easyedit.driver import build_editor, edit_sequentially, load_hparams

    model, tok = tiny_model("llama")
    editor = build_editor(load_hparams(path), model, tok)
    edit_sequentially(editor, records, resume=resume)
    return model, editor


def sentences(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(CORPUS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in a if not torch.equal(a[name], b[name])}
