"""Scenario 1: a chaos loop SIGKILLs workers (and their jobs) while jobs drain.

Nothing may be lost (every job ends completed or dead) and nothing may run twice unless a
kill interrupted it, and then the interrupted run is a recorded attempt ("worker died").
Two storms: 20 ms jobs (one claim per job), and instant ones, which workers claim and
record several per transaction, so kills also land on jobs claimed but not started and on
runs finished but not yet recorded (recovery reads those from the job logs).
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter

import pytest

from helpers import wait_until
from relhelpers import (alive, children_of, enqueue_file, executions, jobs, record, runs,
                        sigkill, sigkill_group, state_counts, worker_log_text)

from queuectl.paths import Paths
from queuectl.worker_launcher import start_detached


@pytest.mark.parametrize("then,total,kills_wanted,cadence", [
    ("sleep 0.02", 1000, 30, 0.1),   # at least 30 kills; 40 at most
    ("", 4000, 15, 0.05),            # batched: the queue drains fast, so kill more often
], ids=["20ms-jobs", "instant-jobs"])
def test_crash_storm_loses_nothing_and_reruns_only_interrupted_jobs(cli, home, workers, tmp_path,
                                                                    report, then, total,
                                                                    kills_wanted, cadence):
    out = tmp_path / "executions"
    cli("config", "set", "backoff_base", "0")      # retry at once: keeps the test short
    cli("enqueue", "--file", str(enqueue_file(tmp_path / "jobs.jsonl",
                                              [record(out, then)] * total)))
    paths = Paths(home)
    workers.start(4)
    rng = random.Random(os.getpid())
    kills = interrupted = 0
    ours = []  # workers this process started (and must reap)
    started = time.monotonic()
    while kills < kills_wanted + 10 and time.monotonic() - started < 60:
        if sum(state_counts(home)[s] for s in ("completed", "dead")) == total:
            break
        live = [pid for pid in workers.pids if alive(pid)]
        busy = [pid for pid in live if children_of(pid)]
        if live:
            victim = rng.choice(busy or live)
            groups = [kid for kid in children_of(victim) if alive(kid)]
            sigkill(victim)                       # the worker first: it must not record anything
            for pgid in groups:                   # then the job's whole process group
                sigkill_group(pgid)
            kills += 1
            interrupted += bool(groups)
            new = start_detached(paths, 1)
            workers.pids.extend(new)
            ours.extend(new)
        for pid in ours:                          # reap the ones we parented
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(cadence)
    chaos = time.monotonic() - started

    wait_until(lambda: sum(state_counts(home)[s] for s in ("completed", "dead")) == total,
               timeout=90, interval=0.2, message="every job completed or dead")
    final = jobs(home)
    history = runs(home)
    execs = executions(out)
    per_attempt = Counter((job_id, attempt) for job_id, attempt, _ in execs)
    counts = Counter(j["state"] for j in final.values())
    died = sum(1 for errors in history.values() for e in errors if e and e.startswith("worker died"))
    extra = len(execs) - counts["completed"]
    logs = worker_log_text(home)
    report(f"crash storm: {total} jobs, {kills} kills ({interrupted} mid-job) in {chaos:.1f}s; "
           f"completed={counts['completed']} dead={counts['dead']} executions={len(execs)} "
           f"extra executions={extra} recorded 'worker died' attempts={died}; recovered from "
           f"the logs: {logs.count('it had not started')} never started, "
           f"{logs.count('it had finished')} finished but unrecorded")

    assert kills >= kills_wanted
    assert set(counts) <= {"completed", "dead"} and sum(counts.values()) == total
    # No attempt ever ran twice: a second run always comes from a new claim.
    assert [k for k, n in per_attempt.items() if n > 1] == []
    for job_id, job in final.items():
        if job["state"] == "completed":
            assert (job_id, job["attempts"]) in per_attempt, f"{job_id} completed but never ran"
            assert history.get((job_id, job["attempts"])) == [None], (job_id, history)
        else:
            assert job["last_error"].startswith("worker died"), job
    for (job_id, attempt) in per_attempt:
        if final[job_id]["state"] == "completed" and attempt == final[job_id]["attempts"]:
            continue
        # Any other execution was interrupted by a kill and is on record as such.
        errors = history.get((job_id, attempt), [])
        assert len(errors) == 1 and errors[0].startswith("worker died"), (job_id, attempt, errors)
    assert died <= kills, "more 'worker died' attempts than kills"
    assert "Traceback" not in logs
