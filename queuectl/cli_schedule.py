"""``queuectl schedule ...``: parse, call queuectl/schedules.py, print. Registered on ``cli``
at the end of cli.py."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence

import click

from queuectl.timeutil import format_duration, format_instant

CATCH_UP = ("latest", "all", "none")  # schedules.CATCH_UP (not imported: keeps start-up lean)
OVERLAP = ("skip", "queue", "replace")


def _base() -> Any:
    """queuectl/cli.py's helpers, imported at call time: cli.py imports this module at its
    end, and under ``python -m queuectl.cli`` it is __main__, so a top-level import would
    load a second copy of it half-way through this one."""
    from queuectl import cli

    return cli


def _schedules(durable: bool = True) -> Any:
    from queuectl.schedules import Schedules

    return Schedules(_base()._queue(durable))


def _emit_json(data: Any) -> None:
    _base()._emit_json(data)


def _when(epoch: Optional[float], now: float) -> str:
    """A local time with how far it is: '2026-12-02 02:00:00 (in 3h12m)'."""
    if epoch is None:
        return "-"
    delta = epoch - now
    if delta >= 0:
        return f"{format_instant(epoch)} (in {_span(delta)})"
    return f"{format_instant(epoch)} ({_span(-delta)} ago)"


def _span(seconds: float) -> str:
    return "0s" if seconds < 1 else (f"{int(seconds)}s" if seconds < 60 else format_duration(seconds))


def _last(info: Dict[str, Any]) -> str:
    if not info["last_job"]:
        return "-"
    return f"{format_instant(info['last_fired_at'])} {info['last_state'] or 'purged'}"


@click.group()
def schedule() -> None:
    """Recurring jobs (instead of cron + flock): every due slot gets exactly one job,
    id NAME@<slot time>, fired by the running workers.

    \b
    Examples:
      queuectl schedule add nightly-dump --cron '30 2 * * *' --tz Europe/Berlin ./dump.sh
      queuectl schedule add sync --every 5m --timeout 4m -- rsync -a /src /dst
      queuectl schedule list
      queuectl schedule show nightly-dump
      queuectl schedule run nightly-dump      # once now, outside the slots
    """


@schedule.command("add")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--cron", metavar="EXPR", help="5-field cron expression (or @hourly, @daily, @weekly, @monthly).")
@click.option("--tz", metavar="ZONE", help="Time zone of --cron, e.g. Europe/Berlin (default: this host's).")
@click.option("--every", metavar="DURATION", help="Fixed period instead of --cron: 30s, 5m, 1h, 1d.")
@click.option("--catch-up", type=click.Choice(CATCH_UP), default="latest", show_default=True,
              help="Slots missed while no worker ran: one job for the latest, a job each, or none.")
@click.option("--overlap", type=click.Choice(OVERLAP), default="skip", show_default=True,
              help="A slot while the previous job still waits or runs: skip it, queue another, "
                   "or cancel the old one and start anew.")
@click.option("--max-retries", type=int, help="Retries after the first run (default: config max_retries).")
@click.option("--priority", "-p", type=int, help="Higher runs first (default 0).")
@click.option("--timeout", help="Kill the job after this long: 30, 5m, 2h.")
@click.option("--cwd", help="Working directory (default: current directory).")
@click.option("--group", "-g", help="The jobs' group (default: default); see `group set`.")
@click.option("--slots", type=int, help="Slots of its worker each job takes (default 1).")
@click.option("--env", "-e", "env_vars", multiple=True, metavar="NAME=VALUE",
              help="Set an environment variable for the job (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schedule_add(name: str, command: Sequence[str], cron: Optional[str], tz: Optional[str],
                 every: Optional[str], catch_up: str, overlap: str, max_retries: Optional[int],
                 priority: Optional[int], timeout: Optional[str], cwd: Optional[str],
                 group: Optional[str], slots: Optional[int], env_vars: Sequence[str],
                 as_json: bool) -> None:
    """Add a schedule NAME that enqueues COMMAND at every slot.

    The command and job options are those of `add` (one argument is run by the shell,
    several are quoted; arguments starting with '-' go after '--'). Its jobs run with the
    environment of this command, like `add`'s.
    """
    import shlex

    data: Dict[str, Any] = {"command": command[0] if len(command) == 1 else shlex.join(command)}
    for field, value in (("max_retries", max_retries), ("priority", priority),
                         ("timeout", timeout), ("cwd", cwd if cwd is not None else _base()._cwd()),
                         ("group", group), ("slots", slots)):
        if value is not None:
            data[field] = value
    if env_vars:
        from queuectl.jobspec import parse_env_assignments

        data["env"] = parse_env_assignments(list(env_vars))
    schedules = _schedules()
    info = schedules.add(name, data, cron=cron, every=every, tz=tz, catch_up=catch_up,
                         overlap=overlap, env=os.environ)
    if as_json:
        _emit_json(info)
    else:
        click.echo(f"Added schedule {info['name']}: {info['when']}; next run "
                   f"{_when(info['next_at'], time.time())}")
    _base()._print_notes(schedules.queue)


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--wide", "-w", is_flag=True, help="Do not cut the command to the terminal width.")
def schedule_list(as_json: bool, wide: bool) -> None:
    """Every schedule: when it fires, its next run and its last job."""
    schedules = _schedules(durable=False)
    rows = schedules.list()
    if rows:  # a schedule fires only while a worker runs: say so (on stderr)
        base = _base()
        base._print_notes(schedules.queue, only=base.NO_WORKERS_NOTE)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No schedules. Add one: queuectl schedule add NAME --cron '0 2 * * *' COMMAND")
        return
    now = time.time()
    table: List[List[str]] = []
    for info in rows:
        table.append([info["name"], info["when"],
                      "paused" if info["paused"] else _when(info["next_at"], now),
                      _last(info), _command(info)])
    _base()._table(table, ["NAME", "WHEN", "NEXT RUN", "LAST RUN", "COMMAND"], shrink=(4,), wide=wide)


def _command(info: Dict[str, Any]) -> str:
    command = info["command"]
    if isinstance(command, list):
        import shlex

        return shlex.join(command)
    return str(command)


@schedule.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schedule_show(name: str, as_json: bool) -> None:
    """One schedule with its next slots, recent jobs and skipped slots."""
    info = _schedules(durable=False).show(name)
    if as_json:
        _emit_json(info)
        return
    now = time.time()
    job = info["job"]
    lines = [("name", info["name"]), ("when", info["when"]), ("command", _command(info)),
             ("catch-up", info["catch_up"]), ("overlap", info["overlap"]),
             ("state", "paused" if info["paused"] else "active"),
             ("next run", "paused" if info["paused"] else _when(info["next_at"], now)),
             ("last run", f"{info['last_job']} ({info['last_state'] or 'purged'})"
              if info["last_job"] else "-"),
             ("created", format_instant(info["created_at"]))]
    options = ", ".join(f"{k}={v}" for k, v in sorted(job.items()) if k not in ("command", "cwd"))
    if options:
        lines.append(("job options", options))
    lines.append(("cwd", job.get("cwd") or "-"))
    for label, value in lines:
        click.echo(f"{label + ':':<13}{value}")
    if info["upcoming"]:
        click.echo("upcoming:")
        for slot in info["upcoming"]:
            click.echo(f"  {_when(slot, now)}")
    click.echo("recent jobs:" if info["jobs"] else "recent jobs: none yet")
    for row in info["jobs"]:
        click.echo(f"  {row['id']:<40} {row['state']:<11} {format_instant(row['finished_at'] or row['started_at'] or row['created_at'])}")
    if info["skipped"]:
        click.echo("skipped slots:")
        for skip in info["skipped"]:
            span = format_instant(skip["slot_at"]) if skip["count"] == 1 else (
                f"{skip['count']} slots {format_instant(skip['slot_at'])} … {format_instant(skip['until_at'])}")
            click.echo(f"  {span}: {skip['reason']}")


@schedule.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schedule_remove(name: str, as_json: bool) -> None:
    """Delete a schedule (the jobs it already enqueued stay)."""
    _schedules().remove(name)
    if as_json:
        _emit_json({"name": name, "removed": True})
    else:
        click.echo(f"Removed schedule {name}")


@schedule.command("pause")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schedule_pause(name: str, as_json: bool) -> None:
    """Stop firing a schedule until resumed (its slots meanwhile get no job)."""
    info = _schedules().pause(name)
    if as_json:
        _emit_json(info)
    else:
        click.echo(f"Paused schedule {name}")


@schedule.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schedule_resume(name: str, as_json: bool) -> None:
    """Fire a paused schedule again, from its next slot on."""
    info = _schedules().resume(name)
    if as_json:
        _emit_json(info)
    else:
        click.echo(f"Resumed schedule {name}; next run {_when(info['next_at'], time.time())}")


@schedule.command("run")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schedule_run(name: str, as_json: bool) -> None:
    """Enqueue the schedule's job once now (its slots are unchanged)."""
    schedules = _schedules()
    job_id = schedules.run_now(name)
    if as_json:
        _emit_json({"name": name, "id": job_id})
    else:
        click.echo(f"Enqueued job {job_id}")
    _base()._print_notes(schedules.queue)
