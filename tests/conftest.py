"""Shared fixtures: every test gets its own QUEUECTL_HOME; every process a test starts is ended.

Plain helpers live in helpers.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
from click.testing import CliRunner

from helpers import Workers, kill_everything_of

from queuectl.cli import cli as cli_group
from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.store import open_store


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private QUEUECTL_HOME; the real ~/.queuectl is never touched."""
    path = tmp_path / "qhome"
    monkeypatch.setenv("QUEUECTL_HOME", str(path))
    monkeypatch.setenv("HOME", str(tmp_path / "fakehome"))  # belt and braces
    yield path
    kill_everything_of(path)


@pytest.fixture
def paths(home: Path) -> Paths:
    return Paths(home)


@pytest.fixture
def store(paths: Paths):
    s = open_store(paths)
    yield s
    s.close()


@pytest.fixture
def queue(store) -> Queue:
    return Queue(store)


class Cli:
    """Run queuectl in-process through Click's CliRunner (stderr kept apart)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, input: Optional[str] = None, ok: bool = True):
        result = self.runner.invoke(cli_group, list(args), input=input, catch_exceptions=False)
        if ok and result.exit_code != 0:
            raise AssertionError(f"queuectl {' '.join(args)} exited {result.exit_code}: "
                                 f"{result.stdout}{result.stderr}")
        return result


@pytest.fixture
def cli(home: Path) -> Cli:
    return Cli()


@pytest.fixture
def workers(home: Path):
    w = Workers(home)
    yield w
    w.cleanup()
