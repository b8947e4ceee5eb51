"""``queuectl stats``: throughput, failure rate and durations of recent runs, per command
or per group.

Figures come from the runs still in the database (retention deletes old ones: a window
longer than keep_completed sees only what is left). Percentiles are nearest-rank over
the window's finished runs; the window is read once, so memory grows with its runs.
"""
from __future__ import annotations

import json
import math
import shlex
from typing import Any, Dict, Iterable, List, Optional, Sequence


def percentile(sorted_values: Sequence[float], fraction: float) -> Optional[float]:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def command_text(command: str, argv: Any) -> str:
    """What a user typed: the shell string, or the argv list joined as a shell would show it."""
    if argv:
        try:
            return shlex.join(json.loads(command))
        except (ValueError, TypeError):
            return command
    return command


BY = {"command": "commands", "group": "groups"}  # what rows can be per -> their list's key


def summarize(runs: Iterable[Dict[str, Any]], window: float, by: str = "command") -> Dict[str, Any]:
    """{"window_seconds", "total": row, "commands" (or "groups", ``by="group"``): [row, ...]
    most runs first}; a row has its command (or group), runs, completed, failed, cancelled,
    throughput (completed per second), failure_rate (failed / (completed + failed)) and
    p50/p95 seconds (of completed and failed runs)."""
    parts: Dict[str, List[Dict[str, Any]]] = {}
    every: List[Dict[str, Any]] = []
    for run in runs:
        name = command_text(run["command"], run["argv"]) if by == "command" else run["grp"]
        parts.setdefault(name, []).append(run)
        every.append(run)
    rows = [{by: name, **_row(items, window)} for name, items in parts.items()]
    rows.sort(key=lambda row: (-row["runs"], row[by]))
    return {"window_seconds": window, "total": _row(every, window), BY[by]: rows}


def _row(runs: List[Dict[str, Any]], window: float) -> Dict[str, Any]:
    counts = {"completed": 0, "failed": 0, "cancelled": 0}
    durations: List[float] = []
    for run in runs:
        counts[run["outcome"]] = counts.get(run["outcome"], 0) + 1
        if run["outcome"] != "cancelled" and run["started_at"] is not None \
                and run["finished_at"] is not None:
            durations.append(max(run["finished_at"] - run["started_at"], 0.0))
    durations.sort()
    decided = counts["completed"] + counts["failed"]
    return {"runs": len(runs), **counts,
            "throughput": counts["completed"] / window if window > 0 else 0.0,
            "failure_rate": counts["failed"] / decided if decided else 0.0,
            "p50": percentile(durations, 0.50), "p95": percentile(durations, 0.95)}
