"""Per-job log files: one file per job, each attempt introduced by a header line."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import List, Optional, Tuple

TAIL_BYTES = 4096
_HEADER = re.compile(rb"^=== queuectl job (\S+) attempt (\d+) .*===$", re.M)


def header(job_id: str, attempt: int, worker_id: str, command: str) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return (f"=== queuectl job {job_id} attempt {attempt} started {stamp} on {worker_id} ===\n"
            f"$ {command}\n").encode("utf-8", "replace")


def open_for_attempt(path: Path, head: bytes) -> "Tuple[int, int]":
    """Open the log for appending, write the attempt header; return (fd, offset of output)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, head)
    return fd, os.lseek(fd, 0, os.SEEK_END)


def read_tail(path: Path, start: int = 0, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes after ``start``, decoded safely whatever the job printed."""
    try:
        if os.stat(path).st_size <= start:
            return ""  # nothing printed (the usual case): skip the open/read/close
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            begin = max(start, size - limit)
            handle.seek(begin)
            data = handle.read(limit)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if begin > start:
        text = "…" + text.split("\n", 1)[-1] if "\n" in text else "…" + text
    return text


def attempts(path: Path) -> "List[Tuple[int, int]]":
    """(attempt number, byte offset of its header) for each attempt in the file."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return [(int(m.group(2)), m.start()) for m in _HEADER.finditer(data)]


def read_attempt(path: Path, attempt: Optional[int] = None) -> bytes:
    """The whole log, or the section of one attempt (the last one with that number)."""
    try:
        data = path.read_bytes()
    except OSError:
        return b""
    if attempt is None:
        return data
    marks = [(int(m.group(2)), m.start()) for m in _HEADER.finditer(data)]
    for i in range(len(marks) - 1, -1, -1):
        if marks[i][0] == attempt:
            end = marks[i + 1][1] if i + 1 < len(marks) else len(data)
            return data[marks[i][1]:end]
    return b""
