"""A checkpointed sequential ROME run on a tiny Llama, as a user would run it (run by test_checkpoint.py).

argv: <workdir> <mode: final|online> <weights out> [--resume] [--pause SECONDS]
Edits the records in <workdir>/edits.json with checkpoints after every edit in <workdir>/checkpoints, then writes
the edited matrices (after the sequence's end, so after a 'final' restraint) to <weights out>. --pause sleeps
after each edit, so that a test can kill the run mid-sequence.
"""
import json
import sys
import time
from pathlib import Path


import yaml
from safetensors.torch import save_file

import prune_plugin.easyedit as pe
from prune_plugin.easyedit.driver import build_editor, easyeditor_module, edit_sequentially, load_hparams
from prune_plugin.hookspecs import hookimpl
from prune_plugin.testing import ARCH, METHOD, tiny_model

workdir, mode, weights_out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
resume = "--resume" in sys.argv
pause = float(sys.argv[sys.argv.index("--pause") + 1]) if "--pause" in sys.argv else 0.0

pe.activate(easyeditor_module())
model, tok = tiny_model("llama")
templates = {k: v for k, v in ARCH["llama"].items() if k != "build"}
config = dict(alg_name="ROME", model_name="tiny", device=0, stats_dir=str(workdir / "stats"), **templates,
              **METHOD["ROME"], prune=True, prune_alpha=1.2, prune_mode=mode,
              prune_telemetry=str(workdir / "telemetry.jsonl"),
              prune_checkpoint_dir=str(workdir / "checkpoints"), prune_checkpoint_at=1, prune_seed=7)
(workdir / "rome.yaml").write_text(yaml.safe_dump(config))
editor = build_editor(load_hparams(workdir / "rome.yaml"), model, tok)
session = pe.session_of(editor)


class Pause:
    @hookimpl
    def prune_after_edit(self):
        time.sleep(pause)


session.pm.register(Pause(), name="pause")
records = json.loads((workdir / "edits.json").read_text())
edit_sequentially(editor, records, resume=resume)
save_file({n: model.get_parameter(n).detach().contiguous() for n in session.targets}, str(weights_out))
print(json.dumps({"steps": [s.index for s in session.steps]}))
