"""Known configuration keys: defaults, types, valid ranges and aliases. Values live in the DB."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from queuectl.errors import InvalidInput, NotFound


@dataclass(frozen=True)
class Setting:
    default: Any
    kind: type
    low: float       # numbers: the valid range; strings: high is the longest allowed
    high: float
    help: str
    optional: bool = False  # accepts "none" meaning "no limit" (0 is refused, as in add)
    seconds: bool = False   # a duration: 30, 30s, 5m, 2h, 1d (timeutil.parse_duration)


SETTINGS: Dict[str, Setting] = {
    "max_retries": Setting(3, int, 0, 1000, "retries after the first run before a job goes to the DLQ"),
    "backoff_base": Setting(2.0, float, 0, 1000, "retry delay is backoff_base ** attempts seconds "
                            "(0 = retry at once, else at least 1: delays never shrink)"),
    "backoff_max": Setting(3600.0, float, 0, 31_536_000, "upper bound of one retry delay, seconds",
                           seconds=True),
    "job_timeout": Setting(None, float, 0.001, 31_536_000,
                           "default per-job timeout in seconds ('none' = no timeout)", optional=True,
                           seconds=True),
    "poll_interval": Setting(1.0, float, 0.01, 60,
                             "how often an idle worker re-checks the queue without a wake-up, seconds",
                             seconds=True),
    "lease_seconds": Setting(30.0, float, 2, 86_400,
                             "a busy worker renews its lease every second; a job whose lease ran out "
                             "(worker frozen or gone) returns to the retry path", seconds=True),
    "capture_env": Setting(True, bool, 0, 1, "jobs run with the environment of the command that "
                           "enqueued them (false: the worker's environment)"),
    "on_failure": Setting(None, str, 0, 4096, "a shell command run when a job's run fails (job "
                          "id, state, attempt, error in QUEUECTL_* variables; 'none' = off)",
                          optional=True),
    "on_dead": Setting(None, str, 0, 4096, "a shell command run when a job lands in the DLQ "
                       "('none' = off)", optional=True),
    "db_tail_bytes": Setting(65536, int, 0, 16 * 1024 * 1024,
                             "bytes of each attempt's output kept in the database: what `show` "
                             "prints, and `logs` on a host other than the one that ran it"),
    # Retention (queuectl/retention.py): workers delete finished jobs and their logs once
    # they are this old; 'none' keeps them forever.
    "keep_completed": Setting(604800.0, float, 1, 315_360_000, "completed jobs (and their logs) "
                              "are deleted this long after they finished ('none' = kept forever)",
                              optional=True, seconds=True),
    "keep_dead": Setting(None, float, 1, 315_360_000, "dead jobs (the DLQ) are deleted this long "
                         "after they died ('none' = kept forever)", optional=True, seconds=True),
    "keep_cancelled": Setting(604800.0, float, 1, 315_360_000, "cancelled jobs are deleted this long "
                              "after they were cancelled ('none' = kept forever)", optional=True,
                              seconds=True),
    "max_log_bytes": Setting(64 * 1024 * 1024, int, 65536, 1 << 40,
                             "output kept per attempt in its log file: beyond it the head and the "
                             "tail stay and the cut is marked ('none' = no cap)", optional=True),
}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
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
    if setting.kind is str:
        return _text(key, raw, setting)
    if setting.kind is bool:
        if isinstance(raw, bool):
            return raw
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise InvalidInput(f"invalid value {raw!r} for {key}: expected true or false")
    if setting.optional and text.lower() in ("none", "null", "off"):
        return None
    if isinstance(raw, bool):
        raise InvalidInput(f"{key} must be a number, not a boolean")
    expected = "a whole number" if setting.kind is int else "a number"
    try:
        number = float(text)
    except ValueError:
        number = None
        if setting.seconds:
            from queuectl.timeutil import parse_duration

            try:
                number = parse_duration(text, key)
            except InvalidInput:
                pass
        if number is None:
            kind = "a duration (30, 30s, 5m, 2h)" if setting.seconds else expected
            raise InvalidInput(f"invalid value {raw!r} for {key}: expected {kind} "
                               f"from {_fmt(setting.low)} to {_fmt(setting.high)}"
                               + (" or 'none'" if setting.optional else "")) from None
    if setting.optional and number == 0:
        raise InvalidInput(f"invalid value {raw!r} for {key}: must be greater than 0 "
                           "('none' means no limit)")
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
    if key == "backoff_base" and 0 < number < 1:
        raise InvalidInput(f"invalid value {raw!r} for {key}: must be 0 (retry at once) or from 1 "
                           "to 1000 (a base below 1 would make each delay shorter than the last)")
    return number


def _text(key: str, raw: Any, setting: Setting) -> Optional[str]:
    """A string setting (a hook's command): 'none' or empty unsets it; at most ``high`` chars."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidInput(f"invalid value {raw!r} for {key}: expected a string (a shell command)")
    text = raw.strip()
    if text.lower() in ("", "none", "null", "off"):
        return None
    if len(text) > setting.high:
        raise InvalidInput(f"invalid value for {key}: at most {_fmt(setting.high)} characters")
    if "\0" in text:
        raise InvalidInput(f"invalid value for {key}: contains a NUL character")
    return text


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
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def describe(key: str) -> str:
    return SETTINGS[key].help


