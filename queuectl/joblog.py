"""Per-job log files: one file per job, each attempt between a header and a result line."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import List, Optional, Tuple

# The default of config db_tail_bytes: logs stay on the host that ran the attempt, so the
# database keeps enough of each attempt's output for `logs` on any other host.
TAIL_BYTES = 65536
# What recovery reads back from the end of a log to learn how an attempt ended.
STATUS_BYTES = 65536
# "started" is part of the pattern: the result line below must never count as a header.
_HEADER = re.compile(rb"^=== queuectl job (\S+) attempt (\d+) started .*===$", re.M)
# "---", not "===": whatever counts "=== queuectl job X attempt N" lines still counts headers.
_RESULT = re.compile(rb"^--- queuectl job (\S+) attempt (\d+) finished: (.*) ---$", re.M)
OK_RESULT = "exit 0"


def header(job_id: str, attempt: int, worker_id: str, command: str) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return (f"=== queuectl job {job_id} attempt {attempt} started {stamp} on {worker_id} ===\n"
            f"$ {command}\n").encode("utf-8", "replace")


def result_line(job_id: str, attempt: int, error: Optional[str]) -> bytes:
    """The attempt's last line: ``exit 0`` or the error that will be recorded for it."""
    result = OK_RESULT if error is None else " ".join(error.split())
    return f"--- queuectl job {job_id} attempt {attempt} finished: {result} ---\n".encode("utf-8", "replace")


def interrupted_line(job_id: str, attempt: int) -> bytes:
    """What recovery appends to the log of a run whose worker died before it ended. Not a
    result line ("finished:"): it records no outcome, only that the run was cut off."""
    return f"--- queuectl job {job_id} attempt {attempt} interrupted: worker died ---\n".encode(
        "utf-8", "replace")


def append_interrupted(path: "str | Path", job_id: str, attempt: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # never creates a log for a job that has none
    except OSError:
        return
    try:
        os.write(fd, b"\n" + interrupted_line(job_id, attempt))
    except OSError:
        pass
    finally:
        os.close(fd)


def open_for_attempt(path: "str | Path", head: bytes) -> "Tuple[int, int]":
    """Open the log for reading and appending, write the attempt header; return (fd, offset
    of the output). The caller keeps the fd for the tail and the result line."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)  # output may hold secrets
    os.write(fd, head)
    return fd, os.lseek(fd, 0, os.SEEK_END)


def tail_of(fd: int, start: int = 0, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes after ``start`` of an open log, decoded safely whatever the job
    printed ("" at once, with one fstat, when it printed nothing: the usual case)."""
    size = os.fstat(fd).st_size
    if size <= start:
        return ""
    begin = max(start, size - limit)
    text = os.pread(fd, limit, begin).decode("utf-8", "replace")
    if begin > start:
        text = "…" + text.split("\n", 1)[-1] if "\n" in text else "…" + text
    return text


def read_tail(path: Path, start: int = 0, limit: int = TAIL_BYTES) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return ""
    try:
        return tail_of(fd, start, limit)
    except OSError:
        return ""
    finally:
        os.close(fd)


def attempt_status(path: Path, attempt: int, worker_id: str) -> "Tuple[bool, Optional[str]]":
    """How ``attempt`` of the claim by ``worker_id`` went, as far as its log tells:
    (started, result). ``result`` is its result line's text ("exit 0" or an error), None
    while it has none (never started, still running, or its worker died mid-run).

    The worker is part of the match because attempt numbers start again after a DLQ retry.
    A header missing from a log too large to read whole counts as started: when unsure,
    recovery must assume the command ran.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - STATUS_BYTES))
            data = handle.read()
    except FileNotFoundError:
        return False, None  # a worker creates the log before it starts the command
    except OSError:
        return True, None
    wanted, ours = str(attempt).encode(), b" on " + worker_id.encode() + b" ==="
    begin = -1
    for match in _HEADER.finditer(data):
        if match.group(2) == wanted and match.group(0).endswith(ours):
            begin = match.start()
    if begin < 0 and size <= STATUS_BYTES:
        return False, None
    started, result = True, None
    for match in _RESULT.finditer(data, max(begin, 0)):
        if match.group(2) == wanted:
            result = match.group(3).decode("utf-8", "replace")
    return started, result


def _marks(data: bytes) -> "List[Tuple[int, int]]":
    return [(int(m.group(2)), m.start()) for m in _HEADER.finditer(data)]


def attempts(path: Path) -> "List[Tuple[int, int]]":
    """(attempt number, byte offset of its header) for each attempt in the file."""
    try:
        return _marks(path.read_bytes())
    except OSError:
        return []


def read_attempt(path: Path, attempt: Optional[int] = None) -> bytes:
    """The whole log, or the section of one attempt (the last one with that number)."""
    try:
        data = path.read_bytes()
    except OSError:
        return b""
    if attempt is None:
        return data
    marks = _marks(data)
    for i in range(len(marks) - 1, -1, -1):
        if marks[i][0] == attempt:
            end = marks[i + 1][1] if i + 1 < len(marks) else len(data)
            return data[marks[i][1]:end]
    return b""


def tail_lines(data: bytes, count: int) -> bytes:
    """The last ``count`` lines of ``data`` (a last line without a newline counts)."""
    if count <= 0:
        return b""
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return data
    return data[pos + 1:]


def read_last_lines(path: Path, count: int, block: int = 65536) -> "Tuple[bytes, int]":
    """The last ``count`` lines of a log and the offset where they start, read from the end:
    a log can be hundreds of MB and ``logs --tail`` should not read it all."""
    try:
        handle = open(path, "rb")
    except OSError:
        return b"", 0
    with handle:
        end = handle.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0:
            body = data[:-1] if data.endswith(b"\n") else data
            if data and body.count(b"\n") >= count:
                break
            step = min(block, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
        text = tail_lines(data, count)
        return text, end - len(text)
