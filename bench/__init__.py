"""Benchmarks of clip-supervisor against floors measured in the same run (issue 8).

Run from the repository root with the bench venv: ``bench/.venv/bin/python -m bench.clips``;
see bench/README.md. Nothing here is imported by the package itself.
"""
