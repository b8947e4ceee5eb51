"""Periodic housekeeping every worker does beside its runs: firing schedules, purging old jobs.

A chore runs between claims and also from a running job's heartbeat tick, so it still happens
while every worker is busy with long jobs. Each run must be short (one small batch): it delays
the next claim or heartbeat by as long as it takes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, List

from queuectl.errors import QueueError

log = logging.getLogger("queuectl.worker")


@dataclass
class Chore:
    name: str
    every: float                   # seconds between runs
    run: Callable[[float], None]   # called with time.time()
    next_at: float = 0.0           # monotonic time of the next run
    failing: bool = False          # its last run failed (logged once until it works again)


def for_worker(queue: Any, paths: Any) -> List[Chore]:
    """The chores a worker does; a feature that needs one adds it here."""
    from queuectl import alerts, retention
    from queuectl.schedules import Schedules

    # Schedules: one indexed read a second when none is due (queuectl/schedules.py).
    return [Chore("schedules", 1.0, Schedules(queue).fire_due), alerts.for_home(paths).chore,
            *retention.chores_for(queue, paths)]


def run_due(chores: List[Chore]) -> None:
    """Run every chore that is due; a failing chore is logged (once per failure streak) and
    never breaks the worker."""
    now = time.monotonic()
    for chore in chores:
        if now < chore.next_at:
            continue
        chore.next_at = now + chore.every
        try:
            chore.run(time.time())
        except QueueError as exc:
            if not chore.failing:
                log.warning("%s: %s; trying again in %g s", chore.name, exc, chore.every)
            chore.failing = True
        except Exception:  # noqa: BLE001 - housekeeping must not kill the worker
            if not chore.failing:
                log.exception("%s failed; trying again in %g s", chore.name, chore.every)
            chore.failing = True
        else:
            if chore.failing:
                log.info("%s works again", chore.name)
            chore.failing = False


def next_due(chores: List[Chore]) -> float:
    """Monotonic time the next chore is due (infinity when there are none)."""
    return min((chore.next_at for chore in chores), default=float("inf"))
