"""CLI of running queuectl as a service: the supervisor (``supervise``, ``worker start
--supervise`` and what scale/stop/status do when one runs) and ``service install|uninstall``.

Parsing and printing only: process handling is in supervisor.py, the unit text in systemd_unit.py.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import click

from queuectl.cli_options import capacity as _capacity
from queuectl.cli_options import capacity_options as _capacity_options
from queuectl.cli_options import check_count as _check_count
from queuectl.errors import InvalidInput
from queuectl.paths import Paths
from queuectl.timeutil import format_duration

# Registered on the group by cli.py (cli.add_command), which it does not import: under
# `python -m queuectl.cli` that would load a second copy of cli.py.
_paths = Paths


# -- the supervisor ------------------------------------------------------------------------------
def _supervisor_argv(count: int, options: List[str], foreground: bool) -> List[str]:
    return [sys.executable, "-m", "queuectl.supervisor", "--home", str(_paths().home),
            "--count", str(count), *(["--foreground"] if foreground else []), *options]


def _refuse_second(paths: Any) -> None:
    from queuectl import supervisor

    state = supervisor.find(paths)
    if state is not None:
        raise InvalidInput(f"a supervisor already runs for this home (pid {state['pid']}, "
                           f"{state['wanted']} worker(s)); 'queuectl worker scale N' changes "
                           "the count, 'queuectl worker stop' stops it")


def run_foreground(count: int, options: List[str]) -> None:
    """Become the supervisor (exec: systemd's main PID stays the same process)."""
    _refuse_second(_paths())
    sys.stdout.flush()
    sys.stderr.flush()
    argv = _supervisor_argv(count, options, foreground=True)
    os.environ["QUEUECTL_HOME"] = str(_paths().home)
    os.execv(sys.executable, argv)


def start_supervised(count: int, options: List[str]) -> None:
    """worker start --supervise: a detached supervisor keeping ``count`` workers."""
    from queuectl import supervisor

    paths = _paths()
    _refuse_second(paths)
    try:
        pid = supervisor.start_detached(paths, count, options)
    except RuntimeError as exc:
        raise InvalidInput(str(exc)) from None
    state = supervisor.find(paths) or {}
    adopted = state.get("adopted", [])
    click.echo(f"Started supervisor (PID {pid}) keeping {count} worker(s) alive"
               + (f"; it took charge of {len(adopted)} already running" if adopted else ""))
    click.echo(f"Logs: {supervisor.log_path(paths)}, {paths.logs_dir}/worker-<pid>.log")


def forward_start(count: int) -> bool:
    """worker start (without --supervise) while a supervisor runs: it starts them, so they
    are kept alive too. False when no supervisor runs."""
    from queuectl import supervisor

    paths = _paths()
    state = supervisor.find(paths)
    if state is None:
        return False
    supervisor.set_wanted(paths, state["wanted"] + count)
    click.echo(f"A supervisor runs (PID {state['pid']}): asked it for {state['wanted'] + count} "
               f"worker(s) ({state['wanted']} before)")
    return True


def scale_supervised(count: int) -> bool:
    """worker scale N while a supervisor runs: it changes its count, no restart. False when
    no supervisor runs (the caller scales detached workers itself)."""
    from queuectl import supervisor

    paths = _paths()
    state = supervisor.find(paths)
    if state is None:
        return False
    supervisor.set_wanted(paths, count)
    click.echo(f"Supervisor (PID {state['pid']}): {state['wanted']} -> {count} worker(s)"
               + (" (workers asked to stop finish their current job first)"
                  if count < len(state.get("workers", [])) else ""))
    return True


def stop_supervised(wait_s: float, force: bool) -> bool:
    """worker stop while a supervisor runs: stop it (it stops its workers and waits for
    them). False when no supervisor runs."""
    from queuectl import supervisor

    paths = _paths()
    state = supervisor.find(paths)
    if state is None:
        return False
    workers = state.get("workers", []) + state.get("stopping_workers", [])
    pid, exited = supervisor.stop(paths, wait_s, force=force)
    click.echo(f"Signal sent to the supervisor (PID {pid}) and its {len(workers)} worker(s)"
               + (f": {', '.join(map(str, workers))}" if workers else ""))
    if exited:
        click.echo(f"Stopped: supervisor and {len(workers)} worker(s)")
    else:
        click.echo("Still finishing their current job (the supervisor exits when they have; "
                   "--force kills the jobs)")
    return True


def supervisor_lines(paths: Any) -> List[str]:
    """The supervisor's summary for `status` and `worker status` (none when none runs)."""
    state = supervisor_state(paths)
    if state is None:
        return []
    lines = [f"Supervisor: PID {state['pid']}, keeping {state['wanted']} worker(s) "
             f"({len(state['workers'])} running, {state['restarts']} restart(s))"
             + (", stopping" if state["stopping"] else "")]
    last = state.get("last_exit")
    backoff = state.get("backoff")
    if backoff:
        lines.append(f"  BACKING OFF: {backoff['quick_deaths']} worker(s) in a row died within "
                     f"seconds of starting (last: {last['status'] if last else '?'}); next start "
                     f"in {format_duration(backoff['next_start_in'])}; see the worker logs")
    elif last:
        lines.append(f"  last worker death: PID {last['pid']} {last['status']} after "
                     f"{format_duration(last['lived'])}")
    return lines


def supervisor_state(paths: Any) -> Optional[Dict[str, Any]]:
    from queuectl import supervisor

    return supervisor.find(paths)


@click.command("supervise")
@click.option("--count", "-n", default=1, show_default=True, help="Workers to keep alive.")
@click.option("--backoff-base", type=float, help="Override config backoff_base for the workers.")
@click.option("--log-jobs", is_flag=True, help="Workers log every job's start and completion.")
@_capacity
def supervise(count: int, backoff_base: Optional[float], log_jobs: bool, concurrency: int,
              groups: Optional[str]) -> None:
    """Keep N workers alive, in the foreground (what the systemd unit runs).

    A dead worker is replaced at once; workers that die right after starting are retried
    ever more slowly (status shows it). SIGTERM or Ctrl-C stops the workers gracefully and
    waits for their jobs; a second one kills the jobs. Workers log to this process's stderr.

    \b
    Examples:
      queuectl supervise --count 4
      queuectl worker start --count 4 --supervise   # the same, detached
    """
    from queuectl.cli import _worker_options  # at call time: no import cycle

    _check_count(count)
    run_foreground(count, _worker_options(backoff_base) + (["--log-jobs"] if log_jobs else [])
                   + _capacity_options(concurrency, groups))


# -- systemd -----------------------------------------------------------------------------------
@click.group()
def service() -> None:
    """Install queuectl's supervisor as a systemd service.

    \b
    Examples:
      queuectl service install --user --count 4 && systemctl --user enable --now queuectl
      queuectl service install --print             # show the unit, write nothing
      queuectl service uninstall --user
    """


def _unit_dir(user: bool, unit_dir: Optional[str]) -> str:
    from queuectl import systemd_unit

    return unit_dir or systemd_unit.default_dir(user)


@service.command("install")
@click.option("--user", "user_unit", is_flag=True,
              help="A user unit (~/.config/systemd/user), no root needed; else a system unit.")
@click.option("--count", "-n", default=2, show_default=True, help="Workers to keep alive.")
@click.option("--name", default="queuectl", show_default=True, help="Unit name (NAME.service).")
@click.option("--stop-timeout", default="10m", show_default=True,
              help="How long systemd waits for running jobs at stop before killing them "
                   "(a duration, or 'infinity').")
@click.option("--run-as", metavar="USER", help="System unit: the account workers run as "
              "(default: $SUDO_USER under sudo, else you).")
@click.option("--print", "print_only", is_flag=True, help="Print the unit; write nothing.")
@click.option("--unit-dir", metavar="DIR", help="Write the unit here instead.")
@_capacity
def service_install(user_unit: bool, count: int, name: str, stop_timeout: str,
                    run_as: Optional[str], print_only: bool, unit_dir: Optional[str],
                    concurrency: int, groups: Optional[str]) -> None:
    """Write a systemd unit that runs `queuectl supervise` for this home and database."""
    from queuectl import systemd_unit

    _check_count(count)
    _capacity_options(concurrency, groups)  # checked as `worker start` checks them
    worker_args = (["--concurrency", str(concurrency)] if concurrency > 1 else []) \
        + (["--group", groups] if groups is not None else [])  # `supervise`'s own options
    text = systemd_unit.render(systemd_unit.UnitSpec.current(
        user=user_unit, count=count, stop_timeout=stop_timeout, run_as=run_as,
        worker_args=worker_args))
    if print_only:
        click.echo(text, nl=False)
        return
    path = systemd_unit.write(_unit_dir(user_unit, unit_dir), name, text)
    flag = " --user" if user_unit else ""
    click.echo(f"Wrote {path}")
    click.echo(f"Enable and start it: systemctl{flag} daemon-reload && systemctl{flag} enable --now {name}")
    if user_unit:
        click.echo(f"Keep it running while you are logged out (and start it at boot): "
                   f"loginctl enable-linger {systemd_unit.user_name()}")
    click.echo(f"Worker logs: journalctl{' --user' if user_unit else ''} -u {name} -f")


@service.command("uninstall")
@click.option("--user", "user_unit", is_flag=True, help="The user unit (else the system unit).")
@click.option("--name", default="queuectl", show_default=True, help="Unit name (NAME.service).")
@click.option("--unit-dir", metavar="DIR", help="Remove the unit from here instead.")
def service_uninstall(user_unit: bool, name: str, unit_dir: Optional[str]) -> None:
    """Remove the unit `service install` wrote (stop it first: systemctl disable --now NAME)."""
    from queuectl import systemd_unit

    path = systemd_unit.remove(_unit_dir(user_unit, unit_dir), name)
    flag = " --user" if user_unit else ""
    click.echo(f"Removed {path}")
    click.echo(f"If it was enabled or running: systemctl{flag} disable --now {name} && "
               f"systemctl{flag} daemon-reload")
