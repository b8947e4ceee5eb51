"""Reliability suite: real workers, real SQLite files, faults injected from outside.

The shared fixtures (home, cli, workers) come from tests/conftest.py; this file only adds
a way to report numbers (crash-storm counts) even when pytest captures output.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def report(capsys: pytest.CaptureFixture):
    """Print a line to the real terminal, bypassing capture, so CI logs show the counts."""
    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}", flush=True)
    return emit
