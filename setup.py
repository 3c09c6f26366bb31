"""Builds die-with-parent (worker/die_with_parent.c), the program every ffmpeg is started
through so that it dies with its worker, beside the worker package; everything else about
the distribution is declared in setup.cfg.

Without a C compiler, or on an architecture the program does not support, the build says so
and goes on without it: the worker then starts ffmpeg through util-linux's
`setpriv --pdeathsig KILL`, which keeps the same guarantee at ~1 ms more CPU per start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

SOURCE = os.path.join("worker", "die_with_parent.c")
PROGRAM = "die-with-parent"
PACKAGE_DIR = os.path.join("clip_supervisor", "root", "worker")  # where worker/ installs
FLAGS = ["-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
         "-fno-stack-protector", "-fno-tree-loop-distribute-patterns",
         "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie", "-s", "-Wall", "-Werror"]


def build_program(folder: str) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print(f"setup.py: no C compiler: {PROGRAM} is not built; ffmpeg will be started "
              "through setpriv (slower)", file=sys.stderr)
        return
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, PROGRAM)
    run = subprocess.run([compiler, *FLAGS, "-o", target, SOURCE], capture_output=True,
                         text=True)
    if run.returncode != 0:
        print(f"setup.py: {PROGRAM} did not build; ffmpeg will be started through setpriv "
              f"(slower):\n{run.stderr.strip()}", file=sys.stderr)
        return
    os.chmod(target, 0o755)


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        # An editable install runs the package from the source tree: build it there.
        build_program("worker" if self.editable_mode else
                      os.path.join(self.build_lib, PACKAGE_DIR))


class BinaryDistribution(Distribution):
    """The wheel holds a compiled program, so it is tagged for this platform."""

    def has_ext_modules(self) -> bool:
        return True


if __name__ == "__main__":  # (setuptools runs it so; the tests import FLAGS)
    setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
