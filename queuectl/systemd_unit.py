"""The systemd unit `queuectl service install` writes: its text, where it goes, and removal.

The unit runs ``queuectl supervise`` in the foreground (Type=exec: the supervisor is the main
PID). KillMode=mixed sends the stop's SIGTERM to the supervisor alone, which passes it on to
its workers and waits for their running jobs; after TimeoutStopSec systemd SIGKILLs what is
left of the cgroup (jobs killed then are interrupted runs, retried as README's Guarantees say).
"""
from __future__ import annotations

import os
import pwd
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from queuectl import __version__
from queuectl.errors import InvalidInput, NotFound
from queuectl.paths import Paths

SYSTEM_DIR = "/etc/systemd/system"
PASSED_ON = ("QUEUECTL_DB", "QUEUECTL_HOST", "QUEUECTL_PG_SCHEMA")  # besides QUEUECTL_HOME


def default_dir(user: bool) -> str:
    if not user:
        return SYSTEM_DIR
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "systemd", "user")


def user_name() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def queuectl_executable() -> List[str]:
    """The installed ``queuectl`` as an absolute path: the script beside this Python (a venv's
    bin/), else the one on PATH, else this Python running the module."""
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "queuectl")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("queuectl")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "queuectl"]


@dataclass
class UnitSpec:
    user: bool
    count: int
    stop_timeout: str
    exec_start: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    run_as: Optional[str] = None
    worker_args: List[str] = field(default_factory=list)  # supervise's: --concurrency 8 --group backups

    @classmethod
    def current(cls, user: bool, count: int, stop_timeout: str, run_as: Optional[str],
                worker_args: Optional[List[str]] = None) -> "UnitSpec":
        """The unit for this home and database (the environment of this command)."""
        env = {"QUEUECTL_HOME": str(Paths().home)}
        env.update({name: os.environ[name] for name in PASSED_ON if os.environ.get(name)})
        if not user and run_as is None:
            run_as = os.environ.get("SUDO_USER") if os.getuid() == 0 else user_name()
        return cls(user, count, _timeout(stop_timeout), queuectl_executable(), env,
                   None if user else run_as, list(worker_args or []))


def _timeout(text: str) -> str:
    if text.strip().lower() == "infinity":
        return "infinity"
    from queuectl.timeutil import parse_duration

    try:
        seconds = parse_duration(text, "--stop-timeout")
    except InvalidInput:
        raise InvalidInput(f"--stop-timeout: expected a duration (30s, 10m, 2h) or "
                           f"'infinity', got {text!r}") from None
    if seconds <= 0:
        raise InvalidInput("--stop-timeout must be greater than 0")
    return f"{int(seconds) if float(seconds).is_integer() else seconds}s"


def _quote(word: str) -> str:
    """One word for ExecStart=/Environment=: %-specifiers and $ expansion escaped, quoted
    when it holds a space, a quote or a backslash."""
    word = word.replace("%", "%%")
    if any(c in word for c in ' \t"\'\\;$'):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'
    return word


def render(spec: UnitSpec) -> str:
    home = spec.env["QUEUECTL_HOME"]
    lines = [f"# Written by `queuectl service install` (queuectl {__version__});",
             "# `queuectl service uninstall` removes it.",
             "[Unit]", f"Description=queuectl workers for {home.replace('%', '%%')}"]
    if not spec.user:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += ["", "[Service]", "Type=exec",
              "ExecStart=" + " ".join(_quote(w) for w in [*spec.exec_start, "supervise",
                                                           "--count", str(spec.count),
                                                           *spec.worker_args])]
    lines += [f"Environment={_quote(f'{k}={v}')}" for k, v in spec.env.items()]
    if spec.run_as:
        lines.append(f"User={spec.run_as}")
    lines += ["# SIGTERM to the supervisor only: it stops its workers, each finishing its job.",
              "KillMode=mixed", "KillSignal=SIGTERM", f"TimeoutStopSec={spec.stop_timeout}",
              "Restart=on-failure", "RestartSec=5s", "SyslogIdentifier=queuectl",
              "", "[Install]", f"WantedBy={'default.target' if spec.user else 'multi-user.target'}", ""]
    return "\n".join(lines)


def _unit_path(directory: str, name: str) -> Path:
    if not name or "/" in name or name.startswith(".") or name.endswith(".service"):
        raise InvalidInput(f"--name must be a plain unit name without '.service', got {name!r}")
    return Path(directory) / f"{name}.service"


def write(directory: str, name: str, text: str) -> Path:
    path = _unit_path(directory, name)
    os.makedirs(directory, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def remove(directory: str, name: str) -> Path:
    path = _unit_path(directory, name)
    try:
        path.unlink()
    except FileNotFoundError:
        raise NotFound(f"no unit at {path}") from None
    return path
