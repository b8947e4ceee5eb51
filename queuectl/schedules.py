"""Schedules: recurring jobs that the running workers fire, exactly one job per slot.

A schedule is a row (store.SCHEDULE_COLUMNS): when it fires (a cron expression in a time
zone, or a fixed period), the job it enqueues (a JSON job spec as ``enqueue`` takes it,
validated by jobspec like any other), what to do with slots missed while no worker ran
(``catch_up``) and with a slot that comes while the previous job still waits or runs
(``overlap``). ``next_at`` is the next slot not yet handled.

Exactly once: every worker's chore (chores.py) asks the store for the earliest next_at, one
indexed read; when a schedule is due it claims the row in a write transaction (SQLite:
BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE SKIP LOCKED), enqueues ``NAME@<slot>`` for each slot
it handles and moves next_at past them, all in that transaction. Another firer waits for
the lock and then sees the moved next_at, or skips the row; the unique job id is the last
guard. No worker running, nothing fires; the first one to start applies ``catch_up``.

Time: a cron schedule's slots are wall-clock times in its zone, turned into instants with
zoneinfo (croniter only matches wall-clock times, where it is exact). A wall time the clock
skips (spring forward) fires once, when the gap ends; one the clock shows twice (fall back)
fires once, at its first pass, unless the hour field is ``*`` (an hourly or finer job), which
fires in both passes as cron does. A clock set back fires nothing twice (next_at stays
ahead); a clock set forward is a catch-up like any outage.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from queuectl.errors import Conflict, DuplicateKey, InvalidInput, NotFound, QueueError
from queuectl.jobspec import parse_job
from queuectl.timeutil import parse_duration

if TYPE_CHECKING:  # pragma: no cover
    from queuectl.models import Queue

NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
CATCH_UP = ("latest", "all", "none")
OVERLAP = ("skip", "queue", "replace")
ACTIVE = ("pending", "failed", "processing")  # models.ACTIVE (not imported: models is heavy)
# A slot fired more than this late was missed (the catch-up policy decides), not just late:
# a busy or slow worker fires a slot a second or two late and that must never drop it.
LATE_GRACE = 60.0
FIRE_BATCH = 100   # slots one firing transaction enqueues at most (catch-up all after an outage)
ROUNDS = 4         # firing transactions per chore run at most: a chore must stay short
KEEP_SKIPS = 50    # skip records kept per schedule
COUNT_LIMIT = 1000  # missed slots counted one by one at most (~0.1 s of croniter for a cron schedule)
MAX_PERIOD = 366 * 86400
# The fields a schedule's job takes from `add`; the rest belong to one job, not to a series.
NOT_IN_TEMPLATE = ("id", "run_at", "delay", "after", "unique_key")
ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
           "@annually": "0 0 1 1 *"}
CRON_HELP = ("5 fields: minute hour day-of-month month day-of-week, e.g. '30 2 * * mon-fri', "
             "'*/15 * * * *', or @hourly, @daily, @weekly, @monthly")
_WINDOW = timedelta(hours=3)  # wider than any DST shift: how far a fold can reorder slots


# -- when a schedule fires ----------------------------------------------------------------------
def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "…"
        raise InvalidInput(f"invalid schedule name {shown!r}: use 1-64 letters, digits and _ . - "
                           "(starting with a letter, digit or _; no '..')")
    return name


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        if not name or name.startswith(("/", ".")) or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInput(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin, "
                           "America/New_York or UTC)") from None


def local_zone() -> str:
    """This host's zone as an IANA name ($TZ, else /etc/localtime's target), else UTC: a
    schedule stores its zone, so every host's workers agree on its slots."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                _zone(name)
                return name
            except InvalidInput:
                continue
    return "UTC"


class Timing:
    """The slots of one schedule, as epoch seconds (whole seconds)."""

    def __init__(self, kind: str, expr: str, tz: Optional[str]) -> None:
        self.kind, self.expr, self.tz = kind, expr, tz
        if kind == "every":
            self.period = _period(expr)
            return
        if kind != "cron":
            raise InvalidInput(f"unknown schedule kind {kind!r}")
        self.cron = _cron(expr)
        self.zone = _zone(tz or "UTC")
        hours = _croniter().croniter(self.cron).expanded[1]
        self.every_hour = hours == ["*"] or len(hours) == 24  # fires in both passes of a fold

    def describe(self) -> str:
        if self.kind == "every":
            return f"every {self.expr}"
        return f"{self.expr} ({self.tz})"

    # Both directions: the slot after t (strictly), and the last slot at or before t.
    def next_after(self, t: float) -> float:
        if self.kind == "every":
            return (math.floor(t / self.period) + 1) * self.period
        return self._search(t, forward=True)

    def latest_at_or_before(self, t: float) -> float:
        if self.kind == "every":
            return math.floor(t / self.period) * self.period
        return self._search(t, forward=False)

    def count(self, first: float, last: float) -> int:
        """Slots from ``first`` to ``last`` (both slots), at most COUNT_LIMIT."""
        if self.kind == "every":
            return min(int(round((last - first) / self.period)) + 1, COUNT_LIMIT)
        n, slot = 1, first
        while slot < last and n < COUNT_LIMIT:
            slot = self.next_after(slot)
            n += 1
        return n

    def _search(self, t: float, forward: bool) -> float:
        module = _croniter()
        croniter, CroniterBadDateError = module.croniter, module.CroniterBadDateError
        zone = self.zone
        steady = (datetime.fromtimestamp(t - 10800, zone).utcoffset()
                  == datetime.fromtimestamp(t + 10800, zone).utcoffset())
        # Away from a DST change wall-clock order is instant order: the first match is it.
        # Near one a fold can put a later wall time first, so look 3 h either side.
        if forward:
            start = _wall(math.floor(t), zone) - (timedelta(0) if steady else _WINDOW)
        else:
            start = _wall(math.floor(t) + 1, zone) + (timedelta(0) if steady else _WINDOW)
        it = croniter(self.cron, start)
        best: Optional[float] = None
        try:
            for _ in range(2000):
                wall = it.get_next(datetime) if forward else it.get_prev(datetime)
                if best is not None:
                    edge = _wall(best, zone)
                    if (wall > edge + _WINDOW) if forward else (wall < edge - _WINDOW):
                        break
                for instant in _instants(wall, zone, self.every_hour):
                    if (instant > t if forward else instant <= t) and (
                            best is None or (instant < best if forward else instant > best)):
                        best = instant
                if steady and best is not None:
                    break
        except CroniterBadDateError:
            pass
        if best is None:
            raise InvalidInput(f"cron expression {self.expr!r} never matches a date")
        return best


def _wall(ts: float, zone: Any) -> datetime:
    return datetime.fromtimestamp(ts, zone).replace(tzinfo=None)


def _instants(wall: datetime, zone: Any, both: bool) -> List[float]:
    """The instants a wall-clock time names in ``zone``: one; two in a fold (the second only
    when ``both``); and for a time the clock skips, the instant the gap ends."""
    first = wall.replace(tzinfo=zone, fold=0).timestamp()
    second = wall.replace(tzinfo=zone, fold=1).timestamp()
    if first == second:
        return [first]
    if first < second:  # the clock shows this time twice
        return [first, second] if both else [first]
    # Skipped: fold=1 reads it with the later offset (an instant before the gap), fold=0 with
    # the earlier one (after it); the gap ends at the first second whose wall time is later.
    low, high = int(second), int(first)
    while high - low > 1:
        mid = (low + high) // 2
        if _wall(mid, zone) >= wall:
            high = mid
        else:
            low = mid
    return [float(high)]


def _period(expr: str) -> float:
    seconds = parse_duration(expr, "--every")
    if seconds < 1 or seconds != int(seconds):
        raise InvalidInput(f"--every must be a whole number of seconds, at least 1s, got {expr!r}")
    if seconds > MAX_PERIOD:
        raise InvalidInput(f"--every is too long: {expr!r} (at most 366d; use --cron for yearly jobs)")
    return float(seconds)


def _cron(expr: str) -> str:
    """The 5-field form of a cron expression; InvalidInput in one line when it is not one."""
    text = " ".join(str(expr).split())
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise InvalidInput(f"invalid cron expression {expr!r}: unknown shortcut ({CRON_HELP})")
        return ALIASES[text.lower()]
    if len(text.split()) != 5:
        raise InvalidInput(f"invalid cron expression {expr!r}: {len(text.split())} fields "
                           f"({CRON_HELP})")
    croniter = _croniter().croniter
    try:
        croniter(text)
    except Exception as exc:  # noqa: BLE001 - croniter raises ValueError, KeyError, its own...
        reason = str(exc).replace(f"[{text}]", "").strip(" :") or type(exc).__name__
        raise InvalidInput(f"invalid cron expression {expr!r}: {reason} ({CRON_HELP})") from None
    return text


def _croniter() -> Any:
    """croniter, imported when a cron schedule is used (start-up stays lean without one)."""
    try:
        import croniter
    except ImportError:
        raise QueueError("cron schedules need the 'croniter' package, a dependency of queuectl: "
                         "pip install croniter (or reinstall queuectl)") from None
    return croniter


def timing_of(row: Mapping[str, Any]) -> Timing:
    return Timing(row["kind"], row["expr"], row["tz"])


def slot_text(slot: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot))


def slot_job_id(name: str, slot: float) -> str:
    return f"{name}@{slot_text(slot)}"


# -- the rules --------------------------------------------------------------------------------
class Schedules:
    """Schedules over one queue: add/list/show/remove/pause/resume/run, and firing."""

    def __init__(self, queue: "Queue") -> None:
        self.queue = queue
        self.store = queue.store

    def add(self, name: str, template: Dict[str, Any], *, cron: Optional[str] = None,
            every: Optional[str] = None, tz: Optional[str] = None, catch_up: str = "latest",
            overlap: str = "skip", env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
        """A new schedule; nothing is stored unless every part of it is valid.
        ``env``: the environment its jobs run with (the adder's, as ``add`` captures it)."""
        validate_name(name)
        if (cron is None) == (every is None):
            raise InvalidInput("give either --cron EXPR or --every DURATION")
        if every is not None and tz is not None:
            raise InvalidInput("--tz only applies to --cron schedules")
        if catch_up not in CATCH_UP:
            raise InvalidInput(f"--catch-up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}")
        if overlap not in OVERLAP:
            raise InvalidInput(f"--overlap must be one of {', '.join(OVERLAP)}, got {overlap!r}")
        kind, expr = ("cron", " ".join(cron.split())) if cron is not None else ("every", str(every).strip())
        zone = (tz or local_zone()) if kind == "cron" else None
        timing = Timing(kind, expr, zone)
        template = self._template(name, template)
        now = self.queue.clock()
        row = {"name": name, "kind": kind, "expr": expr, "tz": zone,
               "spec": json.dumps(template, sort_keys=True), "catch_up": catch_up,
               "overlap": overlap, "paused": 0, "created_at": now,
               "next_at": timing.next_after(now), "last_slot": None, "last_job": None,
               "last_fired_at": None,
               "env": json.dumps(dict(env)) if env is not None and self.queue.settings()["capture_env"]
               else None}
        try:
            with self.store.transaction():
                self.store.insert_schedule(row)
        except DuplicateKey:
            raise Conflict(f"a schedule named {name!r} already exists (remove it first, or choose "
                           "another name)") from None
        return self._public(row, {})

    def _template(self, name: str, template: Dict[str, Any]) -> Dict[str, Any]:
        for field in NOT_IN_TEMPLATE:
            if template.get(field) is not None:
                raise InvalidInput(f"a schedule's job cannot have {field!r}: each slot's job gets "
                                   "its own id and runs when its slot comes")
        # The same validation as `enqueue`, with the id a slot's job will have.
        spec = parse_job(dict(template, id=slot_job_id(name, 0)), now=self.queue.clock(),
                         default_cwd=None)
        template = dict(template)
        if spec["cwd"] is not None:
            template["cwd"] = spec["cwd"]  # relative to where it was added, not to the worker
        return template

    def get(self, name: str) -> Dict[str, Any]:
        validate_name(name)
        row = self.store.get_schedule(name)
        if row is None:
            raise NotFound(f"no schedule named {name!r} (see: queuectl schedule list)")
        return row

    def remove(self, name: str) -> None:
        """The schedule goes; jobs it already enqueued stay."""
        self.get(name)
        with self.store.transaction():
            if not self.store.delete_schedule(name):
                raise NotFound(f"no schedule named {name!r}")

    def pause(self, name: str) -> Dict[str, Any]:
        self.get(name)
        with self.store.transaction():
            self.store.update_schedule(name, {"paused": 1})
        return self.show(name, jobs=0)

    def resume(self, name: str) -> Dict[str, Any]:
        """Slots that came while it was paused are not caught up: the next one is the next
        slot from now."""
        row = self.get(name)
        with self.store.transaction():
            if row["paused"]:
                self.store.update_schedule(name, {
                    "paused": 0, "next_at": timing_of(row).next_after(self.queue.clock())})
        return self.show(name, jobs=0)

    def run_now(self, name: str) -> str:
        """Fire once now, outside the slots (overlap does not apply: it was asked for)."""
        row = self.get(name)
        now = self.queue.clock()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        job_id = f"{name}@run-{stamp}"
        with self.store.transaction():
            spec = self._spec(row, job_id, now)
            self.queue.enqueue([spec], env=self._env(row))
            self.store.update_schedule(name, {"last_job": job_id, "last_fired_at": now})
        return job_id

    # -- reading ------------------------------------------------------------------------------
    def list(self) -> List[Dict[str, Any]]:
        rows = self.store.list_schedules()
        states = self.store.states_of([r["last_job"] for r in rows if r["last_job"]])
        return [self._public(row, states) for row in rows]

    def show(self, name: str, jobs: int = 20) -> Dict[str, Any]:
        row = self.get(name)
        states = self.store.states_of([row["last_job"]]) if row["last_job"] else {}
        info = self._public(row, states)
        timing = timing_of(row)
        upcoming: List[float] = []
        if not row["paused"]:  # the due one (overdue while no worker runs), then from now on
            upcoming.append(row["next_at"])
            slot = max(row["next_at"], self.queue.clock())
            while len(upcoming) < 5:
                slot = timing.next_after(slot)
                upcoming.append(slot)
        info["upcoming"] = upcoming
        info["jobs"] = self.store.jobs_with_prefix(name + "@", jobs) if jobs else []
        info["skipped"] = self.store.schedule_skips(name, 20) if jobs else []
        return info

    def summary(self) -> Dict[str, Any]:
        """What `status` and the dashboard show: how many, and which fires next."""
        rows = self.list()
        active = [r for r in rows if not r["paused"]]
        first = min(active, key=lambda r: r["next_at"]) if active else None
        return {"count": len(rows), "paused": len(rows) - len(active),
                "next": {"name": first["name"], "next_at": first["next_at"]} if first else None,
                "schedules": rows}

    @staticmethod
    def _public(row: Mapping[str, Any], states: Mapping[str, str]) -> Dict[str, Any]:
        template = json.loads(row["spec"])
        return {"name": row["name"], "kind": row["kind"], "expr": row["expr"], "tz": row["tz"],
                "when": timing_of(row).describe(), "command": template.get("command"),
                "job": template, "catch_up": row["catch_up"], "overlap": row["overlap"],
                "paused": bool(row["paused"]), "created_at": row["created_at"],
                "next_at": None if row["paused"] else row["next_at"],
                "last_slot": row["last_slot"], "last_job": row["last_job"],
                "last_state": states.get(row["last_job"]) if row["last_job"] else None,
                "last_fired_at": row["last_fired_at"]}

    # -- firing -------------------------------------------------------------------------------
    def fire_due(self, now: Optional[float] = None) -> List[str]:
        """The worker chore: fire every schedule that is due; returns the job ids created.
        When none is due this is one indexed read."""
        now = self.queue.clock() if now is None else now
        created: List[str] = []
        for _ in range(ROUNDS):
            due = self.store.next_schedule_due()  # a read: no write transaction unless due
            if due is None or due > now:
                break
            with self.store.transaction():
                row = self.store.claim_due_schedule(now)
                if row is None:  # another firer holds it (PostgreSQL) or just handled it
                    break
                created.extend(self._fire_locked(row, now))
        return created

    def _fire_locked(self, row: Dict[str, Any], now: float) -> List[str]:
        name, timing = row["name"], timing_of(row)
        slots, next_at = self._due_slots(row, timing, now)
        created: List[str] = []
        last_job = row["last_job"]
        fields: Dict[str, Any] = {"next_at": next_at}
        for slot in slots:
            if row["overlap"] != "queue" and last_job is not None:
                state = self.store.states_of([last_job]).get(last_job)
                if state in ACTIVE:
                    if row["overlap"] == "skip":
                        # One record per run of skipped slots, not one per slot: a job of an
                        # hour on an --every 1s schedule is one line in `schedule show`.
                        reason = f"job {last_job} was still {state}"
                        if not self.store.extend_schedule_skip(
                                name, timing.latest_at_or_before(slot - 1), reason, slot, now):
                            self._skip(name, slot, slot, 1, reason, now)
                        continue
                    try:
                        self.queue.cancel([last_job])  # replace: the old one goes, a new one starts
                    except (Conflict, NotFound):
                        pass  # it finished (or was purged) in the meantime
            job_id = slot_job_id(name, slot)
            try:
                spec = self._spec(row, job_id, now)
                result = self.queue.enqueue([spec], if_exists="skip", env=self._env(row))[0]
            except InvalidInput as exc:  # e.g. its cwd was deleted: say why, go on with the next
                self._skip(name, slot, slot, 1, f"cannot enqueue: {exc}", now)
                continue
            if result.created:
                created.append(job_id)
            last_job = job_id
            fields.update(last_slot=slot, last_job=job_id, last_fired_at=now)
        self.store.update_schedule(name, fields)
        return created

    def _due_slots(self, row: Mapping[str, Any], timing: Timing, now: float
                   ) -> Tuple[List[float], float]:
        """The slots to fire now and the next_at after them; records the missed ones that
        the catch-up policy drops."""
        start = row["next_at"]
        if row["catch_up"] == "all":
            slots, slot = [], start
            while slot <= now and len(slots) < FIRE_BATCH:
                slots.append(slot)
                slot = timing.next_after(slot)
            return slots, slot
        cutoff = now - LATE_GRACE  # slots up to here were missed; later ones are just late
        slots, slot = [], start if start > cutoff else timing.next_after(cutoff)
        while slot <= now and len(slots) < FIRE_BATCH:
            slots.append(slot)
            slot = timing.next_after(slot)
        if start <= cutoff:
            last = timing.latest_at_or_before(cutoff)
            if row["catch_up"] == "latest" and not slots:
                slots = [last]  # one job for the whole outage: the most recent slot
                last = timing.latest_at_or_before(last - 1) if last > start else None
            if last is not None:
                self._skip(row["name"], start, last, timing.count(start, last),
                           f"missed while no worker ran (catch-up {row['catch_up']})", now)
        return slots, slot

    def _skip(self, name: str, first: float, last: float, count: int, reason: str,
              now: float) -> None:
        self.store.add_schedule_skip(name, first, last, count, reason, now, KEEP_SKIPS)

    @staticmethod
    def _spec(row: Mapping[str, Any], job_id: str, now: float) -> Dict[str, Any]:
        return parse_job(dict(json.loads(row["spec"]), id=job_id), now=now, default_cwd=None)

    @staticmethod
    def _env(row: Mapping[str, Any]) -> Optional[Dict[str, str]]:
        return json.loads(row["env"]) if row["env"] else None

