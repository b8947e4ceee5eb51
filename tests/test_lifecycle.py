"""The job state machine, driven through models.Queue with a fake clock (no processes)."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

from queuectl import config as cfg
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.executor import Outcome
from queuectl.jobspec import parse_job
from queuectl.models import Queue, backoff_delay

T0 = 1_800_000_000.0
W = "host:1:1"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def q(store, clock) -> Queue:
    return Queue(store, clock=clock)


def add(q: Queue, **fields: Any) -> str:
    fields.setdefault("command", "true")
    spec = parse_job(fields, now=q.clock(), default_cwd="/")
    return q.enqueue([spec])[0].id


def ok() -> Outcome:
    return Outcome(0, None, "fine\n")


def fail(code: int = 1) -> Outcome:
    return Outcome(code, f"exit code {code}", "bad\n")


def run(q: Queue, outcome: Outcome, worker: str = W) -> Dict[str, Any]:
    job = q.claim(worker)
    assert job is not None, "expected a claimable job"
    state, _ = q.finish(job, outcome, worker)
    return q.get(job["id"])


# -- backoff arithmetic --------------------------------------------------------------------------
@pytest.mark.parametrize("attempts,base,cap,expected", [
    (1, 2, 3600, 2), (2, 2, 3600, 4), (3, 2, 3600, 8), (10, 2, 3600, 1024), (12, 2, 3600, 3600),
    (0, 2, 3600, 1), (1, 3, 3600, 3), (3, 3, 10, 10), (5, 1, 3600, 1), (3, 0, 3600, 0),
    (2, 1.5, 3600, 2.25), (4, 10, 0, 0), (100_000, 1000, 3600, 3600), (5000, 2.0, 86400, 86400),
])
def test_backoff_delay(attempts, base, cap, expected):
    assert backoff_delay(attempts, base, cap) == pytest.approx(expected)


# -- the happy path ------------------------------------------------------------------------------
def test_pending_processing_completed(q, clock):
    job_id = add(q)
    job = q.get(job_id)
    assert (job["state"], job["attempts"], job["run_at"], job["created_at"]) == ("pending", 0, T0, T0)

    clock.advance(5)
    claimed = q.claim(W)
    assert claimed["id"] == job_id
    assert claimed["state"] == "processing" and claimed["attempts"] == 1
    assert claimed["worker_id"] == W and claimed["started_at"] == T0 + 5
    assert claimed["lease_until"] == T0 + 5 + q.settings()["lease_seconds"]
    assert q.claim("host:2:2") is None, "a processing job must not be claimed twice"

    clock.advance(2)
    state, nxt = q.finish(claimed, ok(), W)
    assert (state, nxt) == ("completed", None)
    job = q.get(job_id)
    assert job["state"] == "completed" and job["finished_at"] == T0 + 7
    assert job["exit_code"] == 0 and job["last_error"] is None and job["output_tail"] == "fine\n"
    assert job["lease_until"] is None
    assert [r["attempt"] for r in q.details(job_id)["runs"]] == [1]


def test_finish_can_claim_the_next_job_in_the_same_step(q):
    first, second = add(q, id="a"), add(q, id="b")
    job = q.claim(W)
    state, nxt = q.finish(job, ok(), W, claim_next=True)
    assert state == "completed" and nxt["id"] == second and nxt["state"] == "processing"
    assert first == "a"


# -- failures, backoff and the DLQ ---------------------------------------------------------------
def test_failure_backs_off_then_dead_after_max_retries(q, clock):
    job_id = add(q)  # config defaults: max_retries 3, backoff_base 2
    expected_delays = [2, 4, 8]
    for attempt, delay in enumerate(expected_delays, 1):
        job = run(q, fail())
        assert job["state"] == "failed" and job["attempts"] == attempt
        assert job["run_at"] == pytest.approx(clock.now + delay)
        assert job["last_error"] == "exit code 1" and job["exit_code"] == 1
        clock.advance(delay - 0.01)
        assert q.claim(W) is None, f"job ran before its backoff of {delay}s ended"
        clock.advance(0.01)
    job = run(q, fail(3))
    assert job["state"] == "dead" and job["attempts"] == 4  # 1 run + 3 retries
    assert job["exit_code"] == 3
    assert [r["attempt"] for r in q.details(job_id)["runs"]] == [1, 2, 3, 4]
    clock.advance(10_000)
    assert q.claim(W) is None
    assert q.counts()["dead"] == 1


def test_backoff_uses_config_and_is_capped(q, clock):
    q.config_set("backoff_base", "10")
    q.config_set("backoff_max", "50")
    q.config_set("max_retries", "5")
    add(q)
    job = run(q, fail())
    assert job["run_at"] == pytest.approx(clock.now + 10)
    clock.advance(10)
    job = run(q, fail())
    assert job["run_at"] == pytest.approx(clock.now + 50)  # min(100, 50)


def test_success_after_a_failure_clears_the_error(q, clock):
    job_id = add(q)
    run(q, fail())
    clock.advance(2)
    job = run(q, ok())
    assert job["state"] == "completed" and job["attempts"] == 2 and job["last_error"] is None
    assert q.get(job_id)["exit_code"] == 0


@pytest.mark.parametrize("config_retries,job_retries,runs_until_dead", [
    (3, 0, 1), (0, 2, 3), (1, None, 2), (0, None, 1), (5, 1, 2),
])
def test_per_job_max_retries_overrides_config(q, clock, config_retries, job_retries, runs_until_dead):
    q.config_set("max_retries", str(config_retries))
    q.config_set("backoff_base", "0")
    fields = {} if job_retries is None else {"max_retries": job_retries}
    job_id = add(q, **fields)
    for run_number in range(1, runs_until_dead + 1):
        job = run(q, fail())
        expected = "dead" if run_number == runs_until_dead else "failed"
        assert job["state"] == expected, f"run {run_number}"
    assert q.get(job_id)["attempts"] == runs_until_dead
    assert q.details(job_id)["effective_max_retries"] == (
        config_retries if job_retries is None else job_retries)


def test_per_job_timeout_overrides_config(q):
    q.config_set("job_timeout", "30")
    a, b = add(q, id="a", timeout=5), add(q, id="b")
    assert q.job_timeout(q.get(a)) == 5
    assert q.job_timeout(q.get(b)) == 30
    q.config_set("timeout", "none")  # alias of job_timeout
    assert q.job_timeout(q.get(b)) is None
    assert q.details(a)["effective_timeout"] == 5


def test_claim_order_priority_then_run_at_then_insertion(q, clock):
    add(q, id="low1")
    add(q, id="high", priority=10)
    add(q, id="low2")
    add(q, id="early", run_at=T0 - 100)
    add(q, id="neg", priority=-5)
    add(q, id="future", priority=100, delay=60)
    order = []
    while (job := q.claim(W)) is not None:
        order.append(job["id"])
    assert order == ["high", "early", "low1", "low2", "neg"]
    clock.advance(60)
    assert q.claim(W)["id"] == "future"


def test_run_at_in_the_future_is_not_claimed_early(q, clock):
    add(q, id="later", run_at=T0 + 3600)
    assert q.next_run_at() == T0 + 3600
    clock.advance(3599.9)
    assert q.claim(W) is None and not q.has_ready()
    clock.advance(0.1)
    assert q.has_ready() and q.claim(W)["id"] == "later"


# -- DLQ retry and retry -------------------------------------------------------------------------
def _make_dead(q: Queue, job_id: str) -> None:
    q.config_set("max_retries", "0")
    run(q, fail())
    assert q.get(job_id)["state"] == "dead"


def test_dlq_retry_resets_the_retry_budget_not_the_attempt_numbers(q, clock):
    job_id = add(q, id="d")
    _make_dead(q, job_id)
    clock.advance(100)
    assert q.dlq_retry(["d"]) == ["d"]
    job = q.get("d")
    used = job["attempts"]
    assert (job["state"], job["retry_base"], job["run_at"]) == ("pending", used, T0 + 100)
    assert q.claim(W)["attempts"] == used + 1


def test_dlq_retry_refuses_jobs_that_are_not_dead(q):
    add(q, id="p")
    with pytest.raises(Conflict, match="not dead"):
        q.dlq_retry(["p"])
    with pytest.raises(NotFound):
        q.dlq_retry(["ghost"])
    assert q.get("p")["state"] == "pending"


def test_dlq_retry_all_is_atomic_over_dead_jobs(q):
    for name in ("d1", "d2", "d3"):
        add(q, id=name, max_retries=0)
    add(q, id="alive", delay=3600)
    for _ in range(3):
        run(q, fail())
    assert sorted(q.dlq_retry(all_dead=True)) == ["d1", "d2", "d3"]
    assert q.counts()["pending"] == 4 and q.counts()["dead"] == 0
    assert q.dlq_retry(all_dead=True) == []


def test_retry_runs_a_failed_job_now_keeping_attempts(q, clock):
    add(q, id="f")
    run(q, fail())
    assert q.get("f")["run_at"] == T0 + 2
    assert q.retry(["f"]) == ["f"]
    job = q.get("f")
    assert job["state"] == "pending" and job["attempts"] == 1 and job["run_at"] == T0
    assert q.claim(W)["attempts"] == 2


@pytest.mark.parametrize("state", ["pending", "processing", "completed", "cancelled"])
def test_retry_refuses_other_states(q, state):
    add(q, id="j")
    if state in ("processing", "completed"):
        job = q.claim(W)
        if state == "completed":
            q.finish(job, ok(), W)
    elif state == "cancelled":
        q.cancel(["j"])
    with pytest.raises(Conflict, match=state):
        q.retry(["j"])
    assert q.get("j")["state"] == state


# -- recovery of jobs whose worker died ------------------------------------------------------------
def test_dead_worker_job_goes_to_retry_path(q, clock):
    add(q, id="r")
    q.claim(W)
    assert q.recover(lambda worker_id: True) == {}
    assert q.recover(lambda worker_id: worker_id != W) == {"r": "failed"}
    job = q.get("r")
    assert job["state"] == "failed" and "worker died" in job["last_error"]
    assert job["run_at"] == pytest.approx(clock.now + 2) and job["worker_id"] == W


def test_expired_lease_is_recovered_even_if_worker_looks_alive(q, clock, mocker):
    add(q, id="r", max_retries=0)
    job = q.claim(W)
    killer = mocker.Mock()
    q.heartbeat(job, W, pid=4242, pid_start=99)
    clock.advance(q.settings()["lease_seconds"] + 1)
    assert q.recover(lambda worker_id: True, killer) == {"r": "dead"}
    killer.assert_called_once_with(4242, 99)
    job_after = q.get("r")
    assert job_after["state"] == "dead" and "lease expired" in job_after["last_error"]
    # the old worker's late result is dropped, not written over the recovery
    assert q.finish(job, ok(), W)[0] == "lost"
    assert q.get("r")["state"] == "dead"


def test_heartbeat_extends_the_lease(q, clock):
    add(q)
    job = q.claim(W)
    clock.advance(20)
    assert q.heartbeat(job, W) == (True, False)
    clock.advance(20)  # 40 s after claim, 20 s after the heartbeat
    assert q.recover(lambda worker_id: True) == {}
    assert q.heartbeat(job, "host:9:9") == (False, False)


# -- cancel, dependencies, unique keys, pause, purge ---------------------------------------------
def test_cancel_pending_and_running(q):
    add(q, id="run")
    add(q, id="wait")
    job = q.claim(W)
    assert q.cancel(["wait", "run"]) == {"wait": "cancelled", "run": "cancelling"}
    assert q.get("wait")["state"] == "cancelled" and q.get("wait")["last_error"] == "cancelled by user"
    assert q.heartbeat(job, W) == (True, True)
    state, _ = q.finish(job, Outcome(-15, "cancelled by user while running", "", cancelled=True), W)
    assert state == "cancelled"
    with pytest.raises(Conflict, match="already cancelled"):
        q.cancel(["run"])


def test_dependencies_wait_and_release(q, clock):
    add(q, id="a")
    add(q, id="b", after=["a"])
    add(q, id="c", after="a,b")
    assert q.get("c")["deps_left"] == 2
    assert q.claim(W)["id"] == "a"
    assert q.claim("host:2:2") is None, "b must wait for a"
    q.finish(q.get("a"), ok(), W)
    assert q.claim(W)["id"] == "b"
    assert q.claim("host:2:2") is None, "c must wait for b"
    q.finish(q.get("b"), ok(), W)
    assert q.claim(W)["id"] == "c"
    assert sorted(q.details("c")["after"]) == ["a", "b"]


def test_dependency_dead_cascades_cancel(q):
    add(q, id="a", max_retries=0)
    add(q, id="b", after=["a"])
    add(q, id="c", after=["b"])
    add(q, id="other")
    run(q, fail())
    assert q.get("b")["state"] == "cancelled"
    assert q.get("b")["last_error"] == "dependency 'a' is dead"
    assert q.get("c")["last_error"] == "dependency 'b' is cancelled"
    assert q.get("other")["state"] == "pending"


def test_after_a_completed_job_runs_at_once_and_after_dead_is_refused(q):
    add(q, id="done")
    run(q, ok())
    add(q, id="next", after=["done"])
    assert q.get("next")["deps_left"] == 0
    add(q, id="gone", max_retries=0)
    q.claim(W)  # "next" has priority by insertion; it is claimed first
    run(q, fail())
    assert q.get("gone")["state"] == "dead"
    with pytest.raises(Conflict, match="could never run"):
        add(q, after=["gone"])
    with pytest.raises(NotFound, match="ghost"):
        add(q, after=["ghost"])


def test_unique_key(q):
    first = add(q, unique_key="backup")
    with pytest.raises(Conflict, match=repr(first)):
        add(q, unique_key="backup")
    spec = parse_job({"command": "true", "unique_key": "backup"}, now=T0, default_cwd="/")
    result = q.enqueue([spec], if_exists="skip")
    assert (result[0].id, result[0].created) == (first, False)
    run(q, ok())
    assert add(q, unique_key="backup") != first  # the key is free once the holder finished


def test_pause_stops_claims_until_resume(q, clock):
    add(q)
    q.pause()
    assert q.paused() and q.paused_since() == T0
    assert q.claim(W) is None
    q.resume()
    assert not q.paused() and q.claim(W) is not None


def test_purge_only_old_finished_jobs(q, clock):
    add(q, id="old")
    run(q, ok())
    add(q, id="waiting", max_retries=0)
    clock.advance(86400 * 8)
    add(q, id="new")
    add(q, id="busy")
    q.claim(W)  # waiting → processing
    q.finish(q.get("waiting"), fail(), W)  # dead, recent
    run(q, ok())  # new: completed, recent
    q.claim(W)  # busy stays processing
    assert q.purge(["completed"], older_than=7 * 86400) == ["old"]
    assert q.purge(["completed", "dead"]) == []  # finished "now": not older than now
    clock.advance(1)
    assert sorted(q.purge(["completed", "dead", "cancelled"])) == ["new", "waiting"]
    assert q.counts()["processing"] == 1
    with pytest.raises(InvalidInput):
        q.purge(["pending"])


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("alias,canonical", [
    ("default_max_retries", "max_retries"), ("worker_poll_interval", "poll_interval"),
    ("max-retries", "max_retries"), ("MAX_RETRIES", "max_retries"), ("max_backoff", "backoff_max"),
    ("timeout", "job_timeout"),
])
def test_config_aliases(q, alias, canonical):
    assert cfg.canonical_key(alias) == canonical
    q.config_set(alias, "7")
    assert q.config_get(canonical) == (canonical, pytest.approx(7))


@pytest.mark.parametrize("key,raw,expected", [
    ("max_retries", "0", 0), ("max_retries", "5", 5), ("max_retries", "5.0", 5),
    ("backoff_base", "0", 0.0), ("backoff_base", "1.5", 1.5), ("backoff_max", "60", 60.0),
    ("job_timeout", "none", None), ("job_timeout", "2.5", 2.5),
    ("poll_interval", "0.05", 0.05),
])
def test_config_values(key, raw, expected):
    assert cfg.parse_value(key, raw) == expected


@pytest.mark.parametrize("key,raw", [
    ("max_retries", "-1"), ("max_retries", "1.5"), ("max_retries", "x"), ("max_retries", True),
    ("backoff_base", "-0.1"), ("poll_interval", "0"), ("poll_interval", "61"),
    ("job_timeout", "-1"), ("job_timeout", "0"), ("lease_seconds", "1"), ("backoff_max", "nan"),
])
def test_config_invalid_values(key, raw):
    with pytest.raises(InvalidInput, match=key):
        cfg.parse_value(key, raw)


def test_unknown_config_key_lists_valid_keys(q):
    with pytest.raises(NotFound) as info:
        q.config_set("retries", "3")
    for key in cfg.SETTINGS:
        assert key in str(info.value)


def test_stored_garbage_config_falls_back_to_default(q, store):
    with store.transaction():
        store.config_set("max_retries", "banana")
    assert q.settings(fresh=True)["max_retries"] == 3


# -- executor details that need a faked subprocess ------------------------------------------------
def test_failure_to_start_is_an_ordinary_failure(tmp_path, mocker):
    from queuectl import executor

    mocker.patch("queuectl.executor.subprocess.Popen",
                 side_effect=PermissionError(13, "Permission denied"))
    outcome = executor.run_job("whatever", False, str(tmp_path), tmp_path / "j.log", "j", 1, W,
                               None, {})
    assert not outcome.ok and outcome.exit_code is None
    assert outcome.error == "failed to start: Permission denied"
    assert "failed to start" in (tmp_path / "j.log").read_text()


@pytest.mark.parametrize("code,argv,expected", [
    (0, False, None), (1, False, "exit code 1"), (127, False, "command not found (exit 127)"),
    (126, False, "command not executable (exit 126)"), (-9, False, "killed by SIGKILL"),
    (-15, True, "killed by SIGTERM"),
])
def test_describe_exit(code, argv, expected):
    from queuectl.executor import describe_exit

    assert describe_exit(code, argv) == expected


def test_states_listed(q):
    ids: List[str] = [add(q) for _ in range(3)]
    assert q.states(ids) == {i: "pending" for i in ids}
    assert set(q.counts()) == {"pending", "processing", "completed", "failed", "dead", "cancelled"}
