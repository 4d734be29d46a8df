"""The installed easyeditor, whichever generation: what every EasyEdit the plugin drives needs.

* detection: :func:`is_legacy_easyeditor` tells the packaged 0.0.1.dev0 (2023) from a current EasyEdit, whose
  ``BaseEditor.edit`` has ``sequential_edit`` (what only the 0.0.1.dev0 needs lives in legacy.py);
* import: ``import easyeditor`` imports its multimodal trainers and the methods we do not drive (torchvision, timm,
  cv2, fairscale, iopath, hydra, peft, openai, sentence_transformers; the current EasyEdit also av, qwen_vl_utils,
  zhipuai, rouge). Packages that do not import are replaced by placeholders for the duration of the import only
  (:func:`import_placeholders`, which the start-up hook puts around a plain ``import easyeditor``, and
  :func:`import_easyeditor`); using one raises ImportError. Where a package imports, it is used as it is;
* :func:`check_hparams_fit`: an hparams YAML whose module templates do not fit the model fails with the key to fix;
* :func:`reset_easyeditor_caches`: the methods' module-level caches, forgotten when an editor is built for a model.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
import threading
import types
from typing import Any, Iterator

import torch

__all__ = [
    "PLACEHOLDER_PACKAGES", "installed_easyeditor_version", "is_legacy_easyeditor", "import_placeholders",
    "import_easyeditor", "reset_easyeditor_caches", "check_hparams_fit",
]

LOG = logging.getLogger("prune_plugin")

#: Packages that ``import easyeditor`` imports but the ROME/MEMIT/FT code path never uses, with what needs them.
PLACEHOLDER_PACKAGES: dict[str, str] = {
    "torchvision": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "timm": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "cv2": "the multimodal datasets",
    "fairscale": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "iopath": "the multimodal editors (BLIP-2, MiniGPT-4)",
    "hydra": "MEND and SERAC",
    "sentence_transformers": "IKE",
    "peft": "LoRA",
    "openai": "FT-Api",
    # Imported at package import by the current EasyEdit (GitHub), none of them by an in-place method:
    "av": "the video editors",
    "qwen_vl_utils": "the Qwen-VL editors",
    "zhipuai": "the API-based editors",
    "rouge": "the safety and concept-editing evaluation",
}


# --------------------------------------------------------------------------------------------------- version


def installed_easyeditor_version() -> str | None:
    """Version of the installed ``easyeditor`` distribution, None when it is not installed as a distribution."""
    try:
        return importlib.metadata.version("easyeditor")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_legacy_easyeditor(easyeditor: types.ModuleType | None = None) -> bool:
    """True for the 2023 release, which has no ``sequential_edit`` switch on ``BaseEditor.edit``.

    With the package module given, its ``BaseEditor.edit`` signature decides (works for source checkouts too);
    otherwise the installed distribution's version does, without importing anything.
    """
    if easyeditor is not None:
        edit = easyeditor.BaseEditor.edit
        return "sequential_edit" not in inspect.signature(inspect.unwrap(edit)).parameters
    version = installed_easyeditor_version()
    return version is not None and version.startswith("0.0.1")


# --------------------------------------------------------------------------------------------------- import


class _Unavailable:
    """Stands in for anything taken from a placeholder package; calling it raises an ImportError naming it."""

    def __init__(self, name: str, root: str):
        self._name, self._root = name, root

    def __getattr__(self, attr: str) -> "_Unavailable":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}", self._root)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(
            f"{self._name} is unavailable: the package {self._root!r} did not import, and easyeditor only needs it "
            f"for {PLACEHOLDER_PACKAGES[self._root]}. Install it to use that part of easyeditor.")

    def __repr__(self) -> str:
        return f"<unavailable {self._name}>"


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an empty package for each of `roots` (and any submodule of them)."""

    def __init__(self, roots: set[str]):
        self.roots = roots
        self.served: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in self.roots or not _imported_by_easyeditor():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, f"placeholder installed by {__name__}")
        module.__path__ = []
        root = spec.name.partition(".")[0]

        def __getattr__(attr: str) -> _Unavailable:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Unavailable(f"{spec.name}.{attr}", root)

        module.__getattr__ = __getattr__
        self.served.add(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _imported_by_easyeditor() -> bool:
    """Whether the import being resolved comes from easyeditor's own code (not, say, an availability probe of
    transformers or datasets that happens to run during ``import easyeditor``)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module.startswith(("importlib", "_frozen_importlib")) or module == __name__):
            return module == "easyeditor" or module.startswith("easyeditor.")
        frame = frame.f_back
    return False


def _imports(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # a broken install (e.g. a CUDA torchvision against CPU torch) fails with any error
        return False
    return True


_placeholders_state = threading.local()


@contextlib.contextmanager
def import_placeholders() -> Iterator[set[str]]:
    """Within the block, easyeditor's own imports of the packages in :data:`PLACEHOLDER_PACKAGES` that do not import
    here get a placeholder; yields the names of those packages. Nested use is a no-op (yields an empty set).

    Afterwards the placeholders are taken out of ``sys.modules`` again, so other code that tries ``import timm``
    still gets its ImportError; easyeditor's modules keep their references. Packages that import are left alone,
    so where torchvision / timm / cv2 are installed, this does nothing.
    """
    if getattr(_placeholders_state, "active", False):
        yield set()
        return
    # Libraries that record which optional packages exist when first imported must do so before placeholders exist.
    for name in ("transformers", "datasets"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    missing = {name for name in PLACEHOLDER_PACKAGES if not _imports(name)}
    finder = _PlaceholderFinder(missing)
    sys.meta_path.insert(0, finder)
    _placeholders_state.active = True
    try:
        yield missing
    finally:
        _placeholders_state.active = False
        sys.meta_path.remove(finder)
        for name in finder.served:
            sys.modules.pop(name, None)
        if finder.served:
            LOG.debug("imported easyeditor with placeholders for %s", sorted(missing))


def import_easyeditor() -> types.ModuleType:
    """Import and return the ``easyeditor`` package, inside :func:`import_placeholders`.

    A plain ``import easyeditor`` does the same once the start-up hook is installed (pip install of this package);
    this function works without the hook too (editable installs, PRUNE_PLUGIN_AUTOLOAD=0).
    """
    if "easyeditor" in sys.modules:
        return sys.modules["easyeditor"]
    if importlib.util.find_spec("easyeditor") is None:
        raise ImportError("easyeditor is not installed: pip install --no-deps easyeditor==0.0.1.dev0 "
                          "(with the project's constraints file)")
    with import_placeholders():
        return importlib.import_module("easyeditor")


def check_hparams_fit(model: torch.nn.Module, hparams: Any) -> None:
    """Raise ValueError, naming the hparams key to fix, when a module template or layer does not fit `model`."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layers = list(getattr(hparams, "layers", []) or [])
    if not layers:
        raise ValueError(f"{hparams.alg_name} hparams: 'layers' is empty")
    for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp"):
        template = getattr(hparams, key, None)
        if not isinstance(template, str):
            continue
        for layer in layers:
            name = template.format(layer)
            if hparams.alg_name == "FT" and key == "rewrite_module_tmp":
                # FT edits every parameter whose name contains the formatted template
                if not any(name in p for p in params):
                    raise ValueError(f"FT hparams: rewrite_module_tmp {template!r} at layer {layer} matches no "
                                     f"parameter of {type(model).__name__}")
            elif name not in modules:
                raise ValueError(f"{hparams.alg_name} hparams: {key} {template!r} at layer {layer} names no module "
                                 f"of {type(model).__name__} (no {name!r})")
    if hparams.alg_name == "MEMIT":  # MEMIT reads the head and the final norm directly
        if f"{hparams.lm_head_module}.weight" not in params:
            embeddings = model.get_input_embeddings()
            tied_to = next((n for n, m in modules.items() if m is embeddings), None)
            raise ValueError(
                f"MEMIT hparams: lm_head_module {hparams.lm_head_module!r} has no own weight parameter"
                + (f"; if the head is tied to the input embeddings, set lm_head_module: {tied_to}" if tied_to else ""))
        if hparams.ln_f_module not in modules:
            raise ValueError(f"MEMIT hparams: ln_f_module {hparams.ln_f_module!r} names no module")


#: easyeditor's module-level caches, by attribute name, with their "nothing cached" value: the methods' context
#: templates (ROME, MEMIT and the methods built on them, in either generation) and covariance statistics.
MODULE_CACHES: dict[str, Any] = {"CONTEXT_TEMPLATES_CACHE": lambda: None, "COV_CACHE": dict, "inv_mom2_cache": dict}


def reset_easyeditor_caches(easyeditor: types.ModuleType | None = None) -> list[str]:
    """Forget easyeditor's module-level caches (:data:`MODULE_CACHES`) in every easyeditor module imported so far
    (one not imported yet has nothing cached); returns them as "module.attribute".

    They are keyed by nothing (templates) or by ``config._name_or_path`` (covariances), so they leak across models:
    templates generated by one model's tokenizer, or a covariance of another model with the same (often empty) name.
    """
    easyeditor = easyeditor or import_easyeditor()
    prefix = easyeditor.__name__ + "."
    reset = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for attr, fresh in MODULE_CACHES.items():
            if attr in vars(module):
                setattr(module, attr, fresh())
                reset.append(f"{name}.{attr}")
    return reset
