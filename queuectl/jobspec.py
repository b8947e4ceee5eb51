"""What a job submission may contain, and its validation into one normalized form."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List

from queuectl.errors import InvalidInput
from queuectl.timeutil import MAX_EPOCH, parse_duration, parse_instant

ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,127}")
MAX_COMMAND = 1_000_000
MAX_PRIORITY = 1_000_000
MAX_RETRIES = 1000
MAX_SECONDS = 10 * 365 * 86400.0

FIELDS = ("id", "command", "max_retries", "priority", "run_at", "delay", "timeout", "cwd",
          "after", "unique_key", "env", "group", "slots")
DEFAULT_GROUP = "default"
MAX_SLOTS = 1024  # a job's slots of its worker (a worker runs at most 1024 jobs at once)
# Set by the worker for every job; an explicit value would be overwritten, so it is refused.
# Always the worker's, never taken from the enqueuer's environment (QUEUECTL_HOST: which
# host a job runs on is the worker's fact, not the enqueuer's).
WORKER_VARS = ("QUEUECTL_HOME", "QUEUECTL_DB", "QUEUECTL_HOST", "QUEUECTL_JOB_ID", "QUEUECTL_ATTEMPT")
MAX_ENV_BYTES = 1_000_000
# Accepted for compatibility with the job records of earlier designs; only "new job" values pass.
LEGACY_FIELDS = ("state", "attempts", "created_at", "updated_at")


def validate_id(value: Any, field: str = "id", new: bool = True) -> str:
    """``new``: an id being created; plain numbers are reserved for generated ids."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, got {_kind(value)}")
    shown = value if len(value) <= 40 else value[:40] + "…"
    if new and value.isdigit() and ID_PATTERN.fullmatch(value):
        raise InvalidInput(f"invalid {field} {shown!r}: plain numbers are reserved for generated ids "
                           f"(use e.g. 'job-{value}')")
    if not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidInput(
            f"invalid {field} {shown!r}: use 1-128 letters, digits and _ . : @ + = - "
            "(starting with a letter, digit or _; no '..')")
    return value


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _integer(data: Dict[str, Any], name: str, low: int, high: int) -> "int | None":
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise InvalidInput(f"{name} must be a whole number, got {_kind(value)}: {value!r}")
    if not (low <= value <= high):
        raise InvalidInput(f"{name} must be from {low} to {high}, got {value!r}")
    return int(value)


def _seconds(data: Dict[str, Any], name: str, low_exclusive: bool) -> "float | None":
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f"{name} must be a number of seconds, got {_kind(value)}")
    seconds = parse_duration(value, name)
    if low_exclusive and seconds <= 0:
        raise InvalidInput(f"{name} must be greater than 0, got {value!r}")
    if seconds > MAX_SECONDS:
        raise InvalidInput(f"{name} is too large: {value!r} (at most {int(MAX_SECONDS)} seconds)")
    return seconds


def _command(value: Any) -> "tuple[str, int]":
    if isinstance(value, str):
        if not value.strip():
            raise InvalidInput("command must not be empty")
        if "\0" in value or len(value) > MAX_COMMAND:
            raise InvalidInput("command must not contain NUL bytes or exceed 1 MB")
        return value, 0
    if isinstance(value, list):
        if not value or not all(isinstance(arg, str) for arg in value):
            raise InvalidInput("command list must be a non-empty list of strings")
        if not value[0].strip():
            raise InvalidInput("command must not be empty")
        if any("\0" in arg for arg in value):
            raise InvalidInput("command must not contain NUL bytes")
        return json.dumps(value), 1
    if value is None:
        raise InvalidInput("missing required field 'command'")
    raise InvalidInput(f"command must be a string (shell) or a list of strings (argv), got {_kind(value)}")


def parse_env(value: Any) -> "Dict[str, str] | None":
    """Explicit environment variables of a job: {name: value}, strings only."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"env must be an object of NAME: value strings, got {_kind(value)}")
    size = 0
    for name, text in value.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise InvalidInput(f"invalid environment variable name {name!r}: it must be non-empty "
                               "and contain no '=' or NUL")
        if name in WORKER_VARS:
            raise InvalidInput(f"{name} is set by the worker for every job; it cannot be given")
        if not isinstance(text, str):
            raise InvalidInput(f"environment variable {name} must be a string, got {_kind(text)}")
        if "\0" in text:
            raise InvalidInput(f"environment variable {name} must not contain NUL bytes")
        size += len(name) + len(text)
    if size > MAX_ENV_BYTES:
        raise InvalidInput("env is too large (at most 1 MB)")
    return dict(value) or None


def parse_env_assignments(items: "List[str]") -> "Dict[str, str]":
    """``--env K=V`` (repeatable) as a dict; the last of a repeated name wins."""
    env: Dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise InvalidInput(f"--env wants NAME=VALUE, got {item!r}")
        env[name] = text
    parse_env(env)
    return env


def parse_after(value: Any) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise InvalidInput(f"after must be a list of job ids, got {_kind(value)}")
    return [validate_id(item, "after id", new=False) for item in value]


def parse_job(data: Any, *, now: float, default_cwd: "str | None") -> Dict[str, Any]:
    """Normalize one submission; raise InvalidInput with a one-line reason."""
    if type(data) is dict and len(data) == 1:
        # Fast path for the commonest bulk line, {"command": "..."}: same checks and result as
        # below, without the generic field walk (bulk enqueue validates 100k of these a second).
        command = data.get("command")
        if type(command) is str and command.strip() and "\0" not in command and len(command) <= MAX_COMMAND:
            return {"id": None, "command": command, "argv": 0, "priority": 0, "max_retries": None,
                    "timeout": None, "cwd": default_cwd, "run_at": min(now, MAX_EPOCH),
                    "unique_key": None, "after": [], "env": None, "group": DEFAULT_GROUP,
                    "slots": 1}
    if not isinstance(data, dict):
        raise InvalidInput(f"a job must be a JSON object, got {_kind(data)}")
    for name in data:
        if name not in FIELDS and name not in LEGACY_FIELDS:
            raise InvalidInput(f"unknown field {name!r} (valid fields: {', '.join(FIELDS)})")
    if data.get("state", "pending") != "pending":
        raise InvalidInput("state can only be 'pending' for a new job")
    if data.get("attempts", 0) != 0 or isinstance(data.get("attempts"), bool):
        raise InvalidInput("attempts can only be 0 for a new job")
    for name in ("created_at", "updated_at"):
        if data.get(name) is not None:
            parse_instant(data[name], name)

    job_id = data.get("id")
    if job_id is not None:
        validate_id(job_id)
    command, argv = _command(data.get("command"))

    if data.get("run_at") is not None and data.get("delay") is not None:
        raise InvalidInput("give either run_at or delay, not both")
    if data.get("run_at") is not None:
        run_at = parse_instant(data["run_at"], "run_at")
    else:
        delay = _seconds(data, "delay", low_exclusive=False)
        run_at = now + (delay or 0.0)
    run_at = min(run_at, MAX_EPOCH)

    cwd = data.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd.strip():
            raise InvalidInput("cwd must be a non-empty string")
        cwd = os.path.abspath(os.path.expanduser(cwd))
        if not os.path.isdir(cwd):
            raise InvalidInput(f"cwd does not exist or is not a directory: {cwd}")
    else:
        cwd = default_cwd

    unique_key = data.get("unique_key")
    if unique_key is not None and (not isinstance(unique_key, str) or not unique_key.strip()
                                   or len(unique_key) > 200 or "\n" in unique_key):
        raise InvalidInput("unique_key must be a non-empty single-line string of at most 200 characters")

    after = parse_after(data.get("after"))
    if job_id is not None and job_id in after:
        raise InvalidInput(f"job {job_id!r} cannot depend on itself")

    return {
        "id": job_id,
        "command": command,
        "argv": argv,
        "priority": _integer(data, "priority", -MAX_PRIORITY, MAX_PRIORITY) or 0,
        "max_retries": _integer(data, "max_retries", 0, MAX_RETRIES),
        "timeout": _seconds(data, "timeout", low_exclusive=True),
        "cwd": cwd,
        "run_at": run_at,
        "unique_key": unique_key,
        "after": list(dict.fromkeys(after)),
        "env": parse_env(data.get("env")),
        "group": validate_group(data["group"]) if data.get("group") is not None else DEFAULT_GROUP,
        "slots": _integer(data, "slots", 1, MAX_SLOTS) or 1,
    }


def validate_group(value: Any) -> str:
    """A group name: like an id (letters, digits, _ . : @ + = -), numbers allowed."""
    return validate_id(value, "group", new=False)
