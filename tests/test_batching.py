"""Workers claim and record short jobs several per transaction; recovery reads job logs.

The rules (models.Queue.settle / recover), the log's result lines (joblog) and the worker's
batching decisions are tested here against real SQLite files; test_e2e.py and
tests/reliability run the same paths with real worker processes.
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from typing import Any, Dict, List

import pytest

from helpers import PG_DSN, psycopg, wait_until

from queuectl import executor, joblog, worker as worker_mod, worker_launcher
from queuectl.executor import Outcome
from queuectl.jobspec import parse_job
from queuectl.models import Queue
from queuectl.store import open_store
from queuectl.worker import RECORD_DELAY, Worker

W = "host:1:1"


def add(queue: Queue, n: int = 1, **fields: Any) -> List[str]:
    fields.setdefault("command", "true")
    specs = [parse_job(dict(fields), now=time.time(), default_cwd="/") for _ in range(n)]
    return [r.id for r in queue.enqueue(specs)]


def poke(queue: Queue, job_id: str, **fields: Any) -> None:
    """Put a job into a state the test needs, through the store (works on every backend)."""
    with queue.store.transaction():
        assert queue.store.update_job(job_id, fields) == 1


def row(queue: Queue, job_id: str) -> Dict[str, Any]:
    return queue.get(job_id)


# -- models: settle ------------------------------------------------------------------------------
def test_settle_records_several_runs_and_claims_several_in_claim_order(queue):
    low = add(queue, 3)
    high = add(queue, 1, priority=5)
    first = queue.claim(W)
    assert first["id"] == high[0]
    outcome = Outcome(0, None, "out\n", started_at=100.0, finished_at=100.5)
    states, claimed = queue.settle([(first, outcome)], W, claim=8)
    assert states == ["completed"]
    assert [j["id"] for j in claimed] == low, "claimed in priority, then insertion order"
    assert all(row(queue, j)["state"] == "processing" for j in low)
    done = row(queue, high[0])
    # The recorded times are the run's own, not the time the result was written down.
    assert (done["started_at"], done["finished_at"], done["output_tail"]) == (100.0, 100.5, "out\n")

    failed = Outcome(3, "exit code 3", "")
    states, more = queue.settle([(claimed[0], Outcome(0, None)), (claimed[1], failed)], W, claim=8)
    assert states == ["completed", "failed"] and more == []
    assert row(queue, low[1])["last_error"] == "exit code 3"
    assert [r["error"] for r in queue.details(low[1])["runs"]] == ["exit code 3"]


def test_settle_releases_unstarted_jobs_without_a_trace(queue):
    ids = add(queue, 3)
    poke(queue, ids[1], attempts=1, state="failed")
    _, claimed = queue.settle([], W, claim=3)
    assert [j["attempts"] for j in claimed] == [1, 2, 1]
    states, _ = queue.settle([], W, release=claimed)
    assert states == ["released"] * 3
    after = [row(queue, i) for i in ids]
    assert [(j["state"], j["attempts"], j["worker_id"]) for j in after] == [
        ("pending", 0, None), ("failed", 1, None), ("pending", 0, None)]
    assert queue.details(ids[0])["runs"] == []


def test_a_held_job_cancelled_before_it_started_is_cancelled_not_requeued(queue):
    parent = add(queue)[0]
    child = add(queue, after=[parent])[0]
    _, claimed = queue.settle([], W, claim=1)
    assert queue.cancel([parent]) == {parent: "cancelling"}  # it is 'processing' in the table
    states, _ = queue.settle([], W, release=claimed)
    assert states == ["cancelled"]
    job = row(queue, parent)
    assert (job["state"], job["attempts"]) == ("cancelled", 0)
    assert job["last_error"] == "cancelled by user before it started"
    assert row(queue, child)["state"] == "cancelled", "its dependents are cancelled too"


def test_one_settle_releases_a_job_waiting_on_two_of_its_results(queue):
    a, b = add(queue, 2)
    both = add(queue, after=[a, b])[0]
    one = add(queue, after=[a])[0]
    _, claimed = queue.settle([], W, claim=2)
    queue.settle([(job, Outcome(0, None)) for job in claimed], W)
    assert row(queue, both)["deps_left"] == 0 and row(queue, one)["deps_left"] == 0
    assert queue.claim(W)["id"] == both


def test_a_result_for_a_job_taken_from_us_is_dropped(queue):
    job_id = add(queue)[0]
    job = queue.claim(W)
    poke(queue, job_id, worker_id="other:2:2")
    assert queue.settle([(job, Outcome(0, None))], W, release=[job]) == (["lost", "lost"], [])
    assert row(queue, job_id)["state"] == "processing"


# -- joblog: what recovery reads ----------------------------------------------------------------
def test_a_lost_result_in_a_batch_is_dropped_and_the_rest_recorded(queue):
    """One statement records a whole batch; only the rows still ours change."""
    ids = add(queue, 3)
    _, claimed = queue.settle([], W, claim=3)
    poke(queue, ids[1], worker_id="other:2:2")  # recovered by another worker meanwhile
    states, _ = queue.settle([(job, Outcome(0, None, "ok\n")) for job in claimed], W)
    assert states == ["completed", "lost", "completed"]
    assert [row(queue, i)["state"] for i in ids] == ["completed", "processing", "completed"]
    assert row(queue, ids[0])["output_tail"] == "ok\n"


def test_only_jobs_some_dependent_waits_for_release_dependents(queue, mocker):
    plain, parent = add(queue, 2)
    child = add(queue, after=[parent])[0]
    release = mocker.spy(queue.store, "release_dependents")
    _, claimed = queue.settle([], W, claim=2)
    assert [j["id"] for j in claimed] == [plain, parent]
    queue.settle([(claimed[0], Outcome(0, None))], W)
    assert release.call_count == 0, "nobody waits for it: no dependents statement"
    queue.settle([(claimed[1], Outcome(0, None))], W)
    assert [call.args[0] for call in release.call_args_list] == [[parent]]
    assert row(queue, child)["deps_left"] == 0


@pytest.mark.pg_only
def test_a_dependent_enqueued_while_its_dependency_finishes_still_runs(paths, queue, mocker):
    """The enqueue reads the dependency as running while the run's result is being
    recorded on another connection: the record must wait for the enqueue's commit (the
    row lock wait_on takes) and then release the new dependent, or it would wait forever."""
    parent = add(queue)[0]
    worker_store = open_store(paths, "worker")
    try:
        worker_queue = Queue(worker_store)
        job = worker_queue.claim(W)
        read, go = threading.Event(), threading.Event()
        original = queue.store.wait_on

        def wait_on_then_pause(ids):
            states = original(ids)
            read.set()  # the dependency's state is read: let the finish race us
            assert go.wait(20)
            return states

        mocker.patch.object(queue.store, "wait_on", side_effect=wait_on_then_pause)
        added: List[str] = []
        enqueue = threading.Thread(target=lambda: added.extend(add(queue, after=[parent])))
        enqueue.start()
        assert read.wait(20)
        finish = threading.Thread(target=worker_queue.settle, args=([(job, Outcome(0, None))], W))
        finish.start()
        try:  # the finish blocks on the dependency's row until the enqueue commits
            wait_until(lambda: lock_waits(f"queuectl:{worker_store.schema}"), timeout=10,
                       message="the finish waiting for the enqueue's row lock")
        finally:
            go.set()
            enqueue.join(20)
            finish.join(20)
        assert row(queue, parent)["state"] == "completed"
        child = row(queue, added[0])
        assert child["deps_left"] == 0, "the dependent waits for a job already completed"
        assert worker_queue.claim(W)["id"] == added[0]
    finally:
        worker_store.close()


def lock_waits(application: str) -> int:
    """Sessions of this application waiting for a lock (read on a connection of its own)."""
    with psycopg.connect(PG_DSN) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND wait_event_type = 'Lock'", (application,)).fetchone()[0]


def test_attempt_status_reads_header_and_result_lines(tmp_path):
    log = tmp_path / "j.log"
    assert joblog.attempt_status(log, 1, W) == (False, None)  # no log: never started
    log.write_bytes(joblog.header("j", 1, W, "true"))
    assert joblog.attempt_status(log, 1, W) == (True, None)  # started, no result yet
    with log.open("ab") as handle:
        handle.write(b"some output\n" + joblog.result_line("j", 1, None))
    assert joblog.attempt_status(log, 1, W) == (True, joblog.OK_RESULT)
    with log.open("ab") as handle:
        handle.write(joblog.header("j", 2, W, "true") + joblog.result_line("j", 2, "exit code 3"))
    assert joblog.attempt_status(log, 2, W) == (True, "exit code 3")
    assert joblog.attempt_status(log, 3, W) == (False, None)
    # The result line is not a header: `logs` still sees exactly two attempts.
    assert [n for n, _ in joblog.attempts(log)] == [1, 2]


def test_attempt_status_after_a_dlq_retry_matches_the_claiming_worker(tmp_path):
    """Attempt numbers start again after `dlq retry`: the old attempt 1's result must not
    be taken for a new attempt 1 that another worker claimed but never started."""
    log = tmp_path / "j.log"
    log.write_bytes(joblog.header("j", 1, "old:1:1", "false") + joblog.result_line("j", 1, "exit code 1"))
    assert joblog.attempt_status(log, 1, W) == (False, None)
    with log.open("ab") as handle:
        handle.write(joblog.header("j", 1, W, "true"))
    assert joblog.attempt_status(log, 1, W) == (True, None)


def test_attempt_status_of_a_huge_log_assumes_the_run_started(tmp_path):
    log = tmp_path / "j.log"
    log.write_bytes(joblog.header("j", 1, W, "yes") + b"y\n" * joblog.STATUS_BYTES)
    assert joblog.attempt_status(log, 1, W) == (True, None)
    with log.open("ab") as handle:
        handle.write(joblog.result_line("j", 1, "killed by SIGTERM"))
    assert joblog.attempt_status(log, 1, W) == (True, "killed by SIGTERM")


def test_run_job_brackets_each_attempt_with_header_and_result(tmp_path):
    log = tmp_path / "j.log"
    ok = executor.run_job("echo hi", False, str(tmp_path), log, "j", 1, W, None, {})
    failed = executor.run_job("echo no; exit 4", False, str(tmp_path), log, "j", 2, W, None, {})
    assert (ok.ok, ok.tail, failed.error, failed.tail) == (True, "hi\n", "exit code 4", "no\n")
    assert ok.started_at <= ok.finished_at <= failed.started_at <= failed.finished_at
    # The header's stamp is the second the attempt started; the check below may run a second later.
    text = re.sub(r"started \S+ on", "started T on", log.read_text())
    header = re.sub(r"started \S+ on", "started T on", joblog.header("j", 2, W, "echo no; exit 4").decode())
    assert text.endswith("hi\n--- queuectl job j attempt 1 finished: exit 0 ---\n" + header
                         + "no\n--- queuectl job j attempt 2 finished: exit code 4 ---\n")


# -- recovery from the log -----------------------------------------------------------------------
@pytest.fixture
def dead_worker() -> str:
    """The worker id of a process on this host that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return worker_launcher.worker_id_for(proc.pid, 1)


@pytest.mark.parametrize("log_text,state,attempts,error", [
    (None, "pending", 0, None),                                            # claimed, never started
    ("head", "failed", 1, "worker died (process gone)"),                   # died mid-run
    ("head+ok", "completed", 1, None),                                     # ran; result not recorded
    ("head+fail", "failed", 1, "exit code 7"),
])
def test_recovery_settles_a_dead_workers_jobs_from_their_logs(paths, queue, dead_worker, log_text,
                                                              state, attempts, error):
    job_id = add(queue)[0]
    queue.claim(dead_worker)
    log = paths.job_log(job_id)
    log.parent.mkdir(parents=True)
    if log_text:
        text = joblog.header(job_id, 1, dead_worker, "true")
        if log_text == "head+ok":
            text += joblog.result_line(job_id, 1, None)
        elif log_text == "head+fail":
            text += joblog.result_line(job_id, 1, "exit code 7")
        log.write_bytes(text)
    assert worker_launcher.recover_dead_workers_jobs(queue, paths) == {
        job_id: "released" if state == "pending" else state}
    job = row(queue, job_id)
    assert (job["state"], job["attempts"], job["last_error"]) == (state, attempts, error)
    runs = queue.details(job_id)["runs"]
    assert [r["error"] for r in runs] == ([] if state == "pending" else [error])


def test_an_unstarted_claim_of_a_frozen_worker_counts_as_an_interrupted_attempt(queue):
    """Past its lease a worker may still be alive (frozen, say) and start the job when it
    wakes: the claim cannot go back as if never made, or that run would repeat the attempt."""
    job_id = add(queue)[0]
    queue.claim(W)
    poke(queue, job_id, lease_until=0)
    never_started = lambda job_id, attempt, worker_id: (False, False, None)  # noqa: E731
    assert queue.recover(lambda worker_id: True, run_result=never_started) == {job_id: "failed"}
    job = row(queue, job_id)
    assert (job["attempts"], job["last_error"]) == (1, "worker died (lease expired)")


# -- the worker's batching decisions (run_job faked: no processes) ------------------------------
@pytest.fixture
def bare_worker(paths, mocker):
    """A Worker wired to a real store, driven step by step; its runs take ``run.seconds``."""
    w = Worker(paths)
    w.worker_id = W
    store = open_store(paths, "worker")
    w.queue = Queue(store)
    w.batch_size = store.batch
    run = mocker.patch.object(Worker, "_execute")
    run.seconds = 0.001
    run.side_effect = lambda job: Outcome(0, None, duration=run.seconds, started_at=1.0,
                                          finished_at=1.0 + run.seconds)
    w.run_mock = run
    yield w
    store.close()


def drive(w: Worker, steps: int) -> List[int]:
    """Run up to ``steps`` jobs the way _loop does; returns how many jobs the worker held
    (claimed, not started) after each claim."""
    held = []
    for _ in range(steps):
        job = w._next_job()
        if job is None:
            break
        held.append(len(w.held))
        w._run(job)
    return held


def test_short_jobs_are_claimed_and_recorded_several_per_transaction(bare_worker, queue, mocker):
    ids = add(queue, 20)
    settle = mocker.spy(bare_worker.queue, "settle")
    drive(bare_worker, 25)
    bare_worker._settle(release=True)
    assert all(row(queue, i)["state"] == "completed" for i in ids)
    assert all(row(queue, i)["attempts"] == 1 for i in ids)
    # 1 job, then a batch at a time, then the last results with nothing left to claim.
    assert settle.call_count <= 1 + -(-19 // bare_worker.batch_size) + 1
    assert bare_worker.batch == 1, "idle again: the next claim takes one job"


def test_a_result_waits_at_most_record_delay_while_held_jobs_keep_the_worker_busy(bare_worker, queue):
    """A batch of 32 short jobs can take a while: the first ones' results are recorded once
    they have waited RECORD_DELAY, without waiting for the held ones to run."""
    ids = add(queue, 40)  # more than a batch on any backend
    drive(bare_worker, 3)  # one job alone, then a batch: two of it ran, the rest is held
    assert bare_worker.held and bare_worker.done
    ran = [job["id"] for job, _ in bare_worker.done]
    assert all(row(queue, i)["state"] == "processing" for i in ran), "not recorded yet"
    bare_worker._done_since -= RECORD_DELAY  # as if they had waited that long
    held = [job["id"] for job in bare_worker.held]
    assert bare_worker._next_job()["id"] == held[0]
    assert all(row(queue, i)["state"] == "completed" for i in ran)
    assert [job["id"] for job in bare_worker.held] == held[1:], "no claim, no hand-back"
    assert all(row(queue, i)["state"] == "processing" for i in held)
    assert row(queue, ids[-1])["state"] == "pending"


def test_long_jobs_are_claimed_one_at_a_time(bare_worker, queue):
    add(queue, 5)
    bare_worker.run_mock.seconds = worker_mod.SHORT_JOB * 2
    assert drive(bare_worker, 5) == [0, 0, 0, 0, 0]


def test_a_worker_error_is_not_a_short_run(bare_worker, queue):
    """A job that could not even be started (say, its log cannot be written) fails fast;
    that must not make the worker claim eight jobs to fail the same way."""
    add(queue, 5)
    bare_worker.run_mock.side_effect = OSError(28, "No space left on device")
    assert drive(bare_worker, 3) == [0, 0, 0]
    assert [row(queue, str(n))["last_error"] for n in (1, 2)] == [
        "worker error: OSError: [Errno 28] No space left on device"] * 2


def test_a_graceful_stop_hands_back_held_jobs_and_records_finished_ones(bare_worker, queue):
    ids = add(queue, 6)
    assert drive(bare_worker, 2)[1] == 4  # the second claim took the other five
    bare_worker.stop_requests = 1
    bare_worker._settle(release=True, tries=10)  # what _loop does on its way out
    states = [(row(queue, i)["state"], row(queue, i)["attempts"]) for i in ids]
    assert states == [("completed", 1)] * 2 + [("pending", 0)] * 4


def test_held_jobs_go_back_when_the_claim_lapses(bare_worker, queue):
    ids = add(queue, 4)
    drive(bare_worker, 1)
    bare_worker._next_job()  # claims the rest, starts the first of them
    assert len(bare_worker.held) == 2
    for job in bare_worker.held:  # e.g. the worker was frozen for most of its lease
        job["lease_until"] = 0.0
    job = bare_worker._next_job()
    # Handed back, then claimed again with a fresh lease: the lapsed claim left no trace.
    assert job["id"] == ids[2] and job["lease_until"] > time.time()
    assert [row(queue, i)["attempts"] for i in ids[2:]] == [1, 1]
    assert [j["id"] for j in bare_worker.held] == [ids[3]]


@pytest.mark.parametrize("held", [2, 0])
def test_a_run_that_turns_out_long_hands_back_the_jobs_held_behind_it(paths, queue, held):
    """The real _execute with a real process: HOLD_LIMIT into the run, held jobs go back
    and the results not yet recorded are written down."""
    ids = add(queue, 2 + held)
    w = Worker(paths)
    w.worker_id = W
    for directory in (paths.job_logs_dir, paths.workers_dir):
        directory.mkdir(parents=True)
    w._sig_r, sig_w = os.pipe()
    os.set_blocking(w._sig_r, False)  # as the worker's own: a wake-up drains it
    store = open_store(paths, "worker")
    w.listener = store.listen()
    w.queue = Queue(store)
    try:
        _, claimed = w.queue.settle([], W, claim=len(ids))
        w.done.append((claimed[0], Outcome(0, None)))      # ran, not recorded yet
        w.held.extend(claimed[2:])                         # claimed behind the run
        long_job = dict(claimed[1], command="sleep 0.5")
        started = time.monotonic()
        outcome = w._execute(long_job)
        assert outcome.ok and time.monotonic() - started >= 0.5
        assert not w.held and not w.done
        assert [(row(queue, i)["state"], row(queue, i)["attempts"]) for i in ids] == [
            ("completed", 1), ("processing", 1)] + [("pending", 0)] * held
    finally:
        w.listener.close()
        os.close(w._sig_r)
        os.close(sig_w)
        store.close()


# -- end to end: jobs never wait behind a long run -----------------------------------------------
def test_jobs_behind_a_long_run_go_to_another_worker(cli, queue, workers):
    cli("add", "--id", "first", "--priority", "3", "true")
    cli("add", "--id", "long", "--priority", "2", "sleep 5")
    for n in range(5):
        cli("add", "--id", f"short{n}", "true")
    workers.start(1)  # 'first' is short, so the next claim takes 'long' and the shorts too
    wait_until(lambda: row(queue, "long")["state"] == "processing", message="'long' to start")
    workers.start(1)
    wait_until(lambda: all(row(queue, f"short{n}")["state"] == "completed" for n in range(5)),
               message="the second worker to run the shorts")
    assert row(queue, "long")["state"] == "processing", "the shorts did not wait for 'long'"
    assert all(row(queue, f"short{n}")["attempts"] == 1 for n in range(5))
    assert "--- queuectl job short0 attempt 1 finished: exit 0 ---" in cli("logs", "short0").stdout
