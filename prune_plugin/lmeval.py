"""lm-evaluation-harness integration.

* evaluate(): run lm-eval on an in-memory Hugging Face model with this plugin's tasks, returning lm-eval's own
  results dict.
* register_entry_point_tasks(): make lm-eval 0.4.x honour the `lm_eval.tasks` entry-point group (upstream's
  proposed task-plugin discovery), so installed plugins' task folders are found without --include_path.
  _prune_plugin_autoload calls it the moment `lm_eval.tasks` is imported; unregister_entry_point_tasks() undoes it.

lm-eval is an optional dependency, so it is imported inside the functions only.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

ENTRY_POINT_GROUP = "lm_eval.tasks"

# The plugin's task groups, and each one's headline numbers as (task, metric, label): what a results table shows.
# Read them out of evaluate()'s results with headline_scores().
TASKS = ("hardedit", "collapse_ppl", "prune_general")
HEADLINE_METRICS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "hardedit": (
        ("hardedit_efficacy", "acc", "efficacy"),
        ("hardedit_generalization", "acc", "generalization"),
        ("hardedit_locality", "acc", "locality"),
        ("hardedit_efficacy", "token_acc", "efficacy token acc"),
        ("hardedit_generalization", "token_acc", "generalization token acc"),
        ("hardedit_locality", "token_acc", "locality token acc"),
    ),
    "collapse_ppl": (("collapse_ppl_paper", "mean_ppl", "collapse perplexity"),),
    "prune_general": (
        ("prune_reasoning", "acc", "reasoning (GSM8K acc)"),
        ("prune_summarization", "rouge", "summarization (SAMSum ROUGE)"),
        ("prune_open_qa", "exact_match", "open-domain QA (NQ EM)"),
        ("prune_nli", "acc", "NLI (RTE acc)"),
        ("prune_nli", "acc_loglik", "NLI (RTE, True vs False log-likelihood)"),
    ),
}
_WRAPPED_MARK = "_prune_plugin_entry_points"
_OWN_INIT_MARK = "_prune_plugin_own_init"

log = logging.getLogger(__name__)


def task_dir() -> Path:
    """The folder holding this plugin's lm-eval task YAMLs: the package prune_plugin.tasks once installed, or the
    repository's tasks/ folder when prune_plugin is imported from a source checkout (e.g. `python -m ...` run in
    the repository root puts the checkout's prune_plugin/ ahead of the installed one, and only the installation
    maps tasks/ into it)."""
    try:
        import prune_plugin.tasks
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "tasks"
        if (checkout / "hardedit").is_dir() and (checkout / "collapse_ppl").is_dir():
            return checkout
        raise
    return Path(prune_plugin.tasks.__file__).resolve().parent


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    metadata: dict[str, Any] | None = None,
    include_defaults: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict:
    """Run lm-eval's simple_evaluate on `model` (a transformers causal LM) and return lm-eval's results dict.

    tasks: task or group names, e.g. ["hardedit", "collapse_ppl", "prune_general"] (TASKS).
    metadata: task metadata, as lm-eval's --metadata (e.g. {"hardedit_path": "my_edits.json"} or
        {"prune_tasks_dir": "<folder with PRUNE's four official task files>"}).
    include_defaults: also index lm-eval's built-in tasks (about 20 s); by default only this plugin's tasks.
    model_kwargs: extra HFLM arguments (e.g. {"max_length": 512, "add_bos_token": False}); like the CLI, they
        are also visible to tasks as metadata.
    kwargs: passed on to lm_eval.simple_evaluate (e.g. bootstrap_iters, log_samples).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from prune_plugin.lmeval_ppl import register_tokenizer, unregister_tokenizer

    model_kwargs = dict(model_kwargs or {})
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **model_kwargs)
    # Tasks that count tokens (collapse_ppl_paper) find an in-memory tokenizer through this handle.
    handle = register_tokenizer(tokenizer)
    try:
        task_metadata = {**model_kwargs, "tokenizer": handle, **(metadata or {})}
        manager = TaskManager(
            include_path=[str(task_dir())], include_defaults=include_defaults, metadata=task_metadata
        )
        task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        with _environment_collected_once():
            results = simple_evaluate(model=lm, tasks=task_list, limit=limit, task_manager=manager, **kwargs)
    finally:
        unregister_tokenizer(handle)
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not the main process?)")
    return results


@contextlib.contextmanager
def _environment_collected_once() -> Iterator[None]:
    """simple_evaluate records the environment (torch's collect_env: `pip list` and other subprocesses) in every
    results dict: about 1.5 s per call on a CPU, which the main job pays once per branch. It does not change within
    a process, so collect it once and copy it into each later results dict."""
    import copy

    import lm_eval.evaluator as evaluator

    original = evaluator.add_env_info
    if getattr(original, "_prune_plugin_cached", False):  # nested call: already in place
        yield
        return
    cache: dict[str, Any] = _ENV_INFO

    def add_env_info(storage: dict[str, Any]) -> None:
        if not cache:
            original(cache)
        storage.update(copy.deepcopy(cache))

    add_env_info._prune_plugin_cached = True  # type: ignore[attr-defined]
    evaluator.add_env_info = add_env_info
    try:
        yield
    finally:
        evaluator.add_env_info = original


_ENV_INFO: dict[str, Any] = {}


def headline_scores(results: dict, groups: Sequence[str] = TASKS) -> dict[str, float]:
    """{label: value} of HEADLINE_METRICS for the groups that `results` (evaluate()'s dict) holds, in table order;
    groups that were not run are left out."""
    scores = {}
    for group in groups:
        for task, metric, label in HEADLINE_METRICS[group]:
            value = results.get("results", {}).get(task, {}).get(f"{metric},none")
            if value is not None:
                scores[label] = float(value)
    return scores


def entry_point_task_dirs(entry_points: Iterable[EntryPoint] | None = None) -> list[Path]:
    """Task folders named by the `lm_eval.tasks` entry points, in entry-point order, each listed once.

    An entry point's value is either a module or package (its folder is the task folder), or "module:attr"
    where attr is a path, a list of paths, or a zero-argument callable returning either. A broken entry point
    is logged and skipped: one bad plugin must not stop lm-eval.
    """
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    dirs: list[Path] = []
    for ep in entry_points:
        try:
            found = _dirs_of(ep)
        except Exception as err:  # noqa: BLE001 - any plugin failure is reported, never raised
            log.warning("lm_eval.tasks entry point %r (%s) skipped: %s", ep.name, ep.value, err)
            continue
        for folder in found:
            if folder not in dirs:
                dirs.append(folder)
    return dirs


def _dirs_of(ep: EntryPoint) -> list[Path]:
    if ep.value == f"{__package__}.tasks":  # this plugin's own: also found from a source checkout
        return [task_dir()]
    if ep.attr is None:
        module = importlib.import_module(ep.module)
        locations = list(getattr(module, "__path__", None) or [os.path.dirname(module.__file__)])
    else:
        target = ep.load()
        target = target() if callable(target) else target
        locations = [target] if isinstance(target, (str, os.PathLike)) else list(target)
    dirs = [Path(location).resolve() for location in locations]
    for folder in dirs:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
    return dirs


def merge_include_paths(
    plugin_dirs: Sequence[Path], include_path: str | Path | Sequence[str | Path] | None
) -> list[str | Path] | None:
    """Plugin folders first, then the user's own include paths, so the user's tasks win name clashes
    (lm-eval's TaskIndex lets later paths override earlier ones). A plugin folder the user already
    includes is not added twice."""
    user = [] if include_path is None else (
        list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    )
    user_resolved = {Path(p).resolve() for p in user}
    merged: list[str | Path] = [d for d in plugin_dirs if d.resolve() not in user_resolved] + user
    return merged or include_path


@functools.lru_cache(maxsize=1)
def _cached_plugin_dirs() -> tuple[Path, ...]:
    return tuple(entry_point_task_dirs())


# lm-eval PR #4015 ("Feat/plugin task registration", open) makes lm-eval read installed packages' `lm_eval.tasks`
# entry points itself, in the order this module gives them (built-ins, then plugin tasks, then --include_path):
# its TaskManager passes the group name to importlib.metadata.entry_points, directly or through a constant. Where
# lm-eval's code (or a TaskManager subclass) does that, the folders must not come from us as well, or lm-eval would
# index every plugin task twice.
_READS_GROUP = re.compile(r"""entry_points\([^)]*["']lm_eval\.tasks["']|^\s*\w+\s*=\s*["']lm_eval\.tasks["']""",
                          re.MULTILINE)


def _names_group(source: str) -> bool:
    return "entry_points" in source and bool(_READS_GROUP.search(source))


@functools.lru_cache(maxsize=None)
def _module_names_group(module_name: str) -> bool:
    try:
        return _names_group(inspect.getsource(sys.modules[module_name]))
    except (KeyError, OSError, TypeError):  # gone, or built without source: assume it does not
        return False


def reads_task_entry_points(manager_cls: type) -> bool:
    """Whether `manager_cls` (lm-eval's TaskManager or a subclass) reads the `lm_eval.tasks` entry points itself:
    a class of its MRO names the group to entry_points, or a loaded module of lm-eval does."""
    for cls in manager_cls.__mro__:
        if cls is object:
            continue
        if cls.__module__ == "lm_eval" or cls.__module__.startswith("lm_eval."):
            continue  # lm-eval's own classes: their whole modules are read below
        try:
            if _names_group(inspect.getsource(cls)):
                return True
        except (OSError, TypeError):
            pass
    return any(_module_names_group(name) for name in sorted(sys.modules)
               if name == "lm_eval" or name.startswith("lm_eval."))


def register_entry_point_tasks(manager_cls: type | None = None) -> None:
    """Teach lm-eval's TaskManager (or `manager_cls`) to index the `lm_eval.tasks` entry points' folders.
    Idempotent, and a no-op where lm-eval reads that group itself (:func:`reads_task_entry_points`), also for
    subclasses that do.

    They are indexed like installed tasks: after lm-eval's built-ins and before the user's include_path, and
    only when include_defaults is true (include_defaults=False keeps meaning "only my include_path").
    Nothing else about TaskManager changes: its include_path attribute still shows what the caller passed.
    """
    if manager_cls is None:
        from lm_eval.tasks.manager import TaskManager as manager_cls

    TaskManager = manager_cls
    original = TaskManager.__init__
    if getattr(original, _WRAPPED_MARK, False):
        return
    if reads_task_entry_points(TaskManager):
        log.debug("%s reads the %s entry points itself; not adding them", TaskManager.__qualname__, ENTRY_POINT_GROUP)
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if reads_task_entry_points(type(self)):  # a subclass that reads them itself
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # let lm-eval report its own argument error
        include_path = bound.arguments.get("include_path")
        if bound.arguments.get("include_defaults", True) and "include_path" in signature.parameters:
            bound.arguments["include_path"] = merge_include_paths(_cached_plugin_dirs(), include_path)
        original(*bound.args, **bound.kwargs)
        if hasattr(self, "include_path"):
            self.include_path = include_path

    setattr(__init__, _WRAPPED_MARK, True)
    setattr(__init__, _OWN_INIT_MARK, "__init__" in vars(TaskManager))  # what unregister_entry_point_tasks gives back
    TaskManager.__init__ = __init__


def unregister_entry_point_tasks(manager_cls: type | None = None) -> bool:
    """Undo :func:`register_entry_point_tasks` on lm-eval's TaskManager (or `manager_cls`): its ``__init__`` is
    the original again (or the inherited one, if the class had none of its own). Returns whether there was
    anything to undo."""
    if manager_cls is None:
        from lm_eval.tasks.manager import TaskManager as manager_cls

    wrapped = vars(manager_cls).get("__init__")
    if not getattr(wrapped, _WRAPPED_MARK, False):
        return False
    if getattr(wrapped, _OWN_INIT_MARK, True):
        manager_cls.__init__ = wrapped.__wrapped__
    else:
        delattr(manager_cls, "__init__")
    return True
