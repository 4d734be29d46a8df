"""setuptools shim: everything is declared in setup.cfg except the start-up hook file.

`prune_plugin_autoload.pth` must land at the top of site-packages, which setup.cfg cannot express, so build_py
copies it next to the packages. The hook is inert unless easyeditor or lm_eval is imported, and
PRUNE_PLUGIN_AUTOLOAD=0 switches it off (see _prune_plugin_autoload.py).
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "prune_plugin_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        shutil.copy(os.path.join(here, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True):  # listed so that editable wheels carry it too
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
