"""Shared fixtures: every test gets its own QUEUECTL_HOME; every process a test starts is ended.

Backends: every test using ``home`` (so ``store``, ``queue``, ``cli``, ``workers``...) runs
once per backend, ids ``[sqlite]`` and ``[pg]``. The PostgreSQL run gets a fresh schema
(``qtest_<random>``) named in QUEUECTL_DB, so CLI calls and real worker processes use it;
it is dropped at teardown. Opt out with ``@pytest.mark.sqlite_only`` (tests poking SQLite
files or SQL) or by living in tests/reliability/; ``@pytest.mark.pg_only`` pins PostgreSQL;
``-m "not postgres"`` runs SQLite only.
Server: $QUEUECTL_TEST_PG_DSN (default postgresql://postgres@127.0.0.1:5432/test); when it is
unreachable the [pg] tests skip, or fail if $CI or QUEUECTL_REQUIRE_PG=1 is set.

Plain helpers live in helpers.py.
"""
from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Optional

import pytest
from click.testing import CliRunner

from helpers import PG_DSN, Workers, drop_pg_schema, kill_everything_of, pg_url, psycopg

from queuectl.cli import cli as cli_group
from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.store import open_store

# Started from a non-interactive shell's background job, pytest inherits SIGINT ignored and so
# would every process a test starts: the tests that press Ctrl-C (wait, logs --follow,
# dashboard) would hang. Processes started from here get the default disposition back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


BACKENDS = [pytest.param("sqlite", id="sqlite"),
            pytest.param("postgres", id="pg", marks=pytest.mark.postgres)]
SQLITE_ONLY_DIRS = ("reliability",)  # fault injection on SQLite files, signals, disk full
_pg_problem: "list[Optional[str]]" = []  # cached result of the first reachability check


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    pinned = metafunc.definition.get_closest_marker("sqlite_only") is not None or any(
        part in SQLITE_ONLY_DIRS for part in Path(str(metafunc.definition.path)).parts)
    if metafunc.definition.get_closest_marker("pg_only") is not None:
        params = BACKENDS[1:]
    else:
        params = BACKENDS[:1] if pinned else BACKENDS
    metafunc.parametrize("backend", params, indirect=True)


def _pg_unreachable() -> Optional[str]:
    if not _pg_problem:
        try:
            if psycopg is None:
                _pg_problem.append("psycopg is not installed (pip install -e '.[test,postgres]')")
            else:
                psycopg.connect(PG_DSN, connect_timeout=3).close()
                _pg_problem.append(None)
        except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip
            _pg_problem.append(f"PostgreSQL at {PG_DSN} is unreachable: {str(exc).strip()}")
    return _pg_problem[0]


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """"sqlite" or "postgres" (a fresh schema in QUEUECTL_DB, dropped afterwards)."""
    name = getattr(request, "param", "sqlite")
    if name != "postgres":
        monkeypatch.delenv("QUEUECTL_DB", raising=False)
        yield name
        return
    problem = _pg_unreachable()
    if problem:
        if os.environ.get("CI") or os.environ.get("QUEUECTL_REQUIRE_PG") == "1":
            pytest.fail(f"{problem} (required: CI or QUEUECTL_REQUIRE_PG=1 is set)")
        pytest.skip(problem)
    schema = f"qtest_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("QUEUECTL_DB", pg_url(schema))
    monkeypatch.delenv("QUEUECTL_PG_SCHEMA", raising=False)
    try:
        yield name
    finally:
        drop_pg_schema(schema)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> Path:
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
