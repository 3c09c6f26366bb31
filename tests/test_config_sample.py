"""The documented sample configuration, etc/clip-supervisor.conf, stays complete and true:
it loads, names every option of worker.config with a comment, and shows the defaults."""

from __future__ import annotations

import configparser
import os

import pytest

from tests.conftest import ROOT
from worker import config as config_mod

SAMPLE = os.path.join(ROOT, "etc", "clip-supervisor.conf")


def _commented_keys() -> set[tuple[str, str]]:
    """(section, key) of every assignment directly preceded by a comment line."""
    found = set()
    section = ""
    previous = ""
    with open(SAMPLE, encoding="utf-8") as fh:
        for line in fh:
            text = line.strip()
            if text.startswith("[") and text.endswith("]"):
                section = text[1:-1]
            elif "=" in text and not text.startswith(("#", ";")) and \
                    previous.startswith(("#", ";")):
                found.add((section, text.split("=", 1)[0].strip()))
            previous = text
    return found


def test_sample_config_loads_and_sets_every_option():
    # Given the sample and the list of every option the loader knows
    options = config_mod.options()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SAMPLE, encoding="utf-8")

    # When it is loaded (with no environment overrides)
    loaded = config_mod.load(SAMPLE, env={})

    # Then every option appears in its section, with a comment
    missing = [f"[{s}] {k}" for s, k, _, _ in options if not parser.has_option(s, k)]
    assert not missing, f"options missing from {SAMPLE}: {missing}"
    uncommented = [f"[{s}] {k}" for s, k, _, _ in options if (s, k) not in _commented_keys()]
    assert not uncommented, f"options without a comment line: {uncommented}"
    assert loaded.path == SAMPLE


def test_sample_config_shows_the_built_in_defaults():
    # Given the sample and no file at all
    sample = config_mod.load(SAMPLE, env={})
    builtin = config_mod.load(None, env={})

    # Then both give the same configuration, section by section
    for section, key, default, _ in config_mod.options():
        assert getattr(getattr(sample, section), key) == getattr(getattr(builtin, section), key), \
            f"[{section}] {key}: the sample does not show the default {default!r}"


def test_the_default_work_dir_is_in_no_folder_every_user_can_write():
    # Given the sample (which leaves work_dir to the built-in default)
    work_dir = config_mod.load(SAMPLE, env={}).job.work_dir

    # Then no folder above it lets every user make entries (as /var/tmp and /tmp do): none
    # of them could make work_dir first, or swap it for a link
    folder = os.path.dirname(work_dir)
    while True:
        if os.path.isdir(folder):
            assert not os.stat(folder).st_mode & 0o002, f"{folder} (above {work_dir})"
        if folder == "/":
            break
        folder = os.path.dirname(folder)


def test_a_host_id_that_would_break_worker_ids_is_refused():
    # Worker ids are "<host_id>:<pid>:<start-ms>": a colon in host_id made recovery at start
    # split them wrongly and leave such a host's unregistered lists alone for ever
    for bad in ("a:b", "two words", "x" * 65):
        with pytest.raises(config_mod.ConfigError, match=r"\[supervisor\] host_id"):
            config_mod.load(None, env={"CLIP_SUPERVISOR_SUPERVISOR_HOST_ID": bad})
    assert config_mod.load(None, env={"CLIP_SUPERVISOR_SUPERVISOR_HOST_ID": "enc-01.eu"}
                           ).host_id == "enc-01.eu"
