"""clip-supervisor's master: process management, signals, recovery, daemon, CLI.

``__version__`` is the distribution's (see ``worker.version``), computed on first use.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    if name == "__version__":
        from worker import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
