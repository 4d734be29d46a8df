"""Sequential editing with PRUNE through a current EasyEdit source checkout, for the in-place methods that read
covariance statistics (run by test_easyedit_current.py).

argv: <checkout> <workdir> <METHOD[,METHOD...]>. Prints one JSON line per method with what the test checks.

Each method starts from the checkout's own hparams YAML for a Llama model, with only the sizes changed for a tiny
Llama. The model is named after a local path (as a model loaded from a folder is): the plugin's covariance helper
must write the statistics where this EasyEdit's layer_stats looks, or the method would try to download Wikipedia,
which this script forbids.
"""
import json
import sys
from pathlib import Path

checkout, workdir, methods = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
sys.path.insert(0, checkout)

import torch
import yaml

from prune_plugin.easyedit import installed

easyeditor = installed.import_easyeditor()
assert not installed.is_legacy_easyeditor(easyeditor), "expected a current EasyEdit (with sequential_edit)"

import prune_plugin.easyedit as pe
from prune_plugin.easyedit.covariance import covariance_path, precompute_covariance
from prune_plugin.easyedit.driver import build_editor, load_hparams
from prune_plugin.hookspecs import hookimpl
from prune_plugin.testing import CORPUS, tiny_llama

pe.activate(easyeditor)

YAMLS = ("llama3.2-3b.yaml", "llama-7b.yaml", "llama3-8b.yaml", "qwen2.5-7b.yaml")  # Qwen2 names modules as Llama
# Sizes for the 4-layer tiny Llama; a key is set only where the method's own YAML has it.
TINY = dict(layers=[1, 2], v_loss_layer=3, v_num_grad_steps=10, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=20,
            kl_factor=0.0625, mom2_n_samples=100, mom2_dtype="float32", mom2_update_weight=100,
            context_template_length_params=[[4, 5]], max_length=40, model_parallel=False, fp16=False,
            lm_head_module="lm_head", batch_size=1,
            # AlphaEdit: every direction counts as unused, so P = I, and a weak L2 pull, so that its (projected,
            # regularised) update is large enough for the restraint to have work
            nullspace_threshold=1e9, L2=1e-3)
SINGLE_LAYER = {"ROME", "R-ROME"}
EDITS = dict(prompts=["The mother tongue of Danielle Darrieux", "The official language of Brazil"],
             target_new=["English", "Japanese"], ground_truth=["French", "Portuguese"],
             subject=["Danielle Darrieux", "Brazil"])
TEXTS = [" ".join(CORPUS[i:i + 12]) for i in range(0, len(CORPUS) - 12, 7)]


def forbid_downloads() -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError(f"EasyEdit tried to download a dataset {args[:2]}: the statistics were not where it looks")

    import datasets

    datasets.load_dataset = refuse
    for name, module in list(sys.modules.items()):
        if name.startswith("easyeditor.") and hasattr(module, "load_dataset"):
            module.load_dataset = refuse


def method_yaml(method: str) -> Path:
    folder = Path(checkout) / "hparams" / method
    for name in YAMLS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no Llama hparams for {method} under {folder}")


def official_restraint(delta: torch.Tensor, smax0: float) -> torch.Tensor:
    """PRUNE's 'linear' F on dW (the paper's recipe, dense float64 SVD): s >= smax(W0) becomes (s + smax(W0)) / 2."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    s = torch.where(s >= smax0, (s + smax0) / 2, s)
    return u @ torch.diag(s) @ vh


def run(method: str) -> dict:
    config = yaml.safe_load(method_yaml(method).read_text())
    config.update({k: v for k, v in TINY.items() if k in config})
    config.update(alg_name=method, model_name="tiny-llama", device="cpu",
                  prune=True, prune_alpha="linear", prune_mode="final", prune_never_enlarge=False)
    if "stats_dir" in config:
        config["stats_dir"] = str(workdir / "stats")
    if method in SINGLE_LAYER:
        config["layers"] = [1]
    if method == "KN":  # KN's hparams do not name the matrices its patch writes: every layer's MLP output
        config["prune_targets"] = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
    if "P_loc" in config:
        config["P_loc"] = str(workdir / "null_space_project.pt")  # AlphaEdit saves P as ./null_space_project.pt
    path = workdir / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    hparams = load_hparams(path)

    torch.manual_seed(0)
    model, tok = tiny_llama()
    tok.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids, which generate() would refuse
    model.config._name_or_path = str(workdir / "models" / "tiny-llama")  # a model loaded from a local folder
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    result = {"method": method, "yaml": method_yaml(method).name}
    if getattr(hparams, "mom2_adjustment", False) or method in ("MEMIT", "MEMIT-FE", "PMET", "EMMET", "EAMET",
                                                                  "AlphaEdit", "SPHERE"):
        paths = precompute_covariance(model, tok, hparams, TEXTS)
        result["stats"] = [str(p.relative_to(workdir)) for p in paths]
        result["stats_where_layer_stats_looks"] = all(
            p == covariance_path(model, hparams, layer, generation="current") and p.parts[-3] == "tiny-llama"
            for p, layer in zip(paths, sorted(hparams.layers)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = build_editor(hparams, model, tok)
    session = pe.session_of(editor)

    unrestrained = {}

    class BeforeFinal:  # a hook plugin sees the sequence end before PRUNE's final restraint
        @hookimpl(tryfirst=True)
        def prune_edit_end(self, model, originals):
            for name in session.targets:
                unrestrained[name] = (model.get_parameter(name) - originals[name]).detach().double().clone()

    session.pm.register(BeforeFinal())

    def sequence() -> dict:
        editor.edit(**EDITS, sequential_edit=True, verbose=False)
        return {n: model.get_parameter(n).detach().clone() for n in session.targets}

    first = sequence()
    result["targets"] = session.targets
    errors, restrained_any = [], False
    for name in session.targets:
        w0 = before[name].double()
        smax0 = torch.linalg.svdvals(w0)[0].item()
        expected = official_restraint(unrestrained[name], smax0)
        got = first[name].double() - w0
        errors.append(((got - expected).abs().max() / expected.abs().max()).item())
        restrained_any |= torch.linalg.svdvals(unrestrained[name])[0].item() > smax0
    result["formula_error"] = max(errors)  # relative to the largest entry of the restrained dW
    result["restraint_had_work"] = restrained_any
    result["others_unchanged"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters()
                                     if n not in session.targets)
    session.restore()
    result["restored"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # A second sequence after restore() must give what the first gave: nothing of the undone edits may linger.
    second = sequence()
    result["second_sequence_equal"] = all(torch.allclose(second[n], first[n], rtol=0, atol=1e-6) for n in first)
    # The same after restoring W0 alone (what the plugin's restore() adds is resetting the method's state).
    session.originals.restore(model)
    third = sequence()
    result["stale_state_changes_a_second_sequence"] = not all(
        torch.allclose(third[n], first[n], rtol=0, atol=1e-6) for n in first)
    session.restore()
    return result


forbid_downloads()
for method in methods:
    print(json.dumps(run(method)), flush=True)
