"""The worker's periodic chores: due ones run, failures are logged once and never escape."""
from __future__ import annotations

import logging

from queuectl import chores
from queuectl.errors import QueueError


def test_due_chores_run_once_per_period_and_failures_are_logged_once(mocker, caplog):
    clock = mocker.patch("queuectl.chores.time.monotonic", return_value=100.0)
    calls = []
    fail = {"now": True}

    def flaky(now: float) -> None:
        calls.append(now)
        if fail["now"]:
            raise QueueError("database unavailable: gone")

    chore = chores.Chore("purge", every=5.0, run=flaky)
    with caplog.at_level(logging.INFO, logger="queuectl.worker"):
        chores.run_due([chore])
        chores.run_due([chore])           # not due again yet
        clock.return_value = 105.0
        chores.run_due([chore])           # due, fails again: not logged a second time
        fail["now"] = False
        clock.return_value = 110.0
        chores.run_due([chore])
    assert len(calls) == 3
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["purge: database unavailable: gone; trying again in 5 s", "purge works again"]
    assert chores.next_due([chore]) == 115.0
    assert chores.next_due([]) == float("inf")


def test_a_chore_that_raises_a_bug_does_not_escape(mocker, caplog):
    mocker.patch("queuectl.chores.time.monotonic", return_value=1.0)
    chore = chores.Chore("broken", every=1.0, run=lambda now: 1 / 0)
    chores.run_due([chore])
    assert chore.failing and "broken failed" in caplog.text
