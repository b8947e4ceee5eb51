"""Parsing and formatting of instants and durations typed by users."""
from __future__ import annotations

import re
import time

from queuectl.errors import InvalidInput

MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_instant(value: "str | int | float", field: str = "run_at") -> float:
    """Accept epoch seconds or ISO-8601 (naive means local time) and return epoch seconds."""
    if isinstance(value, bool):
        raise InvalidInput(f"{field} must be an ISO-8601 time or epoch seconds, not a boolean")
    if isinstance(value, (int, float)):
        epoch = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            epoch = float(text)
        except ValueError:
            epoch = _parse_iso(text, field)
    else:
        raise InvalidInput(f"{field} must be an ISO-8601 time or epoch seconds")
    if not (0 <= epoch <= MAX_EPOCH) or epoch != epoch:
        raise InvalidInput(f"{field} is out of range: {value!r}")
    return epoch


def _parse_iso(text: str, field: str) -> float:
    from datetime import datetime  # lazy: keeps CLI start-up fast

    candidate = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        moment = datetime.fromisoformat(candidate)
    except ValueError:
        raise InvalidInput(
            f"{field} is not a valid time: {text!r} (use ISO-8601 like 2025-12-01T10:00:00Z, or epoch seconds)"
        ) from None
    return moment.timestamp()


def parse_duration(value: "str | int | float", field: str = "duration") -> float:
    """Seconds from '90', '1.5', '30s', '5m', '2h', '7d' or '1w'."""
    if isinstance(value, bool):
        raise InvalidInput(f"{field} must be a number of seconds, not a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise InvalidInput(f"{field} is not a valid duration: {value!r} (examples: 30, 30s, 5m, 2h, 7d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds != seconds or seconds < 0:
        raise InvalidInput(f"{field} must not be negative: {value!r}")
    return seconds


def format_instant(epoch: "float | None") -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_duration(seconds: "float | None") -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"
