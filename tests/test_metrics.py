"""GET /metrics (Prometheus text, checked with prometheus-client's parser) and `stats`."""
from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboard_support import WORKER, add, http, running_dashboard, seed_jobs

from queuectl import metrics
from queuectl.dashboard import TOKEN_HEADER
from queuectl.executor import Outcome
from queuectl.models import Queue
from queuectl.stats import percentile, summarize


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(server, headers=None) -> dict:
    status, head, body = http(f"http://127.0.0.1:{server.port}/metrics", headers=headers)
    assert status == 200, body
    assert head["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_parse_and_agree_with_the_queue(paths, queue):
    made = seed_jobs(queue)
    queue.register_worker(WORKER, "test-host", 1, queue.clock(), "detached")
    queue.register_worker("test-host:2:2", "test-host", 2, queue.clock(), "detached")
    with running_dashboard(paths) as server:
        samples = scrape(server)
    for state in ("pending", "processing", "completed", "failed", "dead", "cancelled"):
        assert value(samples, "queuectl_jobs", state=state) == list(made.values()).count(state)
    assert value(samples, "queuectl_runs_total", outcome="completed") == 2
    assert value(samples, "queuectl_runs_total", outcome="failed") == 1
    assert value(samples, "queuectl_runs_total", outcome="dead") == 1
    assert value(samples, "queuectl_runs_total", outcome="cancelled") == 0
    assert value(samples, "queuectl_run_duration_seconds_count") == 4
    assert value(samples, "queuectl_run_duration_seconds_bucket", le="+Inf") == 4
    assert value(samples, "queuectl_pickup_latency_seconds_count") == 4
    assert value(samples, "queuectl_workers", status="busy") == 1  # reindex is running
    assert value(samples, "queuectl_workers", status="idle") == 1
    assert value(samples, "queuectl_oldest_waiting_job_age_seconds") >= 0
    assert value(samples, "queuectl_paused") == 0


def test_metrics_show_each_groups_running_waiting_limit_and_pause(store):
    q = Queue(store)
    q.set_group_limit("backups", 1)
    q.pause_group("downloads")
    for n in range(3):
        add(q, id=f"b{n}", group="backups")
    add(q, id="d0", group="downloads")
    assert q.claim(WORKER)["id"] == "b0"
    page = metrics.render(q.metrics_snapshot())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(page) for s in f.samples}
    assert value(samples, "queuectl_group_jobs", group="backups", state="running") == 1
    assert value(samples, "queuectl_group_jobs", group="backups", state="waiting") == 2
    assert value(samples, "queuectl_group_jobs", group="downloads", state="waiting") == 1
    assert value(samples, "queuectl_group_jobs", group="default", state="running") == 0
    assert value(samples, "queuectl_group_limit", group="backups") == 1
    assert ("queuectl_group_limit", (("group", "downloads"),)) not in samples  # no limit
    assert value(samples, "queuectl_group_paused", group="downloads") == 1
    assert value(samples, "queuectl_group_paused", group="backups") == 0


def test_counters_only_grow_across_purges_and_folds(paths, store):
    clock = Clock()
    q = Queue(store, clock=clock)
    q.config_set("keep_completed", "1h")
    for n in range(3):
        add(q, id=f"j{n}")
        job = q.claim(WORKER)
        clock.now += 0.3
        q.finish(job, Outcome(0, None), WORKER)
    add(q, id="late", run_at=clock.now - 120)  # due two minutes ago, never picked up
    page = metrics.render(q.metrics_snapshot())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(page) for s in f.samples}
    assert value(samples, "queuectl_runs_total", outcome="completed") == 3
    assert value(samples, "queuectl_run_duration_seconds_bucket", le="0.25") == 0
    assert value(samples, "queuectl_run_duration_seconds_bucket", le="0.5") == 3
    assert value(samples, "queuectl_run_duration_seconds_sum") == pytest.approx(0.9)
    assert value(samples, "queuectl_oldest_waiting_job_age_seconds") == pytest.approx(120)
    clock.now += 7200
    assert len(q.purge_due(100)) == 3
    q.tidy()  # WORKER is not registered: its rows fold into shard '', the sums stay
    again = metrics.render(q.metrics_snapshot())
    assert 'queuectl_jobs{state="completed"} 0' in again
    assert 'queuectl_runs_total{outcome="completed"} 3' in again
    assert 'queuectl_run_duration_seconds_count 3' in again


def test_metrics_need_the_token_off_loopback_and_take_a_bearer_token(paths):
    with running_dashboard(paths) as server:
        server.open_reads = False
        assert http(f"http://127.0.0.1:{server.port}/metrics")[0] == 403
        scrape(server, {TOKEN_HEADER: server.token})
        scrape(server, {"Authorization": f"Bearer {server.token}"})
        status = http(f"http://127.0.0.1:{server.port}/metrics",
                      headers={"Authorization": "Bearer wrong"})[0]
        assert status == 403


def test_exposition_escapes_label_values():
    page = metrics.exposition([("jobs", "gauge", "x", [("", {"group": 'a"b\\c\nd'}, 2.0)])])
    family = next(text_string_to_metric_families(page))
    assert family.samples[0].labels == {"group": 'a"b\\c\nd'} and family.samples[0].value == 2


def test_stats_per_command_on_both_backends(store, cli):
    clock = Clock()
    q = Queue(store, clock=clock)
    q.config_set("max_retries", "0")  # the failed one goes to the DLQ: claims stay in order
    for n, (command, seconds, ok) in enumerate([("make", 1.0, True), ("make", 3.0, True),
                                                  ("make", 2.0, False), ("lint", 5.0, True)]):
        add(q, id=f"s{n}", command=command)
        job = q.claim(WORKER)
        clock.now += seconds
        q.finish(job, Outcome(0, None) if ok else Outcome(1, "exit code 1"), WORKER)
    figures = summarize(q.runs_since(clock.now - 3600), 3600)
    make = next(row for row in figures["commands"] if row["command"] == "make")
    assert (make["runs"], make["completed"], make["failed"]) == (3, 2, 1)
    assert make["failure_rate"] == pytest.approx(1 / 3)
    assert (make["p50"], make["p95"]) == (pytest.approx(2.0), pytest.approx(3.0))
    assert figures["total"]["runs"] == 4 and figures["total"]["throughput"] == pytest.approx(3 / 3600)
    assert figures["commands"][0]["command"] == "make"  # most runs first
    assert summarize(q.runs_since(clock.now + 1), 60)["total"]["runs"] == 0
    # The command line: real runs happened seconds ago on the real clock, so a window
    # reaching back to the fake clock's past sees them all.
    out = json.loads(cli("stats", "--since", "3650d", "--json").stdout)
    assert out["total"]["runs"] == 4
    text = cli("stats", "--since", "3650d").stdout
    assert "make" in text and "lint" in text and "(all)" in text
    bad = cli("stats", "--since", "soon", ok=False)
    assert bad.exit_code != 0 and "Traceback" not in bad.stderr


def test_stats_per_group_on_both_backends(store, cli):
    clock = Clock()
    q = Queue(store, clock=clock)
    q.config_set("max_retries", "0")
    for n, (group, seconds, ok) in enumerate([("backups", 4.0, True), ("backups", 2.0, False),
                                                ("default", 1.0, True)]):
        add(q, id=f"g{n}", command=f"step {n}", group=group)
        job = q.claim(WORKER)
        clock.now += seconds
        q.finish(job, Outcome(0, None) if ok else Outcome(1, "exit code 1"), WORKER)
    figures = summarize(q.runs_since(clock.now - 3600), 3600, by="group")
    assert [row["group"] for row in figures["groups"]] == ["backups", "default"]  # most runs first
    backups = figures["groups"][0]
    assert (backups["runs"], backups["completed"], backups["failed"]) == (2, 1, 1)
    assert (backups["p50"], backups["p95"]) == (pytest.approx(2.0), pytest.approx(4.0))
    assert figures["total"]["runs"] == 3 and "commands" not in figures
    out = json.loads(cli("stats", "--since", "3650d", "--by", "group", "--json").stdout)
    assert {row["group"]: row["runs"] for row in out["groups"]} == {"backups": 2, "default": 1}
    text = cli("stats", "--since", "3650d", "--by", "group").stdout.splitlines()
    assert text[1].split()[-1] == "GROUP" and text[2].split()[-1] == "backups"
    bad = cli("stats", "--by", "host", ok=False)
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr


def test_stats_per_second_keeps_three_digits_of_slow_and_fast_rates():
    from queuectl.cli_stats import per_second

    assert [per_second(r) for r in (0.0, 10 / 3600, 0.5, 1.5, 25.04, 2000.4)] == \
        ["0", "0.00278", "0.500", "1.50", "25.0", "2000"]


def test_percentile_is_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile(list(map(float, range(1, 101))), 0.95) == 95.0
