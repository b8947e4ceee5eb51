"""A multi-slot worker batches short jobs as the single-slot Worker does (queuectl/slot_worker.py):
while runs are short it holds claimed jobs beyond its free slots, starts them without a
transaction when a slot frees (if their slots fit, in claim order) and records results several
per transaction; held jobs go back when they would wait behind long runs, and on stop.

The first tests drive a SlotWorker's own steps against a real store with real processes;
the rest run real worker processes, on every backend.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from helpers import counts, wait_until

from queuectl import joblog
from queuectl.executor import Outcome, pid_alive
from queuectl.jobspec import parse_job
from queuectl.models import Queue
from queuectl.slot_worker import SlotWorker
from queuectl.worker import HOLD_LIMIT
from queuectl.store import open_store

from test_slots_e2e import cli_home, peak, read_events, recording

W = "host:1:1"


def add(queue: Queue, n: int = 1, **fields: Any) -> List[str]:
    fields.setdefault("command", "true")
    specs = [parse_job(dict(fields), now=time.time(), default_cwd="/") for _ in range(n)]
    return [r.id for r in queue.enqueue(specs)]


def state(queue: Queue, job_id: str) -> tuple:
    row = queue.get(job_id)
    return row["state"], row["attempts"]


# -- a SlotWorker's steps, real store and real processes -------------------------------------
@pytest.fixture
def slot_worker(paths):
    """A 2-slot SlotWorker wired to a real store, driven step by step (no loop)."""
    saved_env = dict(os.environ)  # a run sets the job's environment in this process
    w = SlotWorker(paths, capacity=2)
    w.worker_id = W
    for directory in (paths.job_logs_dir, paths.workers_dir):
        directory.mkdir(parents=True, exist_ok=True)
    store = open_store(paths, "worker")
    w.queue = Queue(store)
    w.batch_size = store.batch
    yield w
    for _, run in list(w.runs.values()):
        run.abort("test over", False, kill_now=True)
    for job_id in list(w.runs):
        wait_until(lambda: w.runs[job_id][1].done(), message="the run to end")
        w._end(job_id)
    store.close()
    os.environ.clear()
    os.environ.update(saved_env)


def test_short_runs_make_a_claim_take_a_prefetch_and_a_freed_slot_starts_a_held_job(slot_worker, queue):
    ids = add(queue, 6)
    w = slot_worker
    w._short = True  # the last run was short
    w._fill()
    assert len(w.runs) == 2 and len(w.held) == 4, "2 free slots + prefetch: all 6 claimed"
    assert all(state(queue, i) == ("processing", 1) for i in ids)
    wait_until(lambda: all(run.done() for _, run in w.runs.values()), message="both runs over")
    w._ready = list(w._by_fd)
    w._collect()
    assert len(w.done) == 2 and not w.runs
    w._fill()  # no transaction: two held jobs start, the two results wait to be recorded
    assert len(w.runs) == 2 and len(w.held) == 2 and len(w.done) == 2
    assert state(queue, ids[0]) == ("processing", 1), "not recorded yet"


def test_a_held_job_whose_slots_do_not_fit_waits_then_goes_back_behind_a_long_run(slot_worker, queue):
    long_id = add(queue, 1, command="sleep 30")[0]
    big = add(queue, 1, slots=2)[0]
    small = add(queue, 1)[0]
    w = slot_worker
    w._short = True
    w._fill()
    # 'sleep 30' has one slot, 'big' needs both: it waits, and 'small' (after it in claim
    # order) waits behind it instead of overtaking it.
    assert list(w.runs) == [long_id] and [j["id"] for j in w.held] == [big, small]
    started = w.runs[long_id][1].started  # the long run's own start: HOLD_LIMIT counts from it
    wait_until(lambda: (w._fill(), not w.held)[1], message="the held jobs handed back")
    assert time.monotonic() - started >= HOLD_LIMIT
    assert state(queue, big) == ("pending", 0) and state(queue, small) == ("pending", 0)
    assert state(queue, long_id) == ("processing", 1) and list(w.runs) == [long_id]
    assert not os.path.exists(w.paths.job_log_name(big)), "never started"
    assert not w._short, "no prefetch until a run is short again"


def test_a_stopping_worker_hands_back_held_jobs_and_records_finished_runs(slot_worker, queue):
    ids = add(queue, 4)
    w = slot_worker
    _, claimed = w.queue.settle([], W, claim=4, free=4, capacity=2)
    w.done.append((claimed[0], Outcome(0, None, started_at=1.0, finished_at=1.5)))
    w.held.extend(claimed[1:])
    w.stop_requests = 1
    w._fill()
    assert not w.held and not w.done and not w.runs
    assert [state(queue, i) for i in ids] == [("completed", 1)] + [("pending", 0)] * 3


def test_a_cancel_of_a_held_job_cancels_it_unrun(slot_worker, queue):
    first, second = add(queue, 2)
    w = slot_worker
    _, claimed = w.queue.settle([], W, claim=2, free=2, capacity=2)
    w.held.extend(claimed)
    assert queue.cancel([second]) == {second: "cancelling"}
    w._check_cancels()
    assert not w.held
    assert state(queue, second) == ("cancelled", 0) and state(queue, first) == ("pending", 0)


# -- real worker processes -------------------------------------------------------------------
def test_short_jobs_are_recorded_several_per_transaction(queue, workers):
    ids = add(queue, 60)
    workers.start(1, "--concurrency", "2")
    wait_until(lambda: counts(cli_home(queue))["completed"] == 60, timeout=60,
               message="all completed")
    rows = [queue.get(i) for i in ids]
    assert all(r["attempts"] == 1 for r in rows)
    # One settle writes one `now` into every result it records; the run times are the runs' own.
    transactions = {r["updated_at"] for r in rows}
    assert len(transactions) <= 60 // 3, f"{len(transactions)} transactions recorded 60 results"
    assert all(r["started_at"] <= r["finished_at"] <= r["updated_at"] for r in rows)
    log = Path(queue.get(ids[-1])["log_location"].split(":", 1)[1])
    assert not log.exists()  # silent completed runs keep no log file (queuectl/spool.py)


def test_jobs_held_behind_two_long_runs_go_to_another_worker(cli, queue, workers):
    cli("add", "--id", "first", "--priority", "3", "true")
    cli("add", "--id", "long0", "--priority", "2", "sleep 5")
    cli("add", "--id", "long1", "--priority", "2", "sleep 5")
    for n in range(5):
        cli("add", "--id", f"short{n}", "true")
    # 'first' is short, so the claim after it takes long1 and the shorts as well.
    workers.start(1, "--concurrency", "2")
    wait_until(lambda: all(state(queue, f"long{n}")[0] == "processing" for n in range(2)),
               message="both slots busy with the long runs")
    workers.start(1)
    wait_until(lambda: all(state(queue, f"short{n}")[0] == "completed" for n in range(5)),
               timeout=15, message="the second worker to run the shorts")
    assert all(state(queue, f"long{n}")[0] == "processing" for n in range(2)), \
        "the shorts did not wait for the long runs"
    assert all(state(queue, f"short{n}")[1] == 1 for n in range(5))


def test_prefetch_keeps_group_limits_and_slot_fit(cli, queue, workers, tmp_path):
    events = tmp_path / "events"
    cli("group", "set", "g", "--parallel", "1")
    for i in range(12):
        cli("add", "--id", f"g{i}", "--group", "g", recording(events, 0))
    for i in range(12):
        cli("add", "--id", f"one{i}", recording(events, 0))
        if i % 3 == 0:
            cli("add", "--id", f"two{i}", "--slots", "2", recording(events, 0))
    workers.start(1, "--concurrency", "2")
    total = 12 + 12 + 4
    wait_until(lambda: counts(cli_home(queue))["completed"] == total, timeout=60,
               message="all completed")
    found = read_events(events)
    assert peak(found, {f"g{i}" for i in range(12)}) == 1, "never more than 1 of g at once"
    used, top = 0, 0  # slots in use, replayed from what ran
    for _, what, job_id in found:
        size = 2 if job_id.startswith("two") else 1
        used += size if what == "start" else -size
        top = max(top, used)
    assert top <= 2, "the running jobs' slots never exceeded the worker's 2"
    assert all(queue.get(e[2])["attempts"] == 1 for e in found)
    assert {g["name"]: g["running"] for g in queue.groups()}["g"] == 0


@pytest.mark.parametrize("force", [False, True])
def test_a_stop_amid_short_jobs_hands_back_held_ones_unrun(queue, workers, force, tmp_path):
    runs = tmp_path / "runs"
    ids = add_silent_recorded(queue, runs, 400)
    pid = workers.start(1, "--concurrency", "2")[0]
    wait_until(lambda: counts(cli_home(queue))["completed"] >= 20, timeout=30,
               message="some done")
    result = workers.stop(*(["--force"] if force else []), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: not pid_alive(pid), message="worker gone")
    check_each_ran_once(queue, ids, runs, allow_failed=force)
    assert any(state(queue, i)[0] == "pending" for i in ids), "the stop came before the end"


def test_a_sigkilled_worker_holding_jobs_has_each_recovered_once(cli, queue, workers, tmp_path):
    cli("config", "set", "backoff_base", "0")  # a run cut short is retried at once
    runs = tmp_path / "runs"
    ids = add_silent_recorded(queue, runs, 400)
    first = workers.start(1, "--concurrency", "2")[0]
    wait_until(lambda: counts(cli_home(queue))["completed"] >= 20, timeout=30,
               message="some done")
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not pid_alive(first), message="worker dead")
    workers.start(1, "--concurrency", "2")
    wait_until(lambda: counts(cli_home(queue))["completed"] == 400, timeout=60,
               message="all recovered and completed")
    check_each_ran_once(queue, ids, runs)


def add_silent_recorded(queue: Queue, runs: Path, n: int) -> List[str]:
    """n jobs that print nothing (their logs are spool links, pruned once recorded) and
    append "job attempt" to ``runs``: the evidence of what ran."""
    return add(queue, n, command=f'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT" >> {runs}')


def check_each_ran_once(queue: Queue, ids: List[str], runs: Path, allow_failed: bool = False) -> None:
    """No job left claimed; no attempt ran twice (``runs``: what add_silent_recorded's jobs
    wrote), a completed job's last attempt ran, a job back in the queue never started; a log
    left behind holds only its job's attempts, each once."""
    allowed = {"completed", "pending"} | ({"failed"} if allow_failed else set())
    rows: Dict[str, Dict[str, Any]] = {i: queue.get(i) for i in ids}
    assert {r["state"] for r in rows.values()} <= allowed, {r["state"] for r in rows.values()}
    ran: Dict[str, List[int]] = {}
    for line in runs.read_text().splitlines():
        job_id, attempt = line.split()
        ran.setdefault(job_id, []).append(int(attempt))
    logs = cli_home(queue) / "logs" / "jobs"
    for job_id, row in rows.items():
        done = ran.get(job_id, [])
        assert len(done) == len(set(done)), (job_id, done)
        assert set(done) <= set(range(1, row["attempts"] + 1)), (job_id, row["attempts"], done)
        if row["state"] == "completed":
            assert row["attempts"] in done, (job_id, row["attempts"], done)
        elif row["state"] == "pending":
            assert (row["attempts"], done) == (0, []), (job_id, row["attempts"], done)
        headers = [n for n, _ in joblog.attempts(logs / f"{job_id}.log", job_id)]
        assert len(headers) == len(set(headers)), (job_id, headers)
        assert set(headers) <= set(range(1, row["attempts"] + 1)), (job_id, row["attempts"], headers)
