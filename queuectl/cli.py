"""The ``queuectl`` command line: parse, call the models layer, print. Nothing else lives here."""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import click

from queuectl import __version__
from queuectl.cli_options import capacity as _capacity
from queuectl.cli_options import capacity_options as _capacity_options
from queuectl.cli_options import check_count as _check_count
from queuectl.errors import InvalidInput, QueueError
from queuectl.paths import Paths
from queuectl.timeutil import format_duration, format_instant

STATE_NAMES = ("pending", "processing", "completed", "failed", "dead", "cancelled")
TERMINAL = ("completed", "dead", "cancelled")


# -- plumbing --------------------------------------------------------------------------------
class UserError(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    """Click prints usage, a hint, a blank line and the error; scripts and humans get the
    error and the hint on one stderr line instead (exit code stays 2)."""
    def show(file: Any = None) -> None:
        hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        message = exc.format_message()
        if isinstance(exc, click.NoSuchOption):  # the same words whatever click's version
            message = f"No such option: {exc.option_name}"
            if exc.possibilities:
                message += f" (did you mean {', '.join(sorted(exc.possibilities))}?)"
        click.echo(f"Error: {' '.join(message.split())}{hint}", err=True)

    exc.show = show  # type: ignore[method-assign]
    return exc


class QueueGroup(click.Group):
    """Turns every expected error into one line on stderr; never a traceback."""

    def make_context(self, info_name: Optional[str], args: List[str],
                     parent: Optional[click.Context] = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # e.g. `queuectl --bogus`
            raise _one_line(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QueueError as exc:
            raise UserError(str(exc)) from None
        except click.UsageError as exc:  # from any subcommand's parsing
            raise _one_line(exc)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt,
                BrokenPipeError):
            raise
        except OSError as exc:
            if os.environ.get("QUEUECTL_DEBUG"):
                raise
            raise UserError(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}") from None
        except Exception as exc:  # a bug: still one line, details on request
            if os.environ.get("QUEUECTL_DEBUG"):
                raise
            raise UserError(f"internal error: {type(exc).__name__}: {exc} "
                            "(set QUEUECTL_DEBUG=1 for a traceback)") from None

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        return super().get_command(ctx, ALIASES.get(name, name))


ALIASES = {"initdb": "init-db", "ls": "list", "requeue": "dlq-retry"}


def _paths() -> Paths:
    return Paths()


def _queue(durable: bool = True):
    """Open the store and the models layer on top (lazily: keeps start-up fast)."""
    from queuectl.models import Queue
    from queuectl.store import open_store

    return Queue(open_store(_paths(), "cli" if durable else "reader"))


SHOW_TAIL_CHARS = 4096  # what `show` prints of the stored output tail (`logs` prints it all)
NO_WORKERS_NOTE = "note: no workers are running; start them with: queuectl worker start"
PAUSED_NOTE = "note: the queue is paused; 'queuectl resume' to continue"


def _notes(queue: Any) -> List[str]:
    """Why jobs may not run soon: no live worker, or the queue is paused.

    The ONE place that decides whether a worker runs: this host's PID files, else a live
    worker of any host in the database's registry. It stays cheap because `add` calls it:
    a PID file is checked without importing the launcher, the registry is one read.
    """
    notes = []
    paths = _paths()
    try:
        names = os.listdir(paths.workers_dir)
    except OSError:
        names = []
    running = False
    if any(n.endswith(".json") and not n.startswith(".") for n in names):
        from queuectl import worker_launcher

        running = bool(worker_launcher.list_workers(paths, clean=False))
    if not running:
        running = any(not row["gone"] for row in queue.registry())
    if not running:
        notes.append(NO_WORKERS_NOTE)
    if queue.paused():
        notes.append(PAUSED_NOTE)
    return notes


def _print_notes(queue: Any, only: Optional[str] = None) -> None:
    """The notes on stderr (never stdout: --json and --quiet output stays parseable)."""
    for note in _notes(queue):
        if only is None or note == only:
            click.echo(note, err=True)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _command_text(job: Dict[str, Any]) -> str:
    if job.get("argv"):
        import shlex

        return shlex.join(json.loads(job["command"]))
    return job["command"]


def _public(job: Dict[str, Any]) -> Dict[str, Any]:
    """A job as users see it in --json: command decoded, internal columns dropped."""
    from queuectl.store import INTERNAL_COLUMNS

    out = {k: v for k, v in job.items() if k not in INTERNAL_COLUMNS}
    if "grp" in job:
        out["group"] = job["grp"]
    if job.get("argv") and isinstance(job.get("command"), str):
        out["command"] = json.loads(job["command"])
    return out


def _terminal_width() -> int:
    """Columns of the terminal; $COLUMNS, else 80 when stdout is not a terminal."""
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def _fit(widths: List[int], headers: List[str], shrink: Sequence[int], limit: int) -> List[int]:
    """Narrow the ``shrink`` columns (widest first, never below their header or 10) until
    the row fits in ``limit`` characters."""
    widths = list(widths)
    floor = {i: max(len(headers[i]), 10) for i in shrink}
    excess = sum(widths) + 2 * (len(widths) - 1) - limit
    while excess > 0:
        candidates = sorted((i for i in shrink if widths[i] > floor[i]), key=lambda i: -widths[i])
        if not candidates:
            break
        first = candidates[0]
        runner_up = widths[candidates[1]] if len(candidates) > 1 else 0
        target = max(floor[first], runner_up, widths[first] - excess)
        if target == widths[first]:  # tie with the runner-up: take one off each in turn
            target -= 1
        excess -= widths[first] - target
        widths[first] = target
    return widths


def _table(rows: List[List[str]], headers: List[str], shrink: Sequence[int] = (),
           wide: bool = False) -> None:
    """Print aligned columns; unless ``wide``, the ``shrink`` columns are cut with '…' so
    each line fits the terminal."""
    rows = [[" ".join(c.split()) if i in shrink else c for i, c in enumerate(r)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    if not wide and shrink:
        widths = _fit(widths, headers, shrink, _terminal_width())
        rows = [[_short(c, widths[i]) if i in shrink else c for i, c in enumerate(r)] for r in rows]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    click.echo(line)
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _job_rows(jobs: List[Dict[str, Any]], with_error: bool = False, wide: bool = False) -> None:
    rows = []
    now = time.time()
    for job in jobs:
        if job["state"] in ("pending", "failed"):
            when = "now" if job["run_at"] <= now else "in " + format_duration(job["run_at"] - now)
        elif job["state"] == "processing":
            when = "since " + format_instant(job["started_at"])
        else:
            when = format_instant(job["finished_at"] or job["updated_at"])
        row = [job["id"], job["state"], str(job["attempts"]), str(job["priority"]), when,
               _command_text(job)]
        if with_error:
            row.append(job["last_error"] or "")
        rows.append(row)
    headers = ["ID", "STATE", "ATTEMPTS", "PRIORITY", "RUN/FINISHED", "COMMAND"]
    _table(rows, headers + (["LAST ERROR"] if with_error else []),
           shrink=(5, 6) if with_error else (5,), wide=wide)


# -- the group ---------------------------------------------------------------------------------
def _set_db(_ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> None:
    """--db sets QUEUECTL_DB itself, so the workers this command spawns use the same queue."""
    if value:
        os.environ["QUEUECTL_DB"] = value


@click.group(cls=QueueGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="queuectl")
@click.option("--db", metavar="URL", callback=_set_db, expose_value=False, is_eager=True,
              help="Queue database: postgresql://USER@HOST/DB[?schema=NAME] (needs the "
                   "'postgres' extra) or an SQLite path. Default: $QUEUECTL_DB, else "
                   "queue.db in the home.")
def cli() -> None:
    """queuectl: a persistent background job queue for shell commands.

    \b
    Data lives in ~/.queuectl (or $QUEUECTL_HOME): queue.db, workers/, logs/;
    the queue itself can live in PostgreSQL instead (--db or $QUEUECTL_DB).
    \b
    Quick tour:
      queuectl add "echo hello"                  # or: queuectl enqueue '{"command":"echo hello"}'
      queuectl worker start --count 2            # detached workers
      queuectl status
      queuectl list --state completed
      queuectl show 1 ; queuectl logs 1
      queuectl worker stop
    """


@cli.command("init-db")
def init_db() -> None:
    """Create the database if needed (idempotent) and print where it is.

    Every command creates it on first use; this just makes it explicit. Alias: initdb.
    """
    queue = _queue()
    click.echo(f"database ready: {queue.store.location}")


# -- enqueue / add -----------------------------------------------------------------------------
CHUNK = 10_000  # lines parsed and inserted at a time: a bulk enqueue's memory does not grow with it


def _open_source(source: str) -> Any:
    if source == "-":
        return sys.stdin
    try:
        return open(source, encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror}") from None


def _read_chunks(source: str, handle: Any) -> Any:
    """Parse JSON Lines (a JSON array also works, read whole) line by line; yields
    (objects, their line numbers) of at most CHUNK lines."""
    loads = json.loads
    # The decoder's scanner without json.loads' per-call wrapping halves parsing time for
    # 100k-line files; anything it does not take whole goes through json.loads as before.
    scan = json.JSONDecoder().scan_once
    items: List[Any] = []
    lines: List[int] = []
    number = 0
    first = True
    try:
        for number, line in enumerate(handle, 1):
            stripped = line.strip()
            if not stripped or stripped[0] == "#":
                continue
            if first:
                first = False
                if stripped[0] == "[":  # one JSON array: the old format, parsed whole
                    text = line + handle.read()
                    try:
                        array = json.loads(text)
                    except ValueError as exc:
                        raise InvalidInput(f"malformed JSON in {source}: {exc}") from None
                    if not isinstance(array, list):
                        raise InvalidInput(f"malformed JSON in {source}: expected one object per line")
                    for start in range(0, len(array), CHUNK):
                        part = array[start:start + CHUNK]
                        yield part, list(range(start + 1, start + len(part) + 1))
                    return
            body = line.strip(" \t\r\n")  # exactly JSON's whitespace
            try:
                item, end = scan(body, 0)
                whole = end == len(body)
            except (ValueError, StopIteration):
                whole = False
            if not whole:
                try:
                    item = loads(line)
                except ValueError as exc:
                    raise InvalidInput(f"line {number}: malformed JSON: {exc}") from None
            items.append(item)
            lines.append(number)
            if len(items) == CHUNK:
                yield items, lines
                items, lines = [], []
    except UnicodeDecodeError:
        raise InvalidInput(f"{source} is not UTF-8 text"
                           + (f" (after line {number})" if number else "")) from None
    if items:
        yield items, lines


class _Results:
    """What an enqueue did, without keeping one object per job: counts, first and last id,
    and (only for --quiet/--json) the ids, spooled to a temporary file past a few MB."""

    def __init__(self, keep_ids: bool = False) -> None:
        self.total = self.created = self.replaced = 0
        self.first: Any = None
        self.last: Any = None
        self.spool: Any = None
        if keep_ids:
            import tempfile

            self.spool = tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8")

    def add(self, results: Sequence[Any]) -> None:
        if not results:
            return
        if self.first is None:
            self.first = results[0]
        self.last = results[-1]
        self.total += len(results)
        self.created += sum(1 for r in results if r.created)
        self.replaced += sum(1 for r in results if r.replaced)
        if self.spool is not None:
            self.spool.write("".join(f"{'+' if r.created else '-'}{r.id}\n" for r in results))

    def ids(self, which: Optional[bool] = None) -> Any:
        """The ids in order (all, or only created/skipped), read back from the spool."""
        self.spool.seek(0)
        for line in self.spool:
            if which is None or (line[0] == "+") == which:
                yield line[1:-1]


def _specs_of(items: Sequence[Any], where: Any, now: float, cwd: Optional[str],
              extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    from queuectl.jobspec import parse_job

    specs = []
    for index, item in enumerate(items):
        try:
            spec = parse_job(item, now=now, default_cwd=cwd)
        except QueueError as exc:
            raise type(exc)(f"{where(index)}{exc}") from None
        if extra:
            spec.update(extra)
        specs.append(spec)
    return specs


def _cwd() -> Optional[str]:
    try:
        return os.getcwd()
    except OSError:
        return None


def _submit(items: Sequence[Any], where: Sequence[str], if_exists: str,
            keep_ids: bool = False, extra: Optional[Dict[str, Any]] = None) -> "tuple[Any, _Results]":
    """Validate and enqueue in one transaction; returns (the queue, what it did)."""
    specs = _specs_of(items, where.__getitem__, time.time(), _cwd(), extra)
    if not specs:
        raise InvalidInput("no jobs given")
    queue = _queue()
    try:
        results = queue.enqueue(specs, if_exists=if_exists, env=os.environ)
    except QueueError as exc:
        index = getattr(exc, "index", None)
        prefix = where[index] if index is not None else ""
        raise type(exc)(f"{prefix}{exc}") from None
    summary = _Results(keep_ids)
    summary.add(results)
    return queue, summary


def _submit_file(source: str, if_exists: str, keep_ids: bool) -> "tuple[Any, _Results]":
    """A bulk enqueue that streams the file: CHUNK lines are parsed and inserted at a time,
    all in ONE transaction, so memory stays flat whatever the file's size."""
    now, cwd = time.time(), _cwd()
    handle = _open_source(source)
    bar = None
    if handle is not sys.stdin and sys.stderr.isatty():
        size = os.fstat(handle.fileno()).st_size
        if size > 16 << 10:  # about a thousand short lines
            bar = click.progressbar(length=size, label="enqueueing", file=sys.stderr)
            bar.__enter__()
    current: Dict[str, List[int]] = {"lines": []}

    def chunks() -> Any:
        position = 0
        for items, lines in _read_chunks(source, handle):
            current["lines"] = lines
            yield _specs_of(items, lambda i: f"line {lines[i]}: ", now, cwd)
            if bar is not None:
                try:
                    now_at = handle.tell()
                except (OSError, ValueError):
                    now_at = position
                bar.update(max(now_at - position, 0))
                position = now_at

    summary = _Results(keep_ids)
    queue = _queue()
    try:
        queue.enqueue_chunks(chunks(), if_exists=if_exists, env=os.environ, on_results=summary.add)
    except QueueError as exc:
        index = getattr(exc, "index", None)
        prefix = f"line {current['lines'][index]}: " if index is not None else ""
        raise type(exc)(f"{prefix}{exc}") from None
    finally:
        if bar is not None:
            bar.update(bar.length - bar.pos)
            bar.__exit__(None, None, None)
        if handle is not sys.stdin:
            handle.close()
    return queue, summary


def _report(queue: Any, results: _Results, quiet: bool, as_json: bool,
            single: bool = False) -> None:
    """Print what an enqueue did: the default lines scripts already parse, only the ids
    (--quiet), or JSON (--json); then, on stderr, why the jobs may not start soon."""
    if as_json:
        if single:
            first = results.first
            data = {"id": first.id, "created": bool(first.created)}
            if first.replaced:
                data["replaced"] = True
            _emit_json(data)
        else:
            # Written piece by piece (the same text as json.dumps(indent=2)): a million ids
            # would otherwise be a million-item list in memory.
            out = sys.stdout
            out.write('{\n  "ids": [')
            for n, job_id in enumerate(results.ids(True)):
                out.write(("," if n else "") + "\n    " + json.dumps(job_id))
            out.write(("\n  " if results.created else "") + f'],\n  "created": {results.created},\n'
                      '  "skipped": [')
            n = -1
            for n, job_id in enumerate(results.ids(False)):
                out.write(("," if n else "") + "\n    " + json.dumps(job_id))
            out.write(("\n  " if n >= 0 else "") + "]\n}\n")
            out.flush()
    elif quiet:
        for job_id in results.ids():
            click.echo(job_id)
    elif results.total == 1:
        result = results.first
        if result.replaced:
            click.echo(f"Requeued job {result.id} (it had finished; its history is kept)")
        elif result.created:
            click.echo(f"Enqueued job {result.id}")
        else:
            # Same word position as "Enqueued job ID": `awk '{print $3}'` gets the id either way.
            click.echo(f"Existing job {result.id} already holds that id or unique key; nothing enqueued")
    else:
        created_n = results.created
        skipped_n = results.total - created_n
        click.echo(f"Enqueued {created_n} jobs"
                   + (f" ({skipped_n} skipped: id or unique key active)" if skipped_n else "")
                   + (f" ({results.replaced} replaced finished jobs)" if results.replaced else "")
                   + (f": {results.first.id} … {results.last.id}" if created_n else ""))
    _print_notes(queue)


def _output_options(func: Any) -> Any:
    """--quiet / --json for the commands that add jobs."""
    func = click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable result (ids created and skipped).")(func)
    return click.option("--quiet", "-q", is_flag=True, help="Print only the job id(s), one per line.")(func)


@cli.command()
@click.argument("job_json", required=False)
@click.option("--file", "-f", "source", metavar="PATH", help="JSON Lines file ('-' = stdin); all jobs in one transaction.")
@click.option("--if-exists", type=click.Choice(["error", "skip", "replace"]), default="error", show_default=True,
              help="When a job with the same id or unique_key is active: fail, or (skip) print its id "
                   "and exit 0; replace re-queues a finished job with the same id.")
@_output_options
def enqueue(job_json: Optional[str], source: Optional[str], if_exists: str, quiet: bool,
            as_json: bool) -> None:
    """Add a job described as JSON.

    \b
    Fields: command (required: string = shell, list = argv without shell), id, max_retries,
    priority (higher first), run_at (ISO-8601 or epoch) or delay (seconds), timeout (seconds),
    cwd (default: current directory), after (ids that must complete first), unique_key,
    env ({"NAME": "value"}: over the captured environment).
    A JSON array, or --file with one JSON object per line, adds many jobs all-or-nothing.
    \b
    Examples:
      queuectl enqueue '{"id":"job1","command":"echo Hello"}'
      queuectl enqueue '{"command":["tar","czf","/tmp/b.tgz","/etc"],"max_retries":5,"timeout":600}'
      queuectl enqueue '{"command":"./report.sh","run_at":"2030-01-01T09:00:00Z","priority":10}'
      queuectl enqueue --file jobs.jsonl
      generate_jobs | queuectl enqueue --file -
      id=$(queuectl enqueue -q '{"command":"make"}')
      queuectl enqueue --json --file jobs.jsonl | jq '.ids'
    """
    if (job_json is None) == (source is None):
        raise InvalidInput("give one job as a JSON argument, or --file PATH (use '-' for stdin)")
    keep = quiet or as_json
    if source is not None:
        # 100k parsed objects made the cyclic GC rescan the whole heap again and again (a
        # fifth of a bulk enqueue); this short-lived process creates no cycles worth it.
        gc.disable()
        _report(*_submit_file(source, if_exists, keep), quiet, as_json)
        return
    try:
        data = json.loads(job_json)
    except ValueError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    if isinstance(data, list):
        _report(*_submit(data, [f"job {i + 1}: " for i in range(len(data))], if_exists, keep),
                quiet, as_json)
    else:
        _report(*_submit([data], [""], if_exists, keep), quiet, as_json)


@cli.command()
@click.argument("command", nargs=-1, required=True)
@click.option("--id", "job_id", help="Job id (default: the next number).")
@click.option("--max-retries", type=int, help="Retries after the first run (default: config max_retries).")
@click.option("--priority", "-p", type=int, help="Higher runs first (default 0).")
@click.option("--run-at", help="Earliest start: ISO-8601 (2025-12-01T10:00:00Z) or epoch seconds.")
@click.option("--delay", help="Earliest start as a delay: 30, 30s, 5m, 2h, 1d.")
@click.option("--timeout", help="Kill the job after this long: 30, 5m, 2h.")
@click.option("--cwd", help="Working directory (default: current directory).")
@click.option("--after", help="Comma-separated ids that must complete first.")
@click.option("--unique-key", help="Refuse if an active job holds this key.")
@click.option("--group", "-g", "group", metavar="G", help="The job's group (default: default); see 'group set'.")
@click.option("--slots", type=int, metavar="K", help="Slots of its worker the job takes (default 1).")
@click.option("--env", "-e", "env_vars", multiple=True, metavar="NAME=VALUE",
              help="Set an environment variable for the job (repeatable; over the captured environment).")
@click.option("--if-exists", type=click.Choice(["error", "skip", "replace"]), default="error", show_default=True,
              help="When --id or --unique-key is taken: fail; skip (an active job holds it: print its "
                   "id, exit 0); replace (re-queue the finished job --id with this command).")
@_output_options
def add(command: Sequence[str], job_id: Optional[str], max_retries: Optional[int],
        priority: Optional[int], run_at: Optional[str], delay: Optional[str], timeout: Optional[str],
        cwd: Optional[str], after: Optional[str], unique_key: Optional[str], group: Optional[str],
        slots: Optional[int], env_vars: Sequence[str], if_exists: str, quiet: bool,
        as_json: bool) -> None:
    """Add a job from the command line, no JSON quoting needed.

    One argument is run by the shell; several are quoted so each stays one argument.
    Options may come before or after the command, and an unknown one is an error (a typo
    never becomes part of the command). A command with arguments starting with '-' goes
    after '--': everything after it is the command, verbatim.

    \b
    Examples:
      queuectl add "echo 'Hello World'"
      queuectl add "sleep 2" --max-retries 5
      queuectl add "echo 'Urgent!'" --priority 10
      queuectl add "echo later" --run-at "2025-12-01T10:00:00Z"
      queuectl add --timeout 5m --unique-key nightly-backup -- rsync -a /src /dst
      queuectl add --after 12,13 "make report"
      queuectl add -- rsync -a --delete /src /dst
      queuectl add --env TARGET=/mnt/nas 'echo $TARGET'
      queuectl add ./backup.sh --id nightly --if-exists replace   # every night, same id
      queuectl add --group downloads -- curl -fsSO https://example.org/big.iso
      queuectl add --slots 4 "make -j4"                          # takes 4 of a worker's slots
      id=$(queuectl add -q "make build")
    """
    if len(command) == 1:
        text = command[0]
    else:
        import shlex

        text = shlex.join(command)
    data: Dict[str, Any] = {"command": text}
    for name, value in (("id", job_id), ("max_retries", max_retries), ("priority", priority),
                        ("run_at", run_at), ("delay", delay), ("timeout", timeout), ("cwd", cwd),
                        ("after", after), ("unique_key", unique_key), ("group", group),
                        ("slots", slots)):
        if value is not None:
            data[name] = value
    if env_vars:
        from queuectl.jobspec import parse_env_assignments

        data["env"] = parse_env_assignments(list(env_vars))
    _report(*_submit([data], [""], if_exists, quiet or as_json), quiet, as_json, single=True)


# -- workers -----------------------------------------------------------------------------------
def _worker_options(backoff_base: Optional[float]) -> List[str]:
    if backoff_base is None:
        return []
    from queuectl import config as cfg

    try:
        cfg.parse_value("backoff_base", backoff_base)
    except InvalidInput as exc:
        raise InvalidInput(f"--backoff-base: {exc}") from None
    return ["--backoff-base", repr(backoff_base)]


@cli.group(invoke_without_command=True)
@click.option("--count", "-n", default=1, show_default=True, help="Workers to run attached (Ctrl-C stops).")
@click.option("--backoff-base", type=float, help="Override config backoff_base for these workers.")
@_capacity
@click.pass_context
def worker(ctx: click.Context, count: int, backoff_base: Optional[float], concurrency: int,
           groups: Optional[str]) -> None:
    """Run workers attached (no subcommand), or manage detached ones.

    \b
    Examples:
      queuectl worker start --count 3        # detached; returns at once
      queuectl worker start -n 3 --supervise # ... kept alive by a supervisor
      queuectl worker status
      queuectl worker stop                   # graceful: current jobs finish
      queuectl worker -n 4 --backoff-base 3  # attached to this terminal; Ctrl-C stops
      queuectl worker start -n 1 -c 8 --group downloads   # one process, 8 jobs at once
    """
    if ctx.invoked_subcommand is None:
        _check_count(count)
        options = _worker_options(backoff_base) + _capacity_options(concurrency, groups)
        _queue()  # fail fast (and create the DB) before starting anything
        from queuectl import worker_launcher

        ctx.exit(worker_launcher.run_attached(_paths(), count, options))


@worker.command("start")
@click.option("--count", "-n", default=1, show_default=True, help="How many workers.")
@click.option("--foreground/--background", default=False,
              help="Attach to this terminal and log each job (default: detached).")
@click.option("--backoff-base", type=float, help="Override config backoff_base for these workers.")
@click.option("--log-jobs", is_flag=True,
              help="Detached workers log every job's start and completion too (failures always are).")
@click.option("--supervise", is_flag=True,
              help="Start a supervisor that keeps the N workers alive (with --foreground: "
                   "the same as `queuectl supervise`).")
@_capacity
def worker_start(count: int, foreground: bool, backoff_base: Optional[float], log_jobs: bool,
                 supervise: bool, concurrency: int, groups: Optional[str]) -> None:
    """Start N workers; detached by default (PID files in workers/, logs in logs/).

    Each runs up to --concurrency jobs at once (its slots), of every group or only of
    --group G[,G2].
    """
    _check_count(count)
    options = (_worker_options(backoff_base) + (["--log-jobs"] if log_jobs else [])
               + _capacity_options(concurrency, groups))
    queue = _queue()
    from queuectl import cli_service, worker_launcher

    paths = _paths()
    if supervise:
        if foreground:
            cli_service.run_foreground(count, options)
        cli_service.start_supervised(count, options)
        return
    if not foreground and cli_service.forward_start(count):
        return
    if foreground:
        if queue.paused():
            _print_notes(queue, only=PAUSED_NOTE)
        sys.exit(worker_launcher.run_attached(paths, count, options))
    already = [w for w in worker_launcher.list_workers(paths) if not w.stopping]
    if already:
        click.echo(f"{len(already)} worker(s) already running; starting {count} more "
                   f"({len(already) + count} in all; 'queuectl worker scale N' sets the total)")
    pids = worker_launcher.start_detached(paths, count, options)
    click.echo(f"Started {len(pids)} worker(s) in the background with PIDs: {', '.join(map(str, pids))}")
    click.echo(f"Logs: {paths.logs_dir}/worker-<pid>.log")
    if queue.paused():
        _print_notes(queue, only=PAUSED_NOTE)


@worker.command("scale")
@click.argument("count", type=int)
@click.option("--backoff-base", type=float, help="Override config backoff_base for workers started now.")
@click.option("--log-jobs", is_flag=True, help="Workers started now log every job's start and completion.")
@_capacity
def worker_scale(count: int, backoff_base: Optional[float], log_jobs: bool, concurrency: int,
                 groups: Optional[str]) -> None:
    """Start detached workers, or gracefully stop (SIGTERM) the newest ones, until COUNT run.

    Workers asked to stop finish their current job first (worker status shows them as
    stopping) and do not count.

    
    Examples:
      queuectl worker scale 4
      queuectl worker scale 0      # like worker stop, without waiting
    """
    if not (0 <= count <= 256):
        raise InvalidInput(f"COUNT must be from 0 to 256, got {count}")
    options = (_worker_options(backoff_base) + (["--log-jobs"] if log_jobs else [])
               + _capacity_options(concurrency, groups))
    queue = _queue()
    from queuectl import cli_service, worker_launcher

    if cli_service.scale_supervised(count):
        return
    started, stopped, before = worker_launcher.scale_workers(_paths(), count, options)
    if started:
        click.echo(f"Started {len(started)} worker(s) with PIDs: {', '.join(map(str, started))} "
                   f"({before} -> {count} running)")
    elif stopped:
        click.echo(f"Asked {len(stopped)} worker(s) to stop after their current job: "
                   f"{', '.join(map(str, stopped))} ({before} -> {count} running)")
    else:
        click.echo(f"{before} worker(s) running already; nothing to do")
    if queue.paused() and count:
        _print_notes(queue, only=PAUSED_NOTE)


@worker.command("stop")
@click.option("--wait", "wait_s", default=10.0, show_default=True, type=float,
              help="Seconds to wait for workers to finish their current job and exit.")
@click.option("--force", is_flag=True, help="Kill running jobs (they go back to the retry path).")
@click.option("--all-hosts", is_flag=True,
              help="Ask every host's workers to stop, through the database.")
def worker_stop(wait_s: float, force: bool, all_hosts: bool) -> None:
    """Stop every live worker of this host: SIGTERM, each finishes its current job and exits.

    Stale PID files (dead process, or a PID now used by another program) are removed and
    never signalled. --all-hosts asks every registered worker of every host through the
    database instead (each sees it within about a second, then stops as on SIGTERM, or as
    --force), and waits up to --wait for them to be gone.
    """
    from queuectl import cli_service, worker_launcher

    if all_hosts:
        _stop_all_hosts(wait_s, force)
        return
    if cli_service.stop_supervised(wait_s, force):
        return
    report = worker_launcher.stop_workers(_paths(), wait=wait_s, force=force)
    if not report.signalled:
        click.echo("No running workers.")
        return
    click.echo(f"Signal sent to {len(report.signalled)} worker(s): {', '.join(map(str, report.signalled))}")
    if report.exited:
        click.echo(f"Stopped: {len(report.exited)}")
    if report.killed:
        click.echo(f"Killed after --wait expired: {', '.join(map(str, report.killed))}")
    if report.running:
        click.echo(f"Still finishing their current job: {', '.join(map(str, report.running))} "
                   "(they exit when it ends; --force kills the job)")


def _stop_all_hosts(wait_s: float, force: bool) -> None:
    """worker stop --all-hosts: set the registry's stop flag, wait for the rows to go."""
    queue = _queue()
    asked = queue.request_stop(force=force)
    if not asked:
        click.echo("No running workers.")
        return
    hosts = sorted({worker_id.rsplit(":", 2)[0] for worker_id in asked})
    click.echo(f"Stop requested{' (forced)' if force else ''} through the database for "
               f"{len(asked)} worker(s) on {len(hosts)} host(s): {', '.join(hosts)}")
    deadline = time.monotonic() + max(wait_s, 0)
    while True:
        left = {row["worker_id"] for row in queue.registry() if not row["gone"]} & set(asked)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    click.echo(f"Stopped: {len(asked) - len(left)}")
    if left:
        click.echo(f"Still running (they exit when their current job ends"
                   f"{'' if force else '; --force kills it'}): {', '.join(sorted(left))}")


def _worker_rows(queue: Any = None) -> List[Dict[str, Any]]:
    from queuectl import worker_launcher

    queue = queue if queue is not None else _queue()
    return worker_launcher.worker_rows(_paths(), queue.processing, registry=queue)


@worker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--wide", "-w", is_flag=True, help="Do not cut columns to the terminal width.")
def worker_status(as_json: bool, wide: bool) -> None:
    """List every host's workers: host, PID, idle/busy (with job id) or stopping, uptime.

    This host's come from PID files (checked by PID); other hosts' from the database's
    registry, where a worker that stopped beating shows once as "gone" and is forgotten.
    """
    if not as_json:  # first: it tells why workers are missing even when the database is down
        from queuectl.cli_service import supervisor_lines

        for line in supervisor_lines(_paths()):
            click.echo(line)
    rows = _worker_rows()
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No running workers.")
        return
    # SLOTS and GROUPS only when some worker has several slots or serves some groups: the
    # table of one-slot workers of every group stays as narrow as it was.
    capacity = any(r["slots"] > 1 or r["groups"] for r in rows)
    table = []
    for r in rows:
        state = r["state"] + (" (stopping)" if r["stopping"] and r["state"] != "gone" else "")
        extra = [f"{r['busy_slots']}/{r['slots']}"] if capacity else []
        groups = [",".join(r["groups"]) if r["groups"] else "all"] if capacity else []
        table.append([r["host"], str(r["pid"]), state, *extra, ",".join(r["jobs"]) or "-", *groups,
                      format_duration(r["uptime"]), r["mode"]])
    headers = ["HOST", "PID", "STATE", *(["SLOTS"] if capacity else []), "JOBS" if capacity else "JOB",
               *(["GROUPS"] if capacity else []), "UPTIME", "MODE"]
    _table(table, headers, shrink=(4, 5) if capacity else (3,), wide=wide)


# -- inspection --------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--group", "-g", "group", metavar="G", help="Count only the jobs of this group.")
def status(as_json: bool, group: Optional[str]) -> None:
    """Job counts per state, groups, live workers and their slots, whether the queue is paused."""
    queue = _queue()
    counts = queue.counts(group)
    groups = queue.groups()
    paused = queue.paused_since()
    workers = _worker_rows(queue)
    orphaned = sum(1 for alive in _workers_alive(queue.processing()).values() if not alive) \
        if counts["processing"] else 0
    from queuectl.cli_service import supervisor_lines, supervisor_state
    from queuectl.schedules import Schedules

    schedules = Schedules(queue).summary()
    del schedules["schedules"]
    if as_json:
        live_rows = [w for w in workers if w["state"] != "gone"]
        _emit_json({"jobs": counts, "total": sum(counts.values()), "paused": paused is not None,
                    "paused_since": paused, "orphaned": orphaned, "workers": workers,
                    "schedules": schedules, "supervisor": supervisor_state(_paths()),
                    "groups": groups, "group": group,
                    "slots": {"total": sum(w["slots"] for w in live_rows),
                              "busy": sum(w["busy_slots"] for w in live_rows)}})
        return
    if paused is not None:
        click.echo(f"Queue: PAUSED since {format_instant(paused)} (workers claim nothing new; "
                   "'queuectl resume' to continue)")
    else:
        click.echo("Queue: running")
    click.echo(f"Jobs of group {group}:" if group is not None else "Jobs:")
    for state in STATE_NAMES:
        label = "dead (DLQ)" if state == "dead" else state
        note = f"  ({orphaned} with their worker gone; a worker recovers them)" \
            if state == "processing" and orphaned else ""
        click.echo(f"  {label:<12}{counts[state]:>8}{note}")
    click.echo(f"  {'total':<12}{sum(counts.values()):>8}")
    live = [w for w in workers if w["state"] != "gone"]
    busy = sum(1 for w in live if w["state"] == "busy")
    hosts = len({w["host"] for w in live})
    on_hosts = f" on {hosts} hosts" if hosts > 1 else ""
    slots = sum(w["slots"] for w in live)
    used = f"; {sum(w['busy_slots'] for w in live)}/{slots} slots busy" if slots > len(live) else ""
    click.echo(f"Workers: {len(live)} running{on_hosts} ({busy} busy, {len(live) - busy} idle{used})")
    shown = [g for g in groups if g["parallel"] is not None or g["paused"] or g["name"] != "default"]
    if shown:
        click.echo("Groups: " + "; ".join(_group_summary(g) for g in groups))
    gone = len(workers) - len(live)
    if gone:
        click.echo(f"  {gone} worker(s) of other hosts stopped beating (gone)")
    if schedules["count"]:
        from queuectl.cli_schedule import _when

        first = schedules["next"]
        click.echo(f"Schedules: {schedules['count']}"
                   + (f" ({schedules['paused']} paused)" if schedules["paused"] else "")
                   + (f"; next: {first['name']} at {_when(first['next_at'], time.time())}" if first else ""))
    for line in supervisor_lines(_paths()):
        click.echo(line)


def _group_summary(g: Dict[str, Any]) -> str:
    limit = f"/{g['parallel']}" if g["parallel"] is not None else ""
    return (f"{g['name']} {g['running']}{limit} running, {g['waiting']} waiting"
            + (" (paused)" if g["paused"] else ""))


def _workers_alive(jobs: Sequence[Dict[str, Any]]) -> Dict[str, bool]:
    """For each processing job: does its worker still run? (this host: its PID; another
    host's worker counts as alive, only its lease can tell)."""
    from queuectl import worker_launcher

    by_worker: Dict[str, bool] = {}
    alive: Dict[str, bool] = {}
    for job in jobs:
        worker_id = job["worker_id"] or ""
        if worker_id not in by_worker:
            by_worker[worker_id] = worker_launcher.worker_alive(worker_id)
        alive[job["id"]] = by_worker[worker_id]
    return alive


@cli.command("list")
@click.option("--state", "-s", "states", multiple=True,
              type=click.Choice(STATE_NAMES), help="Only jobs in this state (repeatable).")
@click.option("--dlq", is_flag=True, help="Only dead jobs (same as --state dead).")
@click.option("--limit", "-l", default=100, show_default=True, help="Newest N jobs; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--wide", "-w", is_flag=True, help="Do not cut the command and error to the terminal width.")
@click.option("--group", "-g", "group", metavar="G", help="Only jobs of this group.")
def list_cmd(states: Sequence[str], dlq: bool, limit: int, as_json: bool, wide: bool,
             group: Optional[str]) -> None:
    """List jobs, oldest first among the newest --limit.

    Commands and errors are cut with '…' to fit the terminal ($COLUMNS, or 80 when the
    output is not a terminal); --wide prints them whole.

    \b
    Examples:
      queuectl list
      queuectl list --state pending
      queuectl list --dlq
      queuectl list --state completed --limit 0 --json
    """
    if limit < 0:
        raise InvalidInput("--limit must be 0 (all) or more")
    states = tuple(states) + (("dead",) if dlq else ())
    jobs = _queue().list(states, limit + 1 if limit else 0, group)
    more = bool(limit) and len(jobs) > limit
    jobs = jobs[1:] if more else jobs
    if as_json:
        _emit_json([_public(j) for j in jobs])
        return
    if not jobs:
        click.echo("No jobs" + (f" in state {', '.join(states)}." if states else "."))
        return
    _job_rows(jobs, with_error=dlq or "dead" in states or "failed" in states, wide=wide)
    if more:
        click.echo(f"(showing the newest {limit}; --limit 0 for all)", err=True)


def _exit_text(code: Optional[int]) -> str:
    """An exit status as people read it: a negative one is the signal that killed the job
    (--json keeps the raw integer)."""
    if code is None:
        return "-"
    if code < 0:
        from queuectl.executor import describe_exit  # the workers' own words for it

        return str(describe_exit(code, argv=True))
    return str(code)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(job_id: str, as_json: bool) -> None:
    """Everything about one job: state, attempts, next run, last error, exit code, output tail."""
    from queuectl import joblog

    info = _queue().details(job_id)
    info["worker_alive"] = (_workers_alive([info])[info["id"]] if info["state"] == "processing"
                            else None)
    elsewhere, path = _log_elsewhere(info), _paths().job_log(info["id"])
    log_file: Optional[str] = elsewhere or str(path)
    if not elsewhere and joblog.pruned(info, path):
        log_file = None  # its one run printed nothing: no file is kept (queuectl/spool.py)
    if as_json:
        info["log_file"] = log_file
        _emit_json(_public(info))
        return
    command = info["command"]
    lines = [
        ("id", info["id"]),
        ("state", info["state"] + (" (cancel requested)" if info["cancel_requested"]
                                   and info["state"] not in TERMINAL else "")
         + (" (worker gone)" if info["worker_alive"] is False else "")),
        ("command", json.dumps(command) if isinstance(command, list) else command),
        ("attempts", f"{info['attempts']} (max retries {info['effective_max_retries']}"
                     f"{'' if info['max_retries'] is not None else ', from config'}"
                     + (f"; {info['attempts'] - info['retry_base']} since the last dlq retry"
                        if info["retry_base"] else "") + ")"),
        ("priority", str(info["priority"])),
        ("timeout", format_duration(info["effective_timeout"]) if info["effective_timeout"] else "none"),
        ("cwd", info["cwd"] or "-"),
        ("created", format_instant(info["created_at"])),
        ("updated", format_instant(info["updated_at"])),
    ]
    if info["state"] in ("pending", "failed"):
        lines.append(("next run", format_instant(info["run_at"])))
    if info["started_at"]:
        lines.append(("started", format_instant(info["started_at"])))
    if info["finished_at"]:
        lines.append(("finished", format_instant(info["finished_at"])))
    if info["worker_id"]:
        gone = " (worker gone: the run is interrupted; a worker will recover it)" \
            if info["worker_alive"] is False else ""
        lines.append(("worker", info["worker_id"] + gone))
    if info["after"]:
        lines.append(("after", ", ".join(info["after"]) + f" ({info['deps_left']} not completed yet)"))
    if info["unique_key"]:
        lines.append(("unique key", info["unique_key"]))
    lines.append(("exit code", _exit_text(info["exit_code"])))
    lines.append(("last error", info["last_error"] or "-"))
    lines.append(("log file", log_file or "none: the run printed nothing (`logs` shows its "
                               "header and result)"))
    for name, value in lines:
        click.echo(f"{name + ':':<12} {value}")
    if info["runs"]:
        click.echo("runs:")
        for run in info["runs"]:
            took = (run["finished_at"] - run["started_at"]) if run["started_at"] and run["finished_at"] else None
            if run["exit_code"] == 0 and not run["error"]:
                result = "ok"
            elif run["error"]:
                result = run["error"]
            elif run["exit_code"] is not None and run["exit_code"] < 0:
                result = _exit_text(run["exit_code"])
            else:
                result = f"exit {run['exit_code']}"
            click.echo(f"  #{run['attempt']:<3} {format_instant(run['started_at'])}  "
                       f"{format_duration(took):>7}  {result}")
    if info["output_tail"]:
        click.echo("output (tail):")
        tail = info["output_tail"]
        if len(tail) > SHOW_TAIL_CHARS:  # the database keeps more for `logs` on other hosts
            tail = joblog.from_a_line(tail[-SHOW_TAIL_CHARS:])
        for line in tail.rstrip("\n").split("\n"):
            click.echo(f"  {line}")


# -- DLQ and retries ---------------------------------------------------------------------------
@cli.group()
def dlq() -> None:
    """The dead letter queue: jobs that failed every retry.

    \b
    Examples:
      queuectl dlq list
      queuectl dlq retry job1
      queuectl dlq retry --all
    """


@dlq.command("list")
@click.option("--limit", "-l", default=100, show_default=True, help="Newest N jobs; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--wide", "-w", is_flag=True, help="Do not cut the command and error to the terminal width.")
@click.pass_context
def dlq_list(ctx: click.Context, limit: int, as_json: bool, wide: bool) -> None:
    """List dead jobs with their last error."""
    ctx.invoke(list_cmd, states=("dead",), dlq=False, limit=limit, as_json=as_json, wide=wide)


@dlq.command("retry")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_dead", is_flag=True, help="Retry every dead job.")
def dlq_retry(job_ids: Sequence[str], all_dead: bool) -> None:
    """Move dead jobs back to pending with a fresh retry budget (alias: queuectl requeue ID).

    Attempt numbers go on from where they were. Jobs cancelled only because a retried job
    died (their dependents, recursively) are revived too, so a pipeline that failed half-way
    resumes with this one command.
    """
    if bool(job_ids) == all_dead:
        raise InvalidInput("give job ids, or --all")
    ids, revived = _queue().dlq_retry_report(job_ids, all_dead=all_dead)
    if not ids:
        click.echo("The DLQ is empty.")
    elif len(ids) == 1:
        click.echo(f"Job {ids[0]} moved from the DLQ back to pending")
    else:
        click.echo(f"{len(ids)} jobs moved from the DLQ back to pending")
    if revived:
        click.echo(f"{len(revived)} dependent job(s) cancelled because of them revived: "
                   f"{_short(' '.join(revived), 200)}")


@cli.command("dlq-retry", hidden=True)
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_context
def requeue(ctx: click.Context, job_ids: Sequence[str]) -> None:
    """Move a dead job back to pending (same as dlq retry)."""
    ctx.invoke(dlq_retry, job_ids=job_ids, all_dead=False)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True)
def retry(job_ids: Sequence[str]) -> None:
    """Run failed (waiting) jobs now; dead jobs are requeued as by dlq retry."""
    ids, revived = _queue().retry_report(job_ids)
    click.echo(f"Retrying now: {', '.join(ids)}")
    if revived:
        click.echo(f"{len(revived)} dependent job(s) cancelled because of them revived: "
                   f"{_short(' '.join(revived), 200)}")


# -- day-to-day control ------------------------------------------------------------------------
def _ctrl_c_exits_130(func: Any) -> Any:
    """Ctrl-C in a command that only watches ends it quietly with the shell's 128+SIGINT
    (no "Aborted!"): nothing was changed, so there is nothing to report."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            if sys.stderr.isatty():
                click.echo(err=True)
            sys.exit(130)
    return wrapper


def _log_elsewhere(job: Dict[str, Any]) -> Optional[str]:
    """"host:path" of the job's log when its last recorded attempt ran on another host
    (logs stay where they were written), else None."""
    location = job.get("log_location")
    if not location or ":" not in location:
        return None
    from queuectl import worker_launcher

    host = location.split(":", 1)[0]
    return location if host != worker_launcher.host_name() else None


def _remote_logs(queue: Any, job: Dict[str, Any], location: str, follow: bool,
                 attempt: Optional[int], tail_n: Optional[int]) -> None:
    """`logs` on a host without the log file: the tail the database keeps of the last
    recorded attempt's output, and (stderr) where the full log lives."""
    from queuectl import joblog

    if follow and job["state"] not in TERMINAL:
        click.echo(f"note: job {job['id']} logs on another host ({location}); printing its "
                   "stored output tail when it ends", err=True)
        while job["state"] not in TERMINAL:
            time.sleep(0.2)
            job = queue.get(job["id"])
        location = _log_elsewhere(job) or location
    if attempt is not None and attempt != job["attempts"]:
        raise InvalidInput(f"the database keeps only the last attempt's output of job {job['id']!r} "
                           f"(attempt {job['attempts']}); attempt {attempt} is in the log at {location}")
    data = (job["output_tail"] or "").encode("utf-8", "replace")
    if tail_n is not None:
        data = joblog.tail_lines(data, tail_n)
    click.echo(f"note: the full log is on another host: {location}; this is the last "
               f"{format_bytes(queue.settings()['db_tail_bytes'])} of attempt {job['attempts']}'s "
               "output, kept in the database", err=True)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    if follow and job["state"] != "completed":
        click.echo(f"job {job['id']} ended {job['state']}", err=True)
        sys.exit(1)


def format_bytes(count: int) -> str:
    return f"{count // 1024} KiB" if count >= 1024 and count % 1024 == 0 else f"{count} bytes"


@cli.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job's run ends.")
@click.option("--attempt", "-a", type=int, help="Only this attempt's section of the log.")
@click.option("--tail", "-n", "tail_n", type=click.IntRange(min=0), metavar="N",
              help="Only the last N lines (of that attempt with --attempt); with --follow, start there.")
@_ctrl_c_exits_130
def logs(job_id: str, follow: bool, attempt: Optional[int], tail_n: Optional[int]) -> None:
    """Print a job's captured output (stdout+stderr, every attempt with a header).

    --follow exits like wait: 0 when the job completed, 1 when it ended dead or cancelled,
    130 on Ctrl-C.

    \b
    Examples:
      queuectl logs 42
      queuectl logs 42 --tail 20
      queuectl logs 42 --attempt 2 --tail 5
      queuectl logs 42 --follow        # like tail -f, through retries; exits when the job is
                                       # completed, dead or cancelled
    """
    from queuectl import joblog

    queue = _queue()
    job = queue.get(job_id)
    path = _paths().job_log(job["id"])
    out = sys.stdout.buffer
    elsewhere = _log_elsewhere(job)
    if elsewhere:
        _remote_logs(queue, job, elsewhere, follow, attempt, tail_n)
        return
    pruned = joblog.pruned_log(job, path)
    if attempt is not None or not follow:
        if pruned is not None:
            if attempt not in (None, job["attempts"]):
                raise InvalidInput(f"job {job['id']!r} has no logged attempt {attempt}")
            data = pruned if tail_n is None else joblog.tail_lines(pruned, tail_n)
        elif attempt is None and tail_n is not None:
            data = joblog.read_last_lines(path, tail_n, job_id=job["id"])[0]
        else:
            data = joblog.read_attempt(path, attempt, job["id"])
            if attempt is not None and not data:
                raise InvalidInput(f"job {job['id']!r} has no logged attempt {attempt}")
            if tail_n is not None:
                data = joblog.tail_lines(data, tail_n)
        if not data and job["attempts"] == 0 and not path.exists():
            word = "never ran" if job["state"] in TERMINAL else "has not run yet"
            click.echo(f"job {job['id']} {word} ({job['state']})", err=True)
            return
        out.write(data)
        out.flush()
        return
    if job["state"] not in TERMINAL:
        _print_notes(queue)
    # The log is kept open once found: a silent run's link may be removed under us (the
    # data stays readable), and OwnStream stops at another job's section in a spool.
    stream, handle, offset = joblog.OwnStream(job["id"]), None, 0
    try:
        while True:
            job = queue.get(job["id"])
            if handle is None:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    pass
                else:
                    offset = (joblog.last_lines_of(handle, tail_n, job_id=job["id"])[1]
                              if tail_n is not None else joblog.own_start(handle, job["id"]))
            chunk = b""
            if handle is not None:
                if handle.seek(0, os.SEEK_END) < offset:  # cut at max_log_bytes meanwhile
                    offset = handle.tell()
                    click.echo("queuectl: the log was cut at max_log_bytes; following on "
                               "from its end", err=True)
                handle.seek(offset)
                chunk = handle.read()
                offset += len(chunk)
            if chunk:
                out.write(stream.feed(chunk))
                out.flush()
            # Once another job's section follows this job's (a spool that other runs still
            # append to), nothing more of this job comes: only its state is waited for.
            if chunk and not stream.closed:
                continue
            if job["state"] in TERMINAL:  # a failed attempt that will be retried is not the end
                pruned = joblog.pruned_log(job, path) if handle is None else None
                out.write(stream.flush() if pruned is None else
                          pruned if tail_n is None else joblog.tail_lines(pruned, tail_n))
                out.flush()
                if job["state"] != "completed":
                    click.echo(f"job {job['id']} ended {job['state']}", err=True)
                    sys.exit(1)
                return
            else:
                time.sleep(0.1)
    finally:
        if handle is not None:
            handle.close()


@cli.command()
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_jobs", is_flag=True,
              help="Every unfinished job that is due (not those scheduled later) when wait starts.")
@click.option("--scheduled", is_flag=True,
              help="With --all: also wait for jobs scheduled to start later (run_at/delay).")
@click.option("--timeout", "-t", "timeout_s", help="Give up after this long (30, 5m, 2h); exit 2.")
@click.option("--json", "as_json", is_flag=True, help="Print each job's final state as JSON (same exit codes).")
@click.option("--group", "-g", "group", metavar="G",
              help="Every unfinished due job of this group (--all for one group).")
@_ctrl_c_exits_130
def wait(job_ids: Sequence[str], all_jobs: bool, scheduled: bool, timeout_s: Optional[str],
         as_json: bool, group: Optional[str]) -> None:
    """Block until jobs are completed or dead (or cancelled).

    Exit 0 if all completed, 1 if any ended dead or cancelled, 2 on timeout, 130 on Ctrl-C.
    --all leaves out pending jobs whose start time is still in the future (it says how many
    and when the next is due); --scheduled waits for those too.

    \b
    Examples:
      id=$(queuectl add -q "make build"); queuectl wait "$id"
      queuectl wait --all --timeout 10m
      queuectl wait --all --scheduled
      queuectl wait --group backups
      queuectl wait --json a b c | jq -r '.jobs | to_entries[] | select(.value != "completed") | .key'
    """
    from queuectl.timeutil import parse_duration

    if group is not None:
        if job_ids:
            raise InvalidInput("give job ids or --group, not both")
        all_jobs = True  # `wait --group G` is `wait --all` for one group
    if bool(job_ids) == all_jobs:
        raise InvalidInput("give job ids, --all or --group")
    if scheduled and not all_jobs:
        raise InvalidInput("--scheduled goes with --all or --group")
    limit = parse_duration(timeout_s, "--timeout") if timeout_s is not None else None
    queue = _queue()
    if all_jobs:
        now = time.time()
        jobs = queue.list(("pending", "processing", "failed"), group=group)
        later = [] if scheduled else [j for j in jobs if j["state"] == "pending" and j["run_at"] > now]
        left_out = {j["id"] for j in later}
        ids = [j["id"] for j in jobs if j["id"] not in left_out]
        if later:
            due = min(j["run_at"] for j in later)
            click.echo(f"note: not waiting for {len(later)} job(s) scheduled later (next due "
                       f"{format_instant(due)}, in {format_duration(due - now)}); "
                       "--scheduled waits for them too", err=True)
    else:
        ids = [queue.get(job_id)["id"] for job_id in dict.fromkeys(job_ids)]
    if not ids and not as_json:
        click.echo("Nothing to wait for: no unfinished jobs" + (" due now." if all_jobs and not scheduled
                                                                 else "."))
        return
    deadline = time.monotonic() + limit if limit is not None else None
    tty = sys.stderr.isatty()
    final: Dict[str, str] = {}
    remaining = list(ids)
    delay = 0.02
    first = True
    while True:
        states = queue.states(remaining)
        for job_id in remaining:
            state = states.get(job_id, "completed")  # purged meanwhile: it had finished
            if state in TERMINAL:
                final[job_id] = state
        remaining = [j for j in remaining if j not in final]
        if remaining and first:
            _print_notes(queue)
        first = False
        if tty:
            bad = sum(1 for s in final.values() if s != "completed")
            click.echo(f"\r{len(final)}/{len(ids)} finished" + (f" ({bad} dead/cancelled)" if bad else "")
                       + " " * 8, nl=False, err=True)
        if not remaining:
            break
        if deadline is not None and time.monotonic() >= deadline:
            if tty:
                click.echo(err=True)
            if as_json:
                current = {j: states.get(j, "completed") for j in remaining}
                _emit_json({"jobs": {j: final.get(j) or current[j] for j in ids}, "timed_out": True})
            click.echo(f"timed out; {len(remaining)} job(s) not finished: {_short(' '.join(remaining), 200)}",
                       err=True)
            sys.exit(2)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    if tty:
        click.echo(err=True)
    failed = sorted((j for j, s in final.items() if s != "completed"), key=ids.index)
    if as_json:
        _emit_json({"jobs": {j: final[j] for j in ids}, "timed_out": False})
    if failed:
        click.echo(f"{len(failed)} job(s) did not complete: "
                   + ", ".join(f"{j} ({final[j]})" for j in failed[:20]), err=True)
        sys.exit(1)
    if not as_json:
        click.echo(f"All {len(ids)} job(s) completed.")


@cli.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--wait", "wait_s", default=10.0, show_default=True, type=float,
              help="Seconds to wait for running jobs to be killed.")
def cancel(job_ids: Sequence[str], wait_s: float) -> None:
    """Cancel jobs: waiting ones at once, running ones by killing their process group.

    Cancelled is a final state (not the DLQ); jobs that depend on it are cancelled too.
    """
    queue = _queue()
    result = queue.cancel(job_ids)
    running = [j for j, s in result.items() if s == "cancelling"]
    if running:
        # A job whose worker died has nobody to kill it: recover it now (kills the orphaned
        # process group, and a cancel-requested job becomes cancelled) instead of waiting.
        from queuectl import worker_launcher

        worker_launcher.recover_dead_workers_jobs(queue, _paths())
    deadline = time.monotonic() + wait_s
    while running and time.monotonic() < deadline:
        states = queue.states(running)
        running = [j for j in running if states.get(j) == "processing"]
        if running:
            time.sleep(0.05)
    for job_id in result:
        if job_id in running:
            click.echo(f"Job {job_id}: cancel requested; its worker will kill it")
        else:
            click.echo(f"Job {job_id} cancelled")


@cli.command()
@click.option("--group", "-g", "group", metavar="G", help="Pause only this group.")
def pause(group: Optional[str]) -> None:
    """Drain mode: workers finish what they run but claim nothing new (of --group G only)."""
    if group is not None:
        _queue().pause_group(group)
        click.echo(f"Group {group} paused: its running jobs finish, none of it starts. "
                   f"'queuectl resume --group {group}' to continue.")
        return
    _queue().pause()
    click.echo("Queue paused: running jobs finish, nothing new starts. 'queuectl resume' to continue.")


@cli.command()
@click.option("--group", "-g", "group", metavar="G", help="Resume only this group.")
def resume(group: Optional[str]) -> None:
    """Let workers claim jobs again after pause (of --group G only)."""
    if group is not None:
        _queue().pause_group(group, False)
        click.echo(f"Group {group} resumed.")
        return
    _queue().resume()
    click.echo("Queue resumed.")


@cli.command()
@click.option("--state", "-s", "states", multiple=True, required=True,
              type=click.Choice(TERMINAL), help="Which finished jobs (repeatable).")
@click.option("--older-than", help="Only jobs finished longer ago than this (30m, 12h, 7d).")
@click.option("--dry-run", "-n", is_flag=True, help="List the jobs that would go; delete nothing.")
def purge(states: Sequence[str], older_than: Optional[str], dry_run: bool) -> None:
    """Delete finished jobs and their log files; never touches pending or running jobs.

    \b
    Examples:
      queuectl purge --state completed --older-than 7d --dry-run
      queuectl purge --state completed --older-than 7d
      queuectl purge --state dead --state cancelled
    """
    from queuectl.timeutil import parse_duration

    age = parse_duration(older_than, "--older-than") if older_than is not None else 0.0
    if dry_run:
        ids = _queue().purge_candidates(states, age)
        for job_id in ids:
            click.echo(job_id)
        click.echo(f"Would purge {len(ids)} job(s) (dry run: nothing deleted).", err=True)
        return
    from queuectl.retention import remove_logs

    ids = _queue().purge(states, age)
    remove_logs(_paths(), ids)
    click.echo(f"Purged {len(ids)} job(s).")


# -- config ------------------------------------------------------------------------------------
@cli.group()
def config() -> None:
    """Settings stored in the database; per-job fields override them.

    \b
    Examples:
      queuectl config list
      queuectl config get max_retries
      queuectl config set max_retries 5          # alias: default_max_retries
      queuectl config set backoff_base 3
      queuectl config set job_timeout none
    """


def _config_lines(keys: Optional[Sequence[str]] = None, as_json: bool = False) -> None:
    from queuectl import config as cfg

    queue = _queue()
    values = queue.settings(fresh=True)
    stored = queue.store.config_items()
    keys = list(keys) if keys else list(cfg.SETTINGS)
    if as_json:
        _emit_json({k: values[k] for k in keys})
        return
    for key in keys:
        source = "" if key in stored else "  (default)"
        click.echo(f"{key} = {cfg.encode(values[key])}{source}")


@config.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_list(as_json: bool) -> None:
    """Every setting with its current value."""
    _config_lines(as_json=as_json)


@config.command("get")
@click.argument("key", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_get(key: Optional[str], as_json: bool) -> None:
    """One setting (or all, without KEY)."""
    if key is None:
        _config_lines(as_json=as_json)
        return
    from queuectl import config as cfg

    name = cfg.canonical_key(key)
    _config_lines([name], as_json=as_json)


@config.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value", type=click.UNPROCESSED)
def config_set(key: str, value: str) -> None:
    """Change a setting (validated; unknown keys are rejected with the list of valid ones)."""
    from queuectl import config as cfg

    name, parsed = _queue().config_set(key, value)
    click.echo(f"{name} = {cfg.encode(parsed)}")


@config.command("unset")
@click.argument("key")
def config_unset(key: str) -> None:
    """Return a setting to its default."""
    name = _queue().config_unset(key)
    click.echo(f"{name} reset to its default")


# -- dashboard ---------------------------------------------------------------------------------
DASHBOARD_MIN_TOKEN = 8  # dashboard.MIN_TOKEN_LENGTH (not imported here: start-up stays fast)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; a non-loopback address requires --token.")
@click.option("--port", default=8420, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port; 0 picks a free one (the URL printed says which).")
@click.option("--token", envvar="QUEUECTL_DASHBOARD_TOKEN", metavar="T",
              help=f"Secret for actions, at least {DASHBOARD_MIN_TOKEN} characters (default: a random "
                   "one, printed). Env: QUEUECTL_DASHBOARD_TOKEN.")
def dashboard(host: str, port: int, token: Optional[str]) -> None:
    """Serve a live web dashboard: counts, workers, jobs, output, DLQ; Ctrl-C stops.

    Reading is open on loopback; retry, cancel and pause/resume need the token, which
    the printed URL carries (after '#', so it never reaches a server log). A job's own
    page is the URL with #job=ID.

    \b
    Examples:
      queuectl dashboard                          # http://127.0.0.1:8420/
      queuectl dashboard --port 0                 # any free port
      QUEUECTL_DASHBOARD_TOKEN=$(openssl rand -hex 16) queuectl dashboard --host 0.0.0.0
    """
    import errno

    from queuectl import dashboard as board

    _queue()  # create or check the database now: a broken one is an error before we listen
    try:
        server = board.make_server(_paths(), host, port, token,
                                   log=lambda message: click.echo(message, err=True))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another dashboard?); "
                            "choose another with --port N, or --port 0 for any free one") from None
        raise
    if token is None:
        click.echo(f"Dashboard: {server.url}#token={server.token}")
        click.echo(f"Token for actions (retry, cancel, pause): {server.token}")
    else:
        click.echo(f"Dashboard: {server.url}  (actions need the token you gave)")
    remote = server.remote_url()
    if remote:
        click.echo(f"From other machines: {remote}  (listening on all addresses, {host})")
    click.echo("Press Ctrl-C to stop.")
    board.run(server)
    click.echo("Dashboard stopped.")


from queuectl import cli_service  # noqa: E402 - last: it needs nothing from here at import

cli.add_command(cli_service.supervise)
cli.add_command(cli_service.service)

from queuectl.cli_stats import stats as _stats_command  # noqa: E402 - after cli exists

cli.add_command(_stats_command)

from queuectl.cli_group import group as _group_commands  # noqa: E402 - needs cli defined

cli.add_command(_group_commands)


def main() -> None:
    try:
        cli(prog_name="queuectl")
    except BrokenPipeError:  # e.g. `queuectl list | head`: not an error worth a word
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


from queuectl.cli_schedule import schedule  # noqa: E402 - it uses the helpers above

cli.add_command(schedule)

if __name__ == "__main__":
    main()
