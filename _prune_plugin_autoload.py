"""Start-up hook: connects prune_plugin to lm_eval and easyeditor the moment those are imported.

`prune_plugin_autoload.pth` (installed into site-packages by `pip install .`, or by
`python -m _prune_plugin_autoload install` for editable/dev installs) imports this module at interpreter start.
It only puts a small finder at the front of sys.meta_path: when a module named in HOOKS is imported, the real
import runs unchanged and then the hook's "module:function" is called with no arguments; a module named in AROUND
is executed inside the context manager its "module:function" returns (easyeditor: placeholders for the packages
it imports but cannot use here, so that a plain `import easyeditor` works where timm or cv2 cannot be installed). Nothing else is
imported at start (no torch, lm_eval or prune_plugin), so it costs well under a millisecond, and it does nothing
in a process that never imports a hooked module. PRUNE_PLUGIN_AUTOLOAD=0 switches it off. A failing hook is a
warning; the user's import always succeeds.

    python -m _prune_plugin_autoload install|uninstall|status [--site-dir DIR]
"""
import os
import sys

# Imported module -> "module:function" to call once it has loaded. lm_eval.tasks (not lm_eval) because
# TaskManager lives there and plain `import lm_eval` should stay as cheap as lm-eval made it. That hook does
# nothing where lm-eval reads the `lm_eval.tasks` entry points itself (lm-eval PR #4015; see
# prune_plugin.lmeval.reads_task_entry_points), so tasks are never indexed twice.
HOOKS = {
    "lm_eval.tasks": "prune_plugin.lmeval:register_entry_point_tasks",
    "easyeditor": "prune_plugin.easyedit:autoactivate",
}
# Imported module -> "module:function" returning a context manager that the module's execution runs in.
AROUND = {
    "easyeditor": "prune_plugin.easyedit:autoimport",
}
ENV_SWITCH = "PRUNE_PLUGIN_AUTOLOAD"
PTH_NAME = "prune_plugin_autoload.pth"
PTH_LINE = "import _prune_plugin_autoload\n"


# The on/off words of prune_plugin.switches, which this module may not import (it runs before the package, in
# processes that may never use it); tests/test_config.py checks that both read every value alike.
OFF = ("0", "false", "no", "off")


def enabled():
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in OFF


def _warn(module_name, target, err):
    import warnings

    warnings.warn(
        f"prune_plugin: the {module_name} hook {target} failed ({type(err).__name__}: {err}); "
        f"{module_name} works as usual, without prune_plugin's additions. "
        f"Set {ENV_SWITCH}=0 to skip the hook.",
        RuntimeWarning,
        stacklevel=3,
    )


def run_hook(module_name, target):
    """Call "module:function" and return its result; any failure becomes a warning naming the hook (and None)."""
    try:
        import importlib

        hook_module, _, function = target.partition(":")
        return getattr(importlib.import_module(hook_module), function)()
    except Exception as err:  # noqa: BLE001 - the user's import must never break because of us
        _warn(module_name, target, err)
        return None


def _enter_around(module_name, target):
    """The entered context manager of an AROUND hook, or None when the hook failed (with a warning)."""
    manager = run_hook(module_name, target)
    if manager is None:
        return None
    try:
        manager.__enter__()
    except Exception as err:  # noqa: BLE001
        _warn(module_name, target, err)
        return None
    return manager


class _RunAfterExec:
    """Wraps a module's loader for one import: the real loader executes it, then the hook runs."""

    def __init__(self, loader, module_name, finder):
        self.loader = loader
        self.module_name = module_name
        self.finder = finder

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        around = self.finder.around.pop(self.module_name, None)
        manager = _enter_around(self.module_name, around) if around is not None else None
        try:
            self.loader.exec_module(module)
        finally:
            if manager is not None:
                manager.__exit__(None, None, None)
            # Afterwards the module looks exactly as if we had never been there.
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader
        target = self.finder.pending.pop(self.module_name, None)
        if target is not None:
            run_hook(self.module_name, target)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... during the import itself
        return getattr(self.loader, name)


class PostImportFinder:
    """A sys.meta_path finder that only ever answers for the modules in its hooks; each fires once, when the
    module is executed (a bare importlib.util.find_spec, e.g. an availability check, does not use it up)."""

    _prune_plugin_autoload = True  # recognisable even across module copies (e.g. run as __main__)

    def __init__(self, hooks, around=None):
        self.pending = dict(hooks)
        self.around = dict(around or {})

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending and fullname not in self.around:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "_prune_plugin_autoload", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RunAfterExec(spec.loader, fullname, self)
        return spec


def install(hooks=None, around=None):
    """Put the finder on sys.meta_path (once); hooks for modules already imported run now (their AROUND hooks
    come too late and are dropped)."""
    if not enabled():
        return None
    for finder in sys.meta_path:
        if getattr(finder, "_prune_plugin_autoload", False):
            return finder
    finder = PostImportFinder(HOOKS if hooks is None else hooks, AROUND if around is None else around)
    for name in [n for n in finder.around if n in sys.modules]:
        del finder.around[name]
    for name in [n for n in finder.pending if n in sys.modules]:
        run_hook(name, finder.pending.pop(name))
    sys.meta_path.insert(0, finder)
    return finder


def main(argv=None):
    """install | uninstall | status of the .pth in site-packages (editable installs do not carry it)."""
    import argparse
    import site
    import sysconfig

    parser = argparse.ArgumentParser(prog="python -m _prune_plugin_autoload", description=main.__doc__)
    parser.add_argument("command", choices=["install", "uninstall", "status"])
    parser.add_argument("--site-dir", default=sysconfig.get_path("purelib"),
                        help="site-packages folder to act on (default: this interpreter's, %(default)s)")
    args = parser.parse_args(argv)
    pth = os.path.join(args.site_dir, PTH_NAME)

    if args.command == "install":
        with open(pth, "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)
        print(f"installed {pth}")
    elif args.command == "uninstall":
        if not os.path.exists(pth):
            print(f"nothing to remove: {pth} does not exist")
        else:
            with open(pth, encoding="utf-8") as handle:
                if handle.read() != PTH_LINE:
                    print(f"refusing to remove {pth}: it is not ours", file=sys.stderr)
                    return 1
            os.remove(pth)
            print(f"removed {pth}")
    else:
        folders = [args.site_dir] + site.getsitepackages() + [site.getusersitepackages()]
        found = [os.path.join(d, PTH_NAME) for d in dict.fromkeys(folders) if os.path.exists(os.path.join(d, PTH_NAME))]
        active = any(getattr(f, "_prune_plugin_autoload", False) for f in sys.meta_path)
        print(f".pth files: {', '.join(found) if found else 'none'}")
        print(f"{ENV_SWITCH}: {os.environ.get(ENV_SWITCH, '(unset)')} -> {'on' if enabled() else 'off'}")
        print(f"hook active in this interpreter: {'yes' if active else 'no'}")
        for module_name, target in HOOKS.items():
            print(f"  {module_name} -> {target}")
        for module_name, target in AROUND.items():
            print(f"  {module_name} runs inside {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    install()
