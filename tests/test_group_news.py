"""A group pause or a lowered group limit is news to a worker holding prefetched jobs of
that group: they go back to the queue unrun (attempts not burned), and none of them starts
from held once the news is seen, even when the hand-back itself fails. Driven step by step
in-process against a real store (both backends), with real processes for the runs."""
from __future__ import annotations

import os

import pytest

from helpers import wait_until

from queuectl.errors import StorageError
from queuectl.models import Queue
from queuectl.store import open_store
from queuectl.worker import Worker

from test_slots_batching import W, add, slot_worker, state  # noqa: F401 - slot_worker: a fixture


def hold_group_jobs(w, queue: Queue, n: int = 3) -> list:
    """Both slots busy with long runs of 'default', ``n`` jobs of 'g' held behind them."""
    add(queue, 2, command="sleep 30", priority=1)
    ids = add(queue, n, group="g")
    w._short = True
    w._fill()
    assert len(w.runs) == 2 and [j["id"] for j in w.held] == ids
    return ids


def never_started(w, ids) -> bool:
    return not any(os.path.exists(w.paths.job_log_name(i)) for i in ids)


@pytest.mark.parametrize("how", ["pause", "limit"])
def test_held_jobs_of_a_paused_or_full_group_go_back_unrun(slot_worker, queue, how):
    w = slot_worker
    queue.set_group_limit("g", 3)  # room for the 3 held ones: they count as running
    ids = hold_group_jobs(w, queue)
    assert not w._news(), "nothing changed yet"
    if how == "pause":
        queue.pause_group("g")
    else:
        queue.set_group_limit("g", 2)  # 3 held count as running: over the new limit
    assert w._news()
    w._hand_back()
    assert not w.held and [state(queue, i) for i in ids] == [("pending", 0)] * 3
    for _, run in w.runs.values():  # the slots free up: nothing of g is claimed or started
        run.abort("test", False, kill_now=True)
    wait_until(lambda: all(run.done() for _, run in w.runs.values()), message="runs over")
    w._ready = list(w._by_fd)
    w._collect()
    w._want_claim = True
    w._fill()
    if how == "pause":
        assert not w.runs and not w.held and never_started(w, ids)
        assert [state(queue, i) for i in ids] == [("pending", 0)] * 3
    else:
        assert len(w.runs) + len(w.held) == 2, "at most the new limit"


def test_a_failed_hand_back_still_starts_none_of_them(slot_worker, queue, mocker):
    w = slot_worker
    ids = hold_group_jobs(w, queue)
    queue.pause_group("g")
    settle = mocker.patch.object(w.queue, "settle", side_effect=StorageError("db gone"))
    assert w._news()
    w._hand_back()  # one try: it fails, the jobs stay held
    assert len(w.held) == 3
    for _, run in w.runs.values():
        run.abort("test", False, kill_now=True)
    wait_until(lambda: all(run.done() for _, run in w.runs.values()), message="runs over")
    w._ready = list(w._by_fd)
    w._collect()
    w._fill()  # free slots, held jobs: still none starts, the hand-back is tried again
    assert not w.runs and len(w.held) == 3 and never_started(w, ids)
    mocker.stop(settle)  # the database is back
    w._fill()
    assert not w.runs and not w.held and never_started(w, ids)
    assert [state(queue, i) for i in ids] == [("pending", 0)] * 3


def test_a_single_slot_worker_hands_back_held_jobs_of_a_paused_group(paths, queue):
    w = Worker(paths)
    w.worker_id = W
    store = open_store(paths, "worker")
    try:
        w.queue = Queue(store)
        ids = add(queue, 3, group="g")
        _, claimed = w.queue.settle([], W, claim=3)
        w.held.extend(claimed)
        assert not w._news()
        queue.pause_group("g")
        assert w._news() and w._hand_back_due
        assert w._next_job() is None, "handed back, and the paused group gives nothing"
        assert not w.held and [state(queue, i) for i in ids] == [("pending", 0)] * 3
    finally:
        store.close()
