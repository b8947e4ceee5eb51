"""Known configuration keys: defaults, types, valid ranges and aliases. Values live in the DB."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from queuectl.errors import InvalidInput, NotFound


@dataclass(frozen=True)
class Setting:
    default: Any
    kind: type
    low: float
    high: float
    help: str
    optional: bool = False  # accepts "none" (and 0) meaning "no limit"


SETTINGS: Dict[str, Setting] = {
    "max_retries": Setting(3, int, 0, 1000, "retries after the first run before a job goes to the DLQ"),
    "backoff_base": Setting(2.0, float, 0, 1000, "retry delay is backoff_base ** attempts seconds"),
    "backoff_max": Setting(3600.0, float, 0, 31_536_000, "upper bound of one retry delay, seconds"),
    "job_timeout": Setting(None, float, 0.001, 31_536_000,
                           "default per-job timeout in seconds ('none' = no timeout)", optional=True),
    "poll_interval": Setting(1.0, float, 0.01, 60,
                             "how often an idle worker re-checks the queue without a wake-up, seconds"),
    "lease_seconds": Setting(30.0, float, 2, 86_400,
                             "a busy worker renews its lease every second; a job whose lease ran out "
                             "(worker frozen or gone) returns to the retry path"),
    "db_tail_bytes": Setting(65536, int, 0, 16 * 1024 * 1024,
                             "bytes of each attempt's output kept in the database: what `show` "
                             "prints, and `logs` on a host other than the one that ran it"),
}
# Names used by earlier queuectl designs that users still type.
ALIASES = {
    "default_max_retries": "max_retries",
    "worker_poll_interval": "poll_interval",
    "timeout": "job_timeout",
    "max_backoff": "backoff_max",
}


def canonical_key(key: str) -> str:
    name = ALIASES.get(key.strip().lower().replace("-", "_"), key.strip().lower().replace("-", "_"))
    if name not in SETTINGS:
        raise NotFound(f"unknown config key {key!r}; valid keys: {', '.join(SETTINGS)}")
    return name


def parse_value(key: str, raw: Any) -> Any:
    """Validate a user-supplied value (string from the CLI or a JSON value) for ``key``."""
    setting = SETTINGS[key]
    text = str(raw).strip()
    if setting.optional and text.lower() in ("none", "null", "off", "0", ""):
        return None
    if isinstance(raw, bool):
        raise InvalidInput(f"{key} must be a number, not a boolean")
    expected = "a whole number" if setting.kind is int else "a number"
    try:
        number = float(text)
    except ValueError:
        raise InvalidInput(f"invalid value {raw!r} for {key}: expected {expected} "
                           f"from {_fmt(setting.low)} to {_fmt(setting.high)}") from None
    if number != number or number in (float("inf"), float("-inf")):  # 'nan', 'inf', 1e999
        raise InvalidInput(f"invalid value {raw!r} for {key}: must be from {_fmt(setting.low)} "
                           f"to {_fmt(setting.high)}")
    if setting.kind is int:
        if number != int(number):
            raise InvalidInput(f"invalid value {raw!r} for {key}: expected {expected}")
        number = int(number)
    if not (setting.low <= number <= setting.high):
        extra = " or 'none'" if setting.optional else ""
        raise InvalidInput(f"invalid value {raw!r} for {key}: must be from {_fmt(setting.low)} "
                           f"to {_fmt(setting.high)}{extra}")
    return number


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def effective(stored: Dict[str, str], overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults, then values stored in the DB, then per-process overrides (e.g. worker flags)."""
    values = {key: s.default for key, s in SETTINGS.items()}
    for key, raw in stored.items():
        if key in SETTINGS:
            try:
                values[key] = parse_value(key, raw)
            except InvalidInput:
                pass  # a value written by a newer version; keep the default
    if overrides:
        values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def encode(value: Any) -> str:
    return "none" if value is None else str(value)


def describe(key: str) -> str:
    return SETTINGS[key].help


