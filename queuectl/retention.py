"""Retention: workers delete old finished jobs and their log files in the background.

A chore (queuectl/chores.py) of every worker deletes one small batch, oldest first, through
an index on finished_at, so it never scans and never holds the database for long; while
batches come back full it runs again soon, so it keeps up with any drain rate without
ever being in the claim path. Several workers (and hosts) purging at once is safe: a batch
is taken and deleted in one transaction (PostgreSQL: FOR UPDATE SKIP LOCKED), and a log
file someone else removed first is simply gone.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Iterable, List

from queuectl.chores import Chore

BATCH = 200          # jobs per run: a few ms of deletes (benchmarks/RESULTS.md)
EVERY = 5.0          # seconds between runs while there is little to delete
SOON = 0.25          # seconds at least until the next run after a full batch
# While batches come back full, a worker spends at most this share of its time deleting
# (the next run waits took / DUTY): a drain beside a large backlog slows by less than that,
# and a worker still deletes several hundred jobs a second.
DUTY = 0.03
TIDY_EVERY = 600.0   # seconds between folds of gone workers' counters / unused env cleanup


def remove_logs(paths: Any, ids: Iterable[str]) -> int:
    """Unlink the local log files of deleted jobs; returns how many existed. A log on another
    host stays there (each host only reaches its own log directory)."""
    removed = 0
    for job_id in ids:
        try:
            os.unlink(paths.job_log_name(job_id))
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            pass  # e.g. a read-only mount: the row is gone all the same
    return removed


def chores_for(queue: Any, paths: Any) -> List[Chore]:
    """The retention chore and the rare tidy-up, staggered so workers started together do
    not purge in lockstep."""
    purge = Chore("retention", every=EVERY, run=lambda now: None,
                  next_at=time.monotonic() + random.uniform(0.5, EVERY))

    def run(_now: float) -> None:
        began = time.monotonic()
        ids = queue.purge_due(BATCH)
        remove_logs(paths, ids)
        if len(ids) >= BATCH:
            took = time.monotonic() - began
            purge.next_at = time.monotonic() + max(SOON, took / DUTY)

    purge.run = run
    tidy = Chore("tidy", every=TIDY_EVERY, run=lambda now: queue.tidy(),
                 next_at=time.monotonic() + random.uniform(10.0, 60.0))
    return [purge, tidy]
