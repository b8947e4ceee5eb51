"""Run counters and the Prometheus text exposition of ``GET /metrics``.

Counters are stored, not derived from job rows, because retention deletes those rows and a
counter must never go down: each finished run adds to its worker's own counter rows in the
transaction that records it (see Store.add_counts). Histograms are stored as one count per
bucket (not cumulative) and cumulated here, so adding a bucket later is a one-line change.

No prometheus-client: the text format is a few lines to write, and the library would be a
run-time dependency pulled into every worker for a function the dashboard calls. Tests parse
the output with prometheus-client's parser (a test-only dependency).
"""
from __future__ import annotations

import bisect
import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# Upper bounds in seconds; the last bucket is +Inf.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0, 14400.0)
PICKUP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)
OUTCOMES = ("completed", "failed", "dead", "cancelled")
RUNS = "runs_total"
DURATION = "run_duration_seconds"
PICKUP = "pickup_latency_seconds"
PREFIX = "queuectl_"

Delta = Tuple[str, str, float]  # (metric, labels as sorted JSON, amount)
_LABELS_CACHE: Dict[Tuple[Tuple[str, str], ...], str] = {}


def labels_key(**labels: str) -> str:
    """The stored form of a label set: JSON with sorted keys ('' for none). A new label
    (a job's group) is one more keyword here and in the caller."""
    if not labels:
        return ""
    items = tuple(sorted(labels.items()))
    found = _LABELS_CACHE.get(items)
    if found is None:
        found = _LABELS_CACHE[items] = json.dumps(dict(items), separators=(",", ":"))
    return found


def _le(bounds: Sequence[float], value: float) -> str:
    index = bisect.bisect_left(bounds, value)
    return "+Inf" if index == len(bounds) else _number(bounds[index])


def run_deltas(runs: Iterable[Tuple[str, Optional[float], Optional[float], Optional[float]]]
               ) -> List[Delta]:
    """Counter increments for finished runs given as (outcome, started_at, finished_at,
    due_at): one per outcome, the duration histogram, and the pickup latency (due_at to
    started_at) histogram. Summed per key, so a batch of runs is a few rows."""
    sums: Dict[Tuple[str, str], float] = {}

    def add(metric: str, labels: str, amount: float) -> None:
        sums[(metric, labels)] = sums.get((metric, labels), 0.0) + amount

    for outcome, started, finished, due in runs:
        add(RUNS, labels_key(outcome=outcome), 1)
        if started is not None and finished is not None:
            took = max(finished - started, 0.0)
            add(DURATION + "_bucket", labels_key(le=_le(DURATION_BUCKETS, took)), 1)
            add(DURATION + "_sum", "", took)
        if started is not None and due is not None and outcome != "cancelled":
            waited = max(started - due, 0.0)
            add(PICKUP + "_bucket", labels_key(le=_le(PICKUP_BUCKETS, waited)), 1)
            add(PICKUP + "_sum", "", waited)
    return [(metric, labels, amount) for (metric, labels), amount in sums.items()]


# -- exposition ------------------------------------------------------------------------------
Sample = Tuple[str, Dict[str, str], float]  # (name suffix, labels, value)


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(families: Sequence[Tuple[str, str, str, Sequence[Sample]]]) -> str:
    """Prometheus text format 0.0.4 for (name, type, help, samples) families."""
    lines: List[str] = []
    for name, kind, help_text, samples in families:
        full = PREFIX + name
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for suffix, labels, value in samples:
            text = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels.items())
            lines.append(f"{full}{suffix}{{{text}}} {_number(value)}" if text
                         else f"{full}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


def _histogram(totals: Dict[Tuple[str, str], float], metric: str,
               bounds: Sequence[float]) -> List[Sample]:
    """Cumulative buckets from the stored per-bucket counts (other labels kept apart)."""
    per_set: Dict[str, Dict[str, float]] = {}
    sums: Dict[str, float] = {}
    for (name, labels), value in totals.items():
        parsed = json.loads(labels) if labels else {}
        if name == metric + "_bucket":
            le = parsed.pop("le", "+Inf")
            per_set.setdefault(labels_key(**parsed), {})[le] = value
        elif name == metric + "_sum":
            sums[labels] = value
    samples: List[Sample] = []
    for labels in sorted(set(per_set) | set(sums) | {""}):
        base = json.loads(labels) if labels else {}
        counts = per_set.get(labels, {})
        running = 0.0
        for bound in [*map(_number, bounds), "+Inf"]:
            running += counts.get(bound, 0.0)
            samples.append(("_bucket", {**base, "le": bound}, running))
        samples.append(("_sum", base, sums.get(labels, 0.0)))
        samples.append(("_count", base, running))
    return samples


def render(snapshot: Dict[str, Any]) -> str:
    """The /metrics page from ``Queue.metrics_snapshot()``."""
    totals: Dict[Tuple[str, str], float] = snapshot["counters"]
    runs = {outcome: 0.0 for outcome in OUTCOMES}
    for (name, labels), value in totals.items():
        if name == RUNS and labels:
            outcome = json.loads(labels).get("outcome", "")
            runs[outcome] = runs.get(outcome, 0.0) + value
    jobs = [("", {"state": state}, float(n)) for state, n in snapshot["jobs"].items()]
    groups = snapshot["groups"]
    families = [
        ("jobs", "gauge", "Jobs in the queue by state (retention deletes old finished ones).", jobs),
        ("runs_total", "counter", "Finished runs by outcome (failed: will be retried; dead: "
         "moved to the DLQ). Never decreases, also across purges.",
         [("", {"outcome": outcome}, value) for outcome, value in runs.items()]),
        (DURATION, "histogram", "Wall-clock duration of finished runs.",
         _histogram(totals, DURATION, DURATION_BUCKETS)),
        (PICKUP, "histogram", "Seconds from when a job was due (run_at) to when a worker "
         "started it.", _histogram(totals, PICKUP, PICKUP_BUCKETS)),
        ("workers", "gauge", "Live registered workers, busy (running a job) or idle.",
         [("", {"status": "busy"}, float(snapshot["workers_busy"])),
          ("", {"status": "idle"}, float(snapshot["workers_idle"]))]),
        ("oldest_waiting_job_age_seconds", "gauge", "Age of the job that has been due the "
         "longest without being started (0 when none is due).",
         [("", {}, float(snapshot["oldest_waiting_age"]))]),
        ("paused", "gauge", "1 while the queue is paused.", [("", {}, 1.0 if snapshot["paused"] else 0.0)]),
        # Per group, what `group list` shows: finished jobs are counted by state only above
        # (per group they would be a scan of every finished row at each scrape).
        ("group_jobs", "gauge", "Jobs of a group running now, or waiting (pending, or failed "
         "and waiting for a retry).",
         [("", {"group": g["name"], "state": state}, float(g[state]))
          for g in groups for state in ("running", "waiting")]),
        ("group_limit", "gauge", "A group's --parallel limit (groups that have one).",
         [("", {"group": g["name"]}, float(g["parallel"])) for g in groups if g["parallel"] is not None]),
        ("group_paused", "gauge", "1 while a group is paused.",
         [("", {"group": g["name"]}, 1.0 if g["paused"] else 0.0) for g in groups]),
    ]
    return exposition(families)
