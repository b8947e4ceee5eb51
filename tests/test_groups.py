"""Groups and slots at the model/store level, on every backend: limits, pauses, filters, the
running count the triggers keep, claims that never scan a full group, concurrent claimers."""
from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest

from helpers import in_threads

from queuectl.executor import Outcome
from queuectl.jobspec import parse_job
from queuectl.models import Queue
from queuectl.store import open_store

W = "host:1:1"


def add(queue: Queue, n: int = 1, **fields: Any) -> List[str]:
    fields.setdefault("command", "true")
    specs = [parse_job(dict(fields), now=time.time(), default_cwd="/") for _ in range(n)]
    return [r.id for r in queue.enqueue(specs)]


def claim(queue: Queue, n: int = 8, worker: str = W, **kw: Any) -> List[dict]:
    return queue.settle((), worker, claim=n, **kw)[1]


def ok() -> Outcome:
    now = time.time()
    return Outcome(0, None, "", started_at=now, finished_at=now)


def group(queue: Queue, name: str) -> dict:
    return next(g for g in queue.groups() if g["name"] == name)


def test_a_limit_caps_claims_and_a_finish_frees_a_place(queue):
    queue.set_group_limit("backup", 2)
    backups = add(queue, 5, group="backup")
    other = add(queue, 3)
    got = claim(queue, 8)
    assert sorted(j["id"] for j in got) == sorted(backups[:2] + other)
    assert claim(queue, 8) == [], "the group is full; default is drained"
    assert group(queue, "backup") == {"name": "backup", "parallel": 2, "paused": False,
                                      "running": 2, "waiting": 3}
    first = next(j for j in got if j["id"] == backups[0])
    states, more = queue.settle([(first, ok())], W, claim=8)
    assert states == ["completed"] and [j["id"] for j in more] == [backups[2]]


def test_release_and_recovery_give_the_place_back(queue):
    queue.set_group_limit("g", 1)
    ids = add(queue, 2, group="g")
    [job] = claim(queue)
    queue.settle((), W, release=[job])  # never started: handed back
    [job] = claim(queue)
    assert job["id"] == ids[0]
    found = queue.recover(lambda worker: False)  # its worker died mid-run
    assert found == {ids[0]: "failed"}
    assert group(queue, "g")["running"] == 0
    assert [j["id"] for j in claim(queue)] == [ids[1]]


def test_lowering_a_limit_while_jobs_run_starts_none_until_below_it(queue):
    queue.set_group_limit("dl", 3)
    add(queue, 6, group="dl")
    running = claim(queue)
    assert len(running) == 3
    queue.set_group_limit("dl", 1)
    queue.settle([(running[0], ok())], W)
    assert claim(queue) == [], "2 still run, the limit is 1"
    queue.settle([(running[1], ok()), (running[2], ok())], W)
    assert len(claim(queue)) == 1


def test_a_limit_set_on_running_jobs_counts_them(queue):
    add(queue, 4, group="late")
    running = claim(queue, 2)
    queue.set_group_limit("late", 2)
    assert claim(queue) == [], "the two started before the limit count against it"
    queue.settle([(running[0], ok())], W)
    assert len(claim(queue)) == 1
    queue.set_group_limit("late", None)
    assert len(claim(queue)) == 1, "no limit: the rest may start"


def test_paused_group_and_worker_group_filter(queue):
    a = add(queue, 2, group="a")
    b = add(queue, 2, group="b")
    queue.pause_group("a")
    assert sorted(j["id"] for j in claim(queue)) == b
    queue.pause_group("a", False)
    queue.serve_groups = ["b"]
    assert claim(queue) == [] and not queue.has_ready()
    queue.serve_groups = ["a", "b"]
    assert queue.has_ready()
    assert sorted(j["id"] for j in claim(queue)) == a


def test_has_ready_and_next_run_at_ignore_full_groups(queue):
    queue.set_group_limit("full", 1)
    add(queue, 2, group="full")
    assert len(claim(queue)) == 1
    assert not queue.has_ready(), "an idle worker must not spin on a full group's jobs"
    assert queue.next_run_at() is None


def test_slots_fill_a_worker_in_claim_order(queue):
    big = add(queue, 1, slots=3)
    small = add(queue, 3)
    got = claim(queue, 4, free=2, capacity=4)
    assert got == [], "the 3-slot job heads the queue and does not fit in 2 free slots"
    got = claim(queue, 4, free=4, capacity=4)
    assert [j["id"] for j in got] == big + small[:1]
    assert got[0]["slots"] == 3
    huge = add(queue, 1, slots=64, priority=9)
    got = claim(queue, 4, free=2, capacity=2)
    assert [j["id"] for j in got] == huge, "more slots than a worker has: it takes all of them"


def test_list_counts_and_replace_keep_the_group(queue):
    add(queue, 2, group="x")
    add(queue, 1)
    assert [j["grp"] for j in queue.list(group="x")] == ["x", "x"]
    assert queue.counts(group="x")["pending"] == 2
    assert queue.counts(group="nothing")["pending"] == 0
    names = [g["name"] for g in queue.groups()]
    assert names == ["default", "x"]


def test_bad_group_input(queue):
    from queuectl.errors import InvalidInput

    with pytest.raises(InvalidInput):
        queue.set_group_limit("bad name", 1)
    with pytest.raises(InvalidInput):
        queue.set_group_limit("g", 0)
    with pytest.raises(InvalidInput):
        parse_job({"command": "true", "group": ""}, now=0, default_cwd="/")
    with pytest.raises(InvalidInput):
        parse_job({"command": "true", "slots": 0}, now=0, default_cwd="/")


def test_a_full_group_of_many_waiting_jobs_costs_claims_nothing(queue):
    queue.set_group_limit("full", 1)
    specs = [parse_job({"command": "true", "group": "full"}, now=time.time() - 10, default_cwd="/")
             for _ in range(20000)]
    queue.enqueue_chunks([specs])
    assert len(claim(queue, 1)) == 1  # the group is full from now on
    add(queue, 200)

    def claim_time() -> float:
        start = time.perf_counter()
        for _ in range(20):
            assert len(claim(queue, 1)) == 1
        return time.perf_counter() - start

    with_full = claim_time()
    queue.set_group_limit("full", None)
    queue.pause_group("full")  # a paused group is skipped the same way
    paused = claim_time()
    # A scan of 20000 rows per claim would be ~100x slower than the index walk; 5x is slack
    # for a loaded machine, not a timing target.
    assert with_full < 5 * paused + 0.2 and paused < 5 * with_full + 0.2


def test_concurrent_claimers_never_exceed_a_limit(queue, paths):
    queue.set_group_limit("g", 3)
    add(queue, 40, group="g")
    running: List[dict] = []
    peak = [0]
    lock = threading.Lock()

    def claimer(n: int) -> None:
        store = open_store(paths, "worker")
        q = Queue(store)
        try:
            mine: List[dict] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = q.settle([(job, ok()) for job in mine], f"h:{n}:1", claim=2)[1]
                with lock:
                    for job in mine:
                        running.remove(job["id"])
                    running.extend(job["id"] for job in got)
                    peak[0] = max(peak[0], len(running))
                mine = got
                if not got and not q.counts(group="g")["pending"] and not mine:
                    break
        finally:
            store.close()

    errors = in_threads(claimer, 4)
    assert not errors, errors
    assert queue.counts(group="g")["completed"] == 40
    assert peak[0] <= 3
    assert group(queue, "g")["running"] == 0
    assert next(r for r in queue.store.group_rows() if r["name"] == "g")["running"] == 0


def test_ready_head_says_whether_a_new_job_overtakes_a_held_one(queue):
    add(queue, 3)
    [held, *_] = claim(queue, 2)
    assert not queue.overtakes(held), "the next in line comes after the held job"
    add(queue, 1, priority=5)
    assert queue.overtakes(held), "an urgent job does"
    queue.serve_groups = ["other"]
    assert not queue.overtakes(held)
