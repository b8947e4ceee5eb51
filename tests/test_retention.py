"""Retention (issue 14): workers delete old finished jobs and their logs in small batches.

Model-level with a fake clock on both backends (what goes, what stays, dependents), the
chore with real log files, concurrent purgers, and one end-to-end run with a real worker.
"""
from __future__ import annotations

import types

import pytest

from helpers import in_threads, make_dead, run_queuectl, wait_until

from queuectl import retention
from queuectl.errors import InvalidInput, NotFound
from queuectl.executor import Outcome
from queuectl.jobspec import parse_job
from queuectl.models import Queue
from queuectl.store import open_store

W = "host:1:1"
HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def add(q: Queue, job_id: str, after=()) -> None:
    q.enqueue([parse_job({"id": job_id, "command": "true", "after": list(after)}, now=q.clock(),
                         default_cwd="/")])


def run_next(q: Queue, expect: str, ok: bool = True) -> None:
    job = q.claim(W)
    assert job is not None and job["id"] == expect
    q.finish(job, Outcome(0, None) if ok else Outcome(1, "exit code 1"), W)


@pytest.fixture
def clocked(store):
    clock = Clock()
    return Queue(store, clock=clock), clock


def test_due_jobs_go_and_everything_else_stays(clocked):
    q, clock = clocked
    q.config_set("keep_completed", "1h")
    q.config_set("keep_cancelled", "2h")
    add(q, "old")
    run_next(q, "old")
    add(q, "dead")
    make_dead(q, "dead")
    add(q, "gone")
    q.cancel(["gone"])
    add(q, "parent")
    run_next(q, "parent")
    clock.now += 50 * 60
    add(q, "new")
    run_next(q, "new")
    add(q, "blocker")
    add(q, "child", after=["parent", "blocker"])
    running = q.claim(W)
    assert running["id"] == "blocker"
    clock.now += 11 * 60               # old is 61 min old, new 11 min
    totals = q.store.counter_totals()

    assert q.purge_due(100) == ["old"]
    assert q.purge_due(100) == []

    clock.now += 3 * HOUR
    # new and gone are due; parent is not while child waits for it; dead is kept forever;
    # nothing active (child pending, blocker running) is ever a candidate.
    assert sorted(q.purge_due(100)) == ["gone", "new"]
    assert q.states(["old", "dead", "gone", "parent", "blocker", "child", "new"]) == {
        "dead": "dead", "parent": "completed", "blocker": "processing", "child": "pending"}
    assert q.store.counter_totals() == totals  # counters never go down with the rows

    # The child still counts its dependencies right and runs once blocker completes.
    q.finish(running, Outcome(0, None), W)
    run_next(q, "child")
    clock.now += 2 * HOUR
    assert sorted(q.purge_due(100)) == ["blocker", "child", "parent"]
    assert q.states(["dead"]) == {"dead": "dead"}
    q.config_set("keep_dead", "1d")
    clock.now += 2 * 86400
    assert q.purge_due(100) == ["dead"]
    assert sum(q.counts().values()) == 0
    assert q.store.counter_totals()[("runs_total", '{"outcome":"completed"}')] == 5


def test_batches_are_small_and_oldest_finished_first(clocked):
    q, clock = clocked
    q.config_set("keep_completed", "1h")
    for n in range(7):
        add(q, f"j{n}")
    # Finish them newest id first: retention follows finish time, not insertion order.
    jobs = [q.claim(W) for _ in range(7)]
    for job in reversed(jobs):
        clock.now += 1
        q.finish(job, Outcome(0, None), W)
    clock.now += 2 * HOUR
    assert q.purge_due(3) == ["j6", "j5", "j4"]
    assert q.purge_due(3) == ["j3", "j2", "j1"]
    assert q.purge_due(3) == ["j0"]


def test_none_keeps_jobs_forever_and_a_purged_dependency_is_refused(clocked, cli):
    q, clock = clocked
    q.config_set("keep_completed", "none")
    add(q, "a")
    run_next(q, "a")
    clock.now += 1000 * 86400
    assert q.purge_due(100) == []
    q.config_set("keep_completed", "1d")
    assert q.purge_due(100) == ["a"]
    with pytest.raises(NotFound, match="purged"):
        add(q, "b", after=["a"])  # the enqueue is refused whole: nothing half-added
    assert q.states(["b"]) == {}
    result = cli("add", "--id", "c", "--after", "a", "true", ok=False)
    assert result.exit_code != 0 and "purged" in result.stderr and "Traceback" not in result.stderr


def test_keep_settings_take_durations_and_none(queue):
    assert queue.config_set("keep_completed", "12h") == ("keep_completed", 43200.0)
    assert queue.config_set("keep_dead", "7d") == ("keep_dead", 604800.0)
    assert queue.config_set("keep_cancelled", "none") == ("keep_cancelled", None)
    assert queue.settings(fresh=True)["keep_completed"] == 43200.0
    for bad in ("0", "-1d", "soon"):
        with pytest.raises(InvalidInput):
            queue.config_set("keep_completed", bad)
    queue.config_unset("keep_dead")
    assert queue.settings(fresh=True)["keep_dead"] is None  # the default: the DLQ stays


def test_concurrent_purgers_share_the_work_without_errors(paths, clocked):
    q, clock = clocked
    q.config_set("keep_completed", "1s")
    n = 120
    q.enqueue([parse_job({"command": "true"}, now=clock(), default_cwd="/") for _ in range(n)])
    states, claimed = q.settle((), W, claim=n)
    q.settle([(job, Outcome(0, None)) for job in claimed], W)
    clock.now += 10
    deleted = []

    def purger(_n: int) -> None:
        store = open_store(paths, "worker")
        try:
            other = Queue(store, clock=clock)
            while True:
                ids = other.purge_due(7)
                if not ids:
                    return
                deleted.extend(ids)
        finally:
            store.close()

    errors = in_threads(purger, 3, timeout=60)
    assert not errors, errors
    assert len(deleted) == n and len(set(deleted)) == n
    assert q.counts()["completed"] == 0


def test_the_chore_removes_log_files_and_comes_back_soon_after_a_full_batch(paths, clocked, mocker):
    q, clock = clocked
    q.config_set("keep_completed", "1h")
    mocker.patch.object(retention, "BATCH", 3)
    paths.job_logs_dir.mkdir(parents=True)
    for n in range(4):
        add(q, f"j{n}")
        run_next(q, f"j{n}")
        paths.job_log(f"j{n}").write_text("output\n")
    keep = paths.job_log("other")
    keep.write_text("a job that is not due\n")
    clock.now += 2 * HOUR
    purge, tidy = retention.chores_for(q, paths)
    before = purge.next_at
    purge.run(clock())
    assert sorted(p.name for p in paths.job_logs_dir.iterdir()) == ["j3.log", "other.log"]
    assert purge.next_at <= before + retention.SOON + 1  # full batch: again soon
    purge.run(clock())
    assert sorted(p.name for p in paths.job_logs_dir.iterdir()) == ["other.log"]
    assert q.states([f"j{n}" for n in range(4)]) == {}
    tidy.run(clock())  # folds counters of workers that are not registered, keeps sums
    assert q.store.counter_totals()[("runs_total", '{"outcome":"completed"}')] == 4


def test_a_backlog_is_deleted_at_most_duty_of_the_workers_time(paths, clocked, mocker):
    q, clock = clocked
    q.config_set("keep_completed", "1h")
    mocker.patch.object(retention, "BATCH", 2)
    for n in range(5):
        add(q, f"j{n}")
        run_next(q, f"j{n}")
    clock.now += 2 * HOUR
    purge, _ = retention.chores_for(q, paths)
    ticks = iter([100.0, 100.06, 100.06])  # a batch that took 60 ms
    mocker.patch.object(retention, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))
    purge.run(clock())
    assert purge.next_at == pytest.approx(100.06 + 0.06 / retention.DUTY)  # 2 s: 3 % of the time
    ticks = iter([200.0, 200.001, 200.001])  # a quick one: SOON, not sooner
    purge.run(clock())
    assert purge.next_at == pytest.approx(200.001 + retention.SOON)
    next_at = purge.next_at
    ticks = iter([300.0, 300.001, 300.001])
    purge.run(clock())  # the last one, not full: the chore's own interval (EVERY) applies
    assert purge.next_at == next_at and q.counts().get("completed", 0) == 0


@pytest.mark.sqlite_only  # the model tests above cover both backends; this is the real loop
def test_a_running_worker_purges_completed_jobs_and_their_logs(home, workers, paths):
    assert run_queuectl("config", "set", "keep_completed", "1s", home=home).returncode == 0
    for n in range(3):
        assert run_queuectl("add", "--id", f"e{n}", "echo hi", home=home).returncode == 0
    workers.start(1)
    store = open_store(paths, "reader")
    try:
        q = Queue(store)
        wait_until(lambda: not q.states(["e0", "e1", "e2"]), timeout=30, message="jobs purged")
        wait_until(lambda: not list(paths.job_logs_dir.iterdir()), timeout=10, message="logs purged")
        # They did run, and the counter says so although their rows are gone.
        assert q.store.counter_totals()[("runs_total", '{"outcome":"completed"}')] == 3
    finally:
        store.close()


def test_a_replace_that_loses_its_job_meanwhile_checks_again(queue, mocker):
    """PostgreSQL: retention may delete a completed job between the enqueue's check and its
    update (READ COMMITTED). The update then changes nothing; the enqueue must run again
    (and add the job anew), never report success for a job that is not there."""
    add(queue, "nightly")
    run_next(queue, "nightly")
    real = queue.store.update_job
    calls = []

    def first_misses(job_id, fields, **kw):
        calls.append(job_id)
        return 0 if len(calls) == 1 else real(job_id, fields, **kw)

    mocker.patch.object(queue.store, "update_job", side_effect=first_misses)
    spec = parse_job({"id": "nightly", "command": "echo again"}, now=queue.clock(), default_cwd="/")
    assert queue.enqueue([spec], if_exists="replace")[0].created
    assert len(calls) == 2
    job = queue.get("nightly")
    assert job["state"] == "pending" and job["command"] == "echo again"
