"""clip-supervisor as installed: the distribution's one top-level package.

The source tree has two top-level packages, ``supervisor`` (the master) and ``worker``, and
its code, tests and tools import them by those names. ``supervisor`` is also supervisord's
package: installed at the top of site-packages, one would overwrite the other's files, and
uninstalling supervisord would delete ours. So the wheel puts them one level down, in
``clip_supervisor/root/`` (a copy of the repository's root: ``supervisor/``, ``worker/``,
``etc/clip-supervisor.conf``), where no other distribution looks, and ``activate()`` puts
that folder first on ``sys.path`` of our own processes only: the ``clip-supervisor``
command, ``python -m clip_supervisor``, and the Python processes they start (through
``PYTHONPATH``). Every module keeps its one name, ``supervisor.cli`` or ``worker.job``,
installed or not; any other program in the same environment that imports ``supervisor``
gets supervisord's.

In a checkout (or an editable install) there is no ``root/`` folder: the repository's root,
beside this package, is that folder.
"""

from __future__ import annotations

import os
import sys

__all__ = ["Client", "Event", "Job", "JobCancelled", "JobDead", "JobRefused", "activate",
           "main", "root"]

# The producer's client (clip_supervisor.client), loaded on first use: importing this package
# stays cheap for the command, which needs none of it.
_CLIENT_NAMES = frozenset({"Client", "Event", "Job", "JobCancelled", "JobDead", "JobRefused"})


def __getattr__(name: str) -> object:
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_HERE = os.path.dirname(os.path.abspath(__file__))


def root() -> str:
    """The folder that holds our ``supervisor`` and ``worker`` packages."""
    installed = os.path.join(_HERE, "root")
    return installed if os.path.isdir(os.path.join(installed, "supervisor")) \
        else os.path.dirname(_HERE)


def activate() -> str:
    """Make ``import supervisor`` and ``import worker`` find ours, in this process and in
    the Python processes it starts; returns the folder. Raises ImportError when another
    ``supervisor`` (supervisord's) was imported first: this process cannot hold both."""
    folder = root()
    for name in ("supervisor", "worker"):
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None) or ""
        if module is not None and not os.path.abspath(where).startswith(folder + os.sep):
            raise ImportError(f"clip_supervisor: another {name!r} package is already "
                              f"imported ({where or module!r}); run clip-supervisor in a "
                              "process of its own")
    if not sys.path or sys.path[0] != folder:
        sys.path.insert(0, folder)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if not paths or paths[0] != folder:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *[p for p in paths if p]])
    return folder


def main() -> int:
    """The ``clip-supervisor`` command."""
    activate()
    from supervisor.cli import main as cli_main

    return cli_main()
