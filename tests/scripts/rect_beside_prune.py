"""RECT from examples/rect, found only through its installed entry point, beside PRUNE in sequential ROME with the
packaged easyeditor (run by test_example_rect.py in a fresh process, with the package installed on PYTHONPATH).

argv: <workdir>. Prints one JSON line with what the test checks.
"""
import json
import math
import random
import sys
from pathlib import Path

workdir = Path(sys.argv[1])
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.editing

import torch
import yaml

import prune_plugin.easyedit as pe
from prune_plugin.config import PruneConfigError
from prune_plugin.easyedit import installed, legacy
from helpers.editing import EDITS
from prune_plugin.testing import ARCH, METHOD, tiny_model

ee = installed.import_easyeditor()
pe.activate(ee)
TARGET = ARCH["llama"]["rewrite_module_tmp"].format(METHOD["ROME"]["layers"][0]) + ".weight"


def write_yaml(name, **keys):
    templates = {k: v for k, v in ARCH["llama"].items() if k != "build"}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(alg_name="ROME", model_name="tiny", device=0, stats_dir=str(workdir),
                                        **templates, **METHOD["ROME"], **keys), sort_keys=False))
    return path


def run(name, n_edits, **keys):
    torch.manual_seed(0)
    random.seed(0)
    model, tok = tiny_model("llama")
    w0 = model.get_parameter(TARGET).detach().clone()
    hparams = ee.ROMEHyperParams.from_hparams(str(write_yaml(name, **keys)))
    editor = legacy.make_editor(hparams, model, tok)
    for edit in EDITS[:n_edits]:
        editor.edit(**edit, keep_original_weight=False, verbose=False)
    session = pe.session_of(editor)
    out = {"session": session is not None}
    if session is not None:
        w = model.get_parameter(TARGET).detach()
        out["changed_entries"] = int((w != w0).sum())
        out["entries"] = w.numel()
        out["decisions"] = [d for s in session.steps for d in s.decisions if d.get("plugin") == "rect"]
        out["prune_wrote"] = [s.figures[TARGET].restrained for s in session.steps if TARGET in s.figures]
        session.restore()
        out["restored_bit_exact"] = bool(torch.equal(model.get_parameter(TARGET).detach(), w0))
    return out


result = {
    "rect_alone": run("rect", 2, prune_rect=True, prune_rect_ratio=0.1),
    # PRUNE online, 'linear' (shrinks every value >= smax(W0), as the tiny model's smax(W0) is small)
    "rect_then_prune": run("both", 1, prune=True, prune_mode="online", prune_alpha="linear",
                           prune_rect=True, prune_rect_ratio=0.1),
    "prune_alone": run("prune", 1, prune=True, prune_mode="online", prune_alpha="linear"),
    "neither": run("plain", 1),
}
result["kept_per_edit"] = math.ceil(0.1 * result["rect_alone"]["entries"])
bad = write_yaml("bad", prune_rect=True, prune_rect_ratio=2)
line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if text.startswith("prune_rect_ratio:"))
try:
    ee.ROMEHyperParams.from_hparams(str(bad))
    result["bad_ratio_error"] = None
except PruneConfigError as err:
    result["bad_ratio_error"] = str(err)
result["bad_ratio_line"] = line
print(json.dumps(result))
