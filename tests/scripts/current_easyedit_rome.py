"""Sequential ROME with PRUNE through a current EasyEdit source checkout (run by test_easyedit_current.py).

argv: <checkout> <workdir>. Prints one JSON line with what the test checks.
"""
import json
import sys
from pathlib import Path

checkout, workdir = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, checkout)

import torch
import yaml

from prune_plugin.easyedit import installed

# The current EasyEdit imports multimodal and API packages at package import; none is used by ROME.
for name in ("av", "qwen_vl_utils", "zhipuai", "rouge"):
    installed.PLACEHOLDER_PACKAGES.setdefault(name, "parts of the current EasyEdit that ROME does not use")
easyeditor = installed.import_easyeditor()
assert not installed.is_legacy_easyeditor(easyeditor), "expected a current EasyEdit (with sequential_edit)"

import prune_plugin.easyedit as pe
from prune_plugin.easyedit.driver import build_editor
from prune_plugin.restraint import restrain_values
from prune_plugin.testing import tiny_llama

config = dict(alg_name="ROME", model_name="tiny", device="cpu", layers=[1], fact_token="subject_last",
              v_num_grad_steps=10, v_lr=0.5, v_loss_layer=3, v_weight_decay=1e-3, clamp_norm_factor=20,
              kl_factor=0.0625, mom2_adjustment=False, context_template_length_params=[[4, 5]],
              rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
              mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
              ln_f_module="model.norm", lm_head_module="lm_head", mom2_dataset="wikipedia", mom2_n_samples=100,
              mom2_dtype="float32", stats_dir=str(workdir / "stats"), max_length=40, model_parallel=False,
              prune=True, prune_alpha="linear", prune_mode="final")
path = workdir / "rome.yaml"
path.write_text(yaml.safe_dump(config))
result = {}
try:
    easyeditor.ROMEHyperParams.from_hparams(str(path))
    result["rejected_without_plugin"] = False
except TypeError:
    result["rejected_without_plugin"] = True
pe.activate(easyeditor)
hparams = easyeditor.ROMEHyperParams.from_hparams(str(path))
torch.manual_seed(0)
model, tok = tiny_llama()
with torch.no_grad():
    model.lm_head.weight.mul_(30)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
editor = build_editor(hparams, model, tok)
session = pe.session_of(editor)
name = session.targets[0]

# Measure the unrestrained dW just before the final restraint: a hook plugin sees the sequence end first.
from prune_plugin.hookspecs import hookimpl


class BeforeFinal:
    @hookimpl(tryfirst=True)
    def prune_edit_end(self, model, originals):
        w = model.get_parameter(name)
        result["smax_unrestrained"] = torch.linalg.svdvals((w - originals[name]).double())[0].item()


session.pm.register(BeforeFinal())
editor.edit(prompts=["The mother tongue of Danielle Darrieux", "The official language of Brazil"],
            target_new=["English", "Japanese"], ground_truth=["French", "Portuguese"],
            subject=["Danielle Darrieux", "Brazil"], sequential_edit=True, verbose=False)
w = model.get_parameter(name)
smax0 = session.smax.get(name, session.originals[name])
result["bound"] = max(restrain_values(torch.tensor([result["smax_unrestrained"]], dtype=torch.float64), smax0,
                                      "linear")[0].item(), smax0)
result["smax_after"] = torch.linalg.svdvals((w - session.originals[name]).double())[0].item()
result["others_unchanged"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters()
                                 if n not in session.targets)
session.restore()
result["restored"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
print(json.dumps(result))
