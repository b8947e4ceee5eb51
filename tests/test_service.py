"""`queuectl service install|uninstall`: the unit's content, checked by systemd-analyze where
it is installed; and the size-based rotation of worker logs (logfiles.py)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from click.testing import CliRunner

from queuectl import systemd_unit
from queuectl.cli import cli


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "qhome"
    monkeypatch.setenv("QUEUECTL_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "fakehome"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("QUEUECTL_DB", raising=False)
    monkeypatch.delenv("QUEUECTL_HOST", raising=False)
    return home


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def parse(text: str) -> Dict[str, Dict[str, list]]:
    """A unit file as section -> key -> values (repeated keys keep every value)."""
    sections: Dict[str, Dict[str, list]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def verify(unit: Path) -> None:
    """systemd-analyze verify: exit 0 and not a word about our file (it only warns, exit 0,
    on a key it cannot parse)."""
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_the_user_unit_runs_the_supervisor_for_this_home(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUECTL_DB", "postgresql://queue@db.internal/jobs?schema=prod")
    result = run("service", "install", "--user", "--count", "3", "--print")
    assert result.exit_code == 0, result.output
    unit = parse(result.stdout)
    service = unit["Service"]
    assert service["Type"] == ["exec"]
    exe, *rest = shlex.split(service["ExecStart"][0])
    assert rest == ["supervise", "--count", "3"]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK)
    assert sorted(service["Environment"]) == ["QUEUECTL_DB=postgresql://queue@db.internal/jobs?schema=prod",
                                              f"QUEUECTL_HOME={env}"]
    assert service["KillMode"] == ["mixed"] and service["TimeoutStopSec"] == ["600s"]
    assert service["Restart"] == ["on-failure"]
    assert "User" not in service  # a user unit runs as its user
    assert unit["Install"]["WantedBy"] == ["default.target"]
    assert not (Path(os.environ["XDG_CONFIG_HOME"]) / "systemd").exists()  # --print writes nothing
    # The ExecStart command is a working queuectl.
    shown = subprocess.run([exe, "supervise", "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "Keep N workers alive" in shown.stdout


def test_the_system_unit_passes_systemd_analyze_verify(env: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    odd = tmp_path / "a home with 100% spaces"
    monkeypatch.setenv("QUEUECTL_HOME", str(odd))
    result = run("service", "install", "--count", "2", "--stop-timeout", "infinity", "--print")
    assert result.exit_code == 0, result.output
    unit = parse(result.stdout)
    assert unit["Unit"]["After"] == ["network-online.target"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert unit["Service"]["TimeoutStopSec"] == ["infinity"]
    assert unit["Service"]["Environment"] == [f'"QUEUECTL_HOME={str(odd).replace("%", "%%")}"']
    if os.getuid() != 0:
        assert unit["Service"]["User"] == [systemd_unit.user_name()]
    path = tmp_path / "queuectl-test.service"
    path.write_text(result.stdout)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit's content was checked, not "
                    "systemd's reading of it")
    verify(path)
    broken = tmp_path / "queuectl-broken.service"  # the check itself can fail
    broken.write_text(result.stdout.replace("Type=exec", "Type=sometimes"))
    with pytest.raises(AssertionError):
        verify(broken)


def test_the_unit_passes_slots_and_groups_to_its_workers(env: Path) -> None:
    result = run("service", "install", "--user", "-n", "2", "-c", "8", "--group", "downloads,backups",
                 "--print")
    assert result.exit_code == 0, result.output
    _exe, *rest = shlex.split(parse(result.stdout)["Service"]["ExecStart"][0])
    assert rest == ["supervise", "--count", "2", "--concurrency", "8", "--group", "downloads,backups"]


def test_install_and_uninstall_write_and_remove_the_unit(env: Path, tmp_path: Path) -> None:
    result = run("service", "install", "--user", "--count", "2")
    assert result.exit_code == 0, result.output
    path = tmp_path / "xdg" / "systemd" / "user" / "queuectl.service"
    assert path.is_file() and "supervise --count 2" in path.read_text()
    assert "systemctl --user enable --now queuectl" in result.stdout
    assert "loginctl enable-linger" in result.stdout and "journalctl --user -u queuectl" in result.stdout
    target = tmp_path / "units"
    assert run("service", "install", "--name", "jobs", "--unit-dir", str(target)).exit_code == 0
    assert (target / "jobs.service").is_file()
    assert systemd_unit.default_dir(False) == "/etc/systemd/system"

    assert run("service", "uninstall", "--user").exit_code == 0 and not path.exists()
    again = run("service", "uninstall", "--user")
    assert again.exit_code == 1 and "no unit at" in again.stderr
    assert run("service", "uninstall", "--name", "jobs", "--unit-dir", str(target)).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (("--stop-timeout", "soon"), "--stop-timeout: expected a duration"),
    (("--name", "../evil"), "--name must be a plain unit name"),
    (("--count", "0"), "--count must be from 1 to 256"),
    (("--concurrency", "0"), "--concurrency must be from 1 to 1024"),
    (("--group", "no spaces"), "group"),
])
def test_bad_install_options_are_one_line(env: Path, tmp_path: Path, args, message) -> None:
    result = run("service", "install", "--unit-dir", str(tmp_path / "u"), *args)
    assert result.exit_code == 1 and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "u").exists()


def test_a_worker_log_rotates_by_size_and_stderr_follows(tmp_path: Path) -> None:
    log = tmp_path / "worker-1.log"
    script = f"""
import logging, os, sys
from queuectl import logfiles
logfiles.MAX_BYTES = 4096
logfiles.setup("worker", {str(log)!r})
for i in range(400):
    logging.getLogger("queuectl.worker").info("line %d %s", i, "x" * 40)
os.write(2, b"a traceback written straight to fd 2\\n")
"""
    with open(log, "ab") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, timeout=60)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["worker-1.log", "worker-1.log.1", "worker-1.log.2"]
    for name in files[1:]:
        assert 4096 <= (tmp_path / name).stat().st_size < 4096 + 200
    live = log.read_text()
    assert "line 399" in live and live.endswith("a traceback written straight to fd 2\n")
    assert "line 0 " not in "".join((tmp_path / n).read_text() for n in files)  # dropped: bounded
