"""One clip-supervisor worker: fetch/ack, pipeline, storage. Never imports ``supervisor``.

``__version__`` is the distribution's version: setup.cfg's ``[metadata] version`` is its one
source, read back from the installed metadata, or from setup.cfg itself in a checkout that
was never installed. It is computed on first use (PEP 562), not at every import.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os

DISTRIBUTION = "clip-supervisor"


def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    setup_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "setup.cfg")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(setup_cfg, encoding="utf-8")
    except configparser.Error:
        return "0+unknown"
    if parser.get("metadata", "name", fallback="") != DISTRIBUTION:
        return "0+unknown"
    return parser.get("metadata", "version", fallback="0+unknown")


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
