"""Schedules: slots across DST, one job per slot however many firers, catch-up and overlap
policies, the CLI's refusals, and real workers firing them."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from croniter import croniter
from zoneinfo import ZoneInfo

from helpers import dump_db, run_queuectl, wait_until

from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.schedules import LATE_GRACE, Schedules, Timing, slot_job_id
from queuectl.store import open_store


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _schedules(store, clock):
    return Schedules(Queue(store, clock=clock))


def _ids(store, name):
    return sorted(row["id"] for row in store.jobs_with_prefix(name + "@", 1000))


# -- slots --------------------------------------------------------------------------------------
def _ours(expr, tz, start, end):
    timing, out, t = Timing("cron", expr, tz), [], start.timestamp()
    while True:
        t = timing.next_after(t)
        if t >= end.timestamp():
            return out
        out.append(t)


def _croniters(expr, start, end):
    it, out = croniter(expr, start), []
    while True:
        moment = it.get_next(datetime)
        if moment >= end:
            return out
        out.append(moment.timestamp())


def _second_pass(ts, zone):
    """The instant is the second time its wall-clock time is shown (the fall-back fold)."""
    moment = datetime.fromtimestamp(ts, zone)
    return moment.fold == 1 or moment.replace(fold=0).timestamp() != ts


@pytest.mark.parametrize("tz,spring,fall", [("America/New_York", (2026, 3, 8), (2026, 11, 1)),
                                            ("Europe/Berlin", (2026, 3, 29), (2026, 10, 25))])
@pytest.mark.parametrize("expr", ["30 2 * * *", "30 1 * * *", "0 * * * *", "*/20 1-3 * * *",
                                  "15 2 * * sun", "0 9 * * mon-fri"])
def test_cron_slots_match_croniter_except_a_fold_fires_once(expr, tz, spring, fall):
    zone = ZoneInfo(tz)
    every_hour = expr.split()[1] == "*"
    for day in (spring, fall):
        start = datetime(*day, tzinfo=zone) - timedelta(days=3)
        end = start + timedelta(days=6)
        ours, theirs = _ours(expr, tz, start, end), _croniters(expr, start, end)
        # croniter fires a fixed-hour slot in both passes of a fall-back fold; we fire once.
        expected = theirs if every_hour else [t for t in theirs if not _second_pass(t, zone)]
        assert ours == expected, (expr, tz, day)
        assert len(set(ours)) == len(ours)
        timing = Timing("cron", expr, tz)
        for slot in ours:  # both directions agree
            assert timing.latest_at_or_before(slot) == slot
            assert timing.latest_at_or_before(slot + 0.5) == slot


def test_dst_days_fire_once_and_never_skip_a_day():
    ny = ZoneInfo("America/New_York")
    # Spring forward: 02:30 does not exist on 8 March; it fires once, as the gap ends (03:00).
    slots = _ours("30 2 * * *", "America/New_York", datetime(2026, 3, 7, tzinfo=ny),
                  datetime(2026, 3, 10, tzinfo=ny))
    assert [datetime.fromtimestamp(s, ny).strftime("%d %H:%M") for s in slots] == [
        "07 02:30", "08 03:00", "09 02:30"]
    # Fall back: 01:30 happens twice on 1 November; it fires once, at the first pass.
    slots = _ours("30 1 * * *", "America/New_York", datetime(2026, 10, 31, tzinfo=ny),
                  datetime(2026, 11, 3, tzinfo=ny))
    assert [datetime.fromtimestamp(s, ny).strftime("%d %H:%M %z") for s in slots] == [
        "31 01:30 -0400", "01 01:30 -0400", "02 01:30 -0500"]
    # An hourly job follows elapsed hours: 23 on the short day, 25 on the long one.
    for day, hours in (((2026, 3, 8), 23), ((2026, 11, 1), 25)):
        start = datetime(*day, tzinfo=ny)
        assert len(_ours("0 * * * *", "America/New_York", start - timedelta(seconds=1),
                         start + timedelta(days=1) - timedelta(seconds=1))) == hours


def test_every_slots_are_multiples_of_the_period():
    timing = Timing("every", "5m", None)
    assert timing.next_after(1000.0) == 1200.0 and timing.next_after(1200.0) == 1500.0
    assert timing.latest_at_or_before(1499.9) == 1200.0 and timing.count(1200.0, 2400.0) == 5


# -- firing ---------------------------------------------------------------------------------------
def test_nothing_due_is_one_read_and_fires_nothing(store, mocker):
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    schedules.add("tick", {"command": "true"}, every="1m")
    claim = mocker.spy(store, "claim_due_schedule")
    assert schedules.fire_due(1019.0) == [] and claim.call_count == 0
    assert schedules.fire_due(1020.5) == ["tick@1970-01-01T00:17:00Z"]
    assert schedules.fire_due(1021.0) == [] and claim.call_count == 1


def test_racing_firers_make_one_job_per_slot(paths, store):
    """Four firers, each with its own connection, fire the same slots at the same moments."""
    clock = Clock(1000.0)
    _schedules(store, clock).add("tick", {"command": "true"}, every="1s", overlap="queue")
    stores = [open_store(paths, "worker") for _ in range(4)]
    created, errors = [], []
    barrier = threading.Barrier(4)

    def fire(own):
        schedules = _schedules(own, clock)
        try:
            for step in range(1, 21):
                barrier.wait()
                created.extend(schedules.fire_due(1000.0 + step))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=fire, args=(own,)) for own in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for own in stores:
        own.close()
    assert not errors
    expected = [slot_job_id("tick", 1000.0 + s) for s in range(1, 21)]
    assert sorted(created) == expected  # each slot once, by exactly one firer
    assert _ids(store, "tick") == expected


@pytest.mark.parametrize("policy,jobs,skipped", [("latest", [2400], (1200, 2100, 4)),
                                                 ("all", [1200, 1500, 1800, 2100, 2400], None),
                                                 ("none", [], (1200, 2400, 5))])
def test_catch_up_after_five_missed_slots(store, policy, jobs, skipped):
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    schedules.add("sync", {"command": "true"}, every="5m", catch_up=policy, overlap="queue")
    clock.now = 2400 + 100  # slots 1200 ... 2400 came and went while no worker ran
    schedules.fire_due(clock.now)
    assert _ids(store, "sync") == [slot_job_id("sync", s) for s in jobs]
    skips = store.schedule_skips("sync", 10)
    assert [(s["slot_at"], s["until_at"], s["count"]) for s in skips] == ([skipped] if skipped else [])
    assert store.get_schedule("sync")["next_at"] == 2700
    clock.now = 2700 + 1  # back to normal: the next slot fires on time, whatever the policy
    assert schedules.fire_due(clock.now) == [slot_job_id("sync", 2700)]


def test_a_late_slot_within_the_grace_is_fired_by_every_policy(store):
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    schedules.add("late", {"command": "true"}, every="1s", catch_up="none", overlap="queue")
    clock.now = 1003.5  # a busy worker comes 2.5 s late: late, not missed
    assert schedules.fire_due(clock.now) == [slot_job_id("late", s) for s in (1001, 1002, 1003)]
    clock.now = 1004 + LATE_GRACE + 10  # an outage: the old slots were missed, the fresh ones run
    cutoff = int(clock.now - LATE_GRACE)
    assert schedules.fire_due(clock.now) == [slot_job_id("late", s)
                                             for s in range(cutoff + 1, int(clock.now) + 1)]
    (skip,) = store.schedule_skips("late", 10)
    assert (skip["slot_at"], skip["until_at"], skip["count"]) == (1004, cutoff, cutoff - 1004 + 1)


def test_a_clock_set_back_fires_nothing_twice(store):
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    schedules.add("tick", {"command": "true"}, every="1m", overlap="queue")
    assert schedules.fire_due(1020.5) == [slot_job_id("tick", 1020)]
    assert schedules.fire_due(1080.5) == [slot_job_id("tick", 1080)]
    for back in (1000.0, 1030.0, 1079.0, 1080.9):  # the clock is set back: nothing fires again
        assert schedules.fire_due(back) == []
    assert schedules.fire_due(1140.2) == [slot_job_id("tick", 1140)]
    assert _ids(store, "tick") == [slot_job_id("tick", s) for s in (1020, 1080, 1140)]


@pytest.mark.parametrize("overlap", ["skip", "queue", "replace"])
def test_overlap_with_a_job_slower_than_its_period(store, overlap):
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    queue = schedules.queue
    schedules.add("slow", {"command": "sleep 100"}, every="1m", overlap=overlap)
    clock.now = 1020.5
    first = schedules.fire_due(clock.now)[0]
    assert queue.claim("host:1:1")["id"] == first  # it runs, and takes longer than a minute
    clock.now = 1080.5
    fired = schedules.fire_due(clock.now)
    job = queue.get(first)
    if overlap == "skip":
        assert fired == [] and job["state"] == "processing"
        (skip,) = store.schedule_skips("slow", 10)
        assert skip["slot_at"] == 1080 and f"job {first} was still processing" in skip["reason"]
        assert schedules.fire_due(1140.5) == []  # a run of skipped slots is one record
        (skip,) = store.schedule_skips("slow", 10)
        assert (skip["slot_at"], skip["until_at"], skip["count"]) == (1080, 1140, 2)
    else:
        assert fired == ["slow@1970-01-01T00:18:00Z"]
        assert bool(job["cancel_requested"]) == (overlap == "replace")
    assert store.get_schedule("slow")["last_job"] == (first if overlap == "skip" else fired[0])


def test_a_slot_that_cannot_be_enqueued_is_recorded_and_skipped(store, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    schedules.add("orphan", {"command": "true", "cwd": str(gone)}, every="1m")
    gone.rmdir()
    assert schedules.fire_due(1020.5) == []
    (skip,) = store.schedule_skips("orphan", 10)
    assert "cwd does not exist" in skip["reason"]
    assert store.get_schedule("orphan")["next_at"] == 1080  # the next slot is tried afresh


def test_a_paused_schedule_does_not_fire_and_resumes_from_now(store):
    clock = Clock(1000.0)
    schedules = _schedules(store, clock)
    schedules.add("p", {"command": "true"}, every="1m")
    schedules.pause("p")
    clock.now = 1510.0
    assert schedules.fire_due(clock.now) == []
    assert schedules.resume("p")["next_at"] == 1560  # no catch-up of the paused slots
    assert schedules.fire_due(1561.0) == ["p@1970-01-01T00:26:00Z"]


# -- command line ---------------------------------------------------------------------------------
BAD = [
    (["bad name", "--every", "1m", "true"], "invalid schedule name"),
    (["x@y", "--every", "1m", "true"], "invalid schedule name"),
    (["x", "--cron", "61 * * * *", "true"], "invalid cron expression '61 * * * *'"),
    (["x", "--cron", "* * * *", "true"], "4 fields"),
    (["x", "--cron", "0 2 * * funday", "true"], "invalid cron expression"),
    (["x", "--cron", "@reboot", "true"], "unknown shortcut"),
    (["x", "--cron", "0 0 30 2 *", "true"], "never matches"),
    (["x", "--cron", "0 2 * * *", "--tz", "Mars/Olympus", "true"], "unknown time zone"),
    (["x", "--every", "soon", "true"], "not a valid duration"),
    (["x", "--every", "0.5s", "true"], "whole number of seconds"),
    (["x", "--every", "1m", "--tz", "UTC", "true"], "--tz only applies"),
    (["x", "true"], "either --cron EXPR or --every DURATION"),
    (["x", "--every", "1m", "--timeout", "-3", "true"], "timeout"),
    (["x", "--every", "1m", "--cwd", "/no/such/dir", "true"], "cwd does not exist"),
    (["x", "--every", "1m", "--group", "no spaces", "true"], "group"),
    (["x", "--every", "1m", "--slots", "0", "true"], "slots"),
    (["keep", "--every", "1m", "true"], "already exists"),
]


def test_bad_schedules_are_refused_in_one_line_and_nothing_is_stored(cli, home):
    cli("schedule", "add", "keep", "--every", "1h", "true")
    before = dump_db(home)
    for args, message in BAD:
        result = cli("schedule", "add", *args, ok=False)
        assert result.exit_code == 1, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, args
        assert "Traceback" not in result.stderr and result.stdout == "", args
    assert dump_db(home) == before


def test_schedule_commands_round_trip(cli, home):
    added = json.loads(cli("schedule", "add", "nightly", "--cron", "30 2 * * *", "--tz", "Europe/Berlin",
                           "--max-retries", "2", "--priority", "5", "--env", "A=1", "--overlap",
                           "replace", "--group", "backups", "--slots", "2", "--json", "--",
                           "pg_dump", "-Fc", "db").stdout)
    assert added["when"] == "30 2 * * * (Europe/Berlin)" and added["overlap"] == "replace"
    assert added["job"]["command"] == "pg_dump -Fc db" and added["job"]["env"] == {"A": "1"}
    assert datetime.fromtimestamp(added["next_at"], ZoneInfo("Europe/Berlin")).strftime("%H:%M") == "02:30"
    assert "already exists" in cli("schedule", "add", "nightly", "--every", "1m", "true", ok=False).stderr
    listed = cli("schedule", "list").stdout
    assert "nightly" in listed and "(in " in listed
    run = json.loads(cli("schedule", "run", "nightly", "--json").stdout)
    assert run["id"].startswith("nightly@run-")
    job = json.loads(cli("show", run["id"], "--json").stdout)
    assert job["priority"] == 5 and job["max_retries"] == 2
    assert job["group"] == "backups" and job["slots"] == 2  # the group's limit applies to them
    shown = json.loads(cli("schedule", "show", "nightly", "--json").stdout)
    assert [j["id"] for j in shown["jobs"]] == [run["id"]] and shown["last_state"] == "pending"
    assert len(shown["upcoming"]) == 5
    assert json.loads(cli("schedule", "pause", "nightly", "--json").stdout)["paused"] is True
    assert "paused" in cli("schedule", "list").stdout
    assert json.loads(cli("schedule", "resume", "nightly", "--json").stdout)["paused"] is False
    status = json.loads(cli("status", "--json").stdout)["schedules"]
    assert status["count"] == 1 and status["next"]["name"] == "nightly"
    assert "Schedules: 1; next: nightly at" in cli("status").stdout
    # It lives in the database: a fresh process sees it.
    assert "nightly" in run_queuectl("schedule", "list", home=home).stdout
    cli("schedule", "remove", "nightly")
    assert "no schedule named 'nightly'" in cli("schedule", "show", "nightly", ok=False).stderr
    assert cli("show", run["id"]).exit_code == 0  # its jobs stay


# -- real workers ---------------------------------------------------------------------------------
def _slot_seconds(store, name):
    return [datetime.strptime(i.split("@")[1], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp() for i in _ids(store, name)]


def test_four_workers_fire_each_second_once_and_skip_while_a_slow_job_runs(home, store, workers):
    assert run_queuectl("schedule", "add", "tick", "--every", "1s", "--overlap", "queue", "true",
                        home=home).returncode == 0
    assert run_queuectl("schedule", "add", "slow", "--every", "1s", "sleep 2.5", home=home).returncode == 0
    workers.start(4)
    wait_until(lambda: len(_ids(store, "tick")) >= 5
               and sum(s["count"] for s in store.schedule_skips("slow", 10)) >= 2,
               timeout=30, message="five slots fired and two skipped")
    workers.stop()
    slots = _slot_seconds(store, "tick")
    assert slots == [slots[0] + n for n in range(len(slots))]  # every second once, none missed
    assert _no_chore_errors(home)
    # The slow one: never two at once; the slots that came meanwhile are recorded as skipped.
    jobs = list(reversed(store.jobs_with_prefix("slow@", 100)))  # oldest first
    assert jobs and all(job["state"] == "completed" for job in jobs[:-1])
    for before, after in zip(jobs, jobs[1:]):  # each enqueued only once the one before was done
        assert after["created_at"] >= before["finished_at"]
    shown = run_queuectl("schedule", "show", "slow", home=home).stdout
    assert "skipped slots:" in shown and "was still processing" in shown


def _no_chore_errors(home):
    """A lost race would show as a failed firing (a duplicate id) in some worker's log."""
    logs = Paths(home).home / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.log"))
    return "schedules" not in text and "Traceback" not in text


@pytest.mark.pg_only
def test_two_homes_on_one_postgres_queue_fire_each_slot_once(home, tmp_path, store, workers):
    from helpers import Workers

    other = Workers(tmp_path / "other-home")
    try:
        assert run_queuectl("schedule", "add", "tick", "--every", "1s", "--overlap", "queue", "true",
                            home=home).returncode == 0
        workers.start(2)
        other.start(2)
        wait_until(lambda: len(_ids(store, "tick")) >= 5, timeout=30, message="five slots fired")
        workers.stop()
        other.stop()
    finally:
        other.cleanup()
    slots = _slot_seconds(store, "tick")
    assert slots == [slots[0] + n for n in range(len(slots))]
    assert _no_chore_errors(home) and _no_chore_errors(tmp_path / "other-home")


def test_the_dashboard_lists_schedules_without_their_env(paths, queue):
    from dashboard_support import http, running_dashboard

    Schedules(queue).add("nightly", {"command": "./dump.sh", "env": {"TOKEN": "secret"}},
                         cron="0 3 * * *", tz="UTC")
    with running_dashboard(paths) as server:
        status, _, body = http(f"http://127.0.0.1:{server.port}/api/status")
    assert status == 200
    (row,) = body["schedules"]
    assert row["name"] == "nightly" and row["when"] == "0 3 * * * (UTC)" and row["next_at"] > 0
    assert "secret" not in json.dumps(body)
