"""Per-job log files: each attempt between a header and a result line.

A log may also hold other jobs' sections: a run's log starts as a link to its worker slot's
spool (queuectl/spool.py), so a kept log can begin with the silent sections of the runs
before it, and a silent run's link can see the next runs' sections until it is removed.
Every reader therefore keeps only its job's part (``own_span``)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, BinaryIO, List, Mapping, Optional, Tuple

# The default of config db_tail_bytes: logs stay on the host that ran the attempt, so the
# database keeps enough of each attempt's output for `logs` on any other host.
TAIL_BYTES = 65536
# What recovery reads back from the end of a log to learn how an attempt ended.
STATUS_BYTES = 65536
# "started" is part of the pattern: the result line below must never count as a header.
_HEADER = re.compile(rb"^=== queuectl job (\S+) attempt (\d+) started .*===$", re.M)
# "---", not "===": whatever counts "=== queuectl job X attempt N" lines still counts headers.
_RESULT = re.compile(rb"^--- queuectl job (\S+) attempt (\d+) finished: (.*) ---$", re.M)
# Either: group 1 is a header's job, group 2 a result line's.
_MARK = re.compile(rb"^(?:=== queuectl job (\S+) attempt \d+ started .*===|"
                   rb"--- queuectl job (\S+) attempt \d+ finished: .* ---)$", re.M)
OK_RESULT = "exit 0"
# Reading the start of a log for its job's first header, this much at a time.
SCAN_BLOCK = 1 << 20
# A log this small is read whole to find its job's part; a larger one only has other jobs'
# sections at its head (a spool is retired once a run printed anything).
WHOLE_BYTES = 4 << 20


def header(job_id: str, attempt: int, worker_id: str, command: str,
           at: Optional[float] = None) -> bytes:
    """``at``: when the attempt started (default now)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))
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
    return from_a_line(text) if begin > start else text


def from_a_line(text: str) -> str:
    """A window that starts inside the output: from its first whole line, marked as cut."""
    return "…" + text.split("\n", 1)[-1] if "\n" in text else "…" + text


def pruned(job: Mapping[str, Any], path: "str | Path") -> bool:
    """Whether ``job``'s log is gone because its run completed silently (its link to a
    spool was removed once recorded: queuectl/spool.py)."""
    return job["state"] == "completed" and bool(job["attempts"]) and not os.path.exists(path)


def pruned_log(job: Mapping[str, Any], path: "str | Path") -> Optional[bytes]:
    """What a pruned run's log said (its header and result line), rebuilt from the
    database; None when ``job``'s log was not pruned."""
    if not pruned(job, path):
        return None
    attempt = job["attempts"]
    return (header(job["id"], attempt, job["worker_id"] or "?", job["command"], job["started_at"])
            + result_line(job["id"], attempt, None))


def own_span(data: bytes, job_id: str) -> "Tuple[int, int]":
    """The part of ``data`` (a log, or a window of one) that is ``job_id``'s: from its first
    header to the first other job's header after one of its result lines. A window without
    headers is all its job's; one with only other jobs' headers, none of it."""
    jid = job_id.encode()
    start, ended, foreign = -1, False, False
    for match in _MARK.finditer(data):
        head, done = match.group(1), match.group(2)
        if (head or done) == jid:
            if head is not None:
                if start < 0:
                    start = match.start()
                ended = False
            else:
                ended = True
        elif head is not None:
            if ended:
                return max(start, 0), match.start()
            foreign = True
    if start < 0:
        return (len(data), len(data)) if foreign else (0, len(data))
    return start, len(data)


def own_start(handle: BinaryIO, job_id: str) -> int:
    """Offset of ``job_id``'s first header in an open log, read from its start in blocks:
    what precedes it (other jobs' silent sections) is short. A log without headers starts
    at 0; one with only other jobs' headers at its end (its job's header comes next)."""
    jid = job_id.encode()
    handle.seek(0)
    pos, carry, foreign = 0, b"", False
    while True:
        block = handle.read(SCAN_BLOCK)
        data = carry + block
        cut = data.rfind(b"\n") + 1 if block else len(data)
        for match in _HEADER.finditer(data, 0, cut):
            if match.group(1) == jid:
                return pos + match.start()
            foreign = True
        if not block:
            return pos + len(data) if foreign else 0
        pos, carry = pos + cut, data[cut:]


def attempt_status(path: Path, attempt: int, worker_id: str,
                   job_id: Optional[str] = None) -> "Tuple[bool, Optional[str]]":
    """How ``attempt`` of the claim by ``worker_id`` went, as far as its log tells:
    (started, result). ``result`` is its result line's text ("exit 0" or an error), None
    while it has none (never started, still running, or its worker died mid-run).

    The worker is part of the match because attempt numbers start again after a DLQ retry,
    the job (if given) because the log may be a spool holding other jobs' runs.
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
    jid = None if job_id is None else job_id.encode()
    begin = -1
    for match in _HEADER.finditer(data):
        if (match.group(2) == wanted and match.group(0).endswith(ours)
                and jid in (None, match.group(1))):
            begin = match.start()
    if begin < 0 and size <= STATUS_BYTES:
        return False, None
    started, result = True, None
    for match in _RESULT.finditer(data, max(begin, 0)):
        if match.group(2) == wanted and jid in (None, match.group(1)):
            result = match.group(3).decode("utf-8", "replace")
    return started, result


def _marks(data: bytes) -> "List[Tuple[int, int]]":
    return [(int(m.group(2)), m.start()) for m in _HEADER.finditer(data)]


def attempts(path: Path, job_id: Optional[str] = None) -> "List[Tuple[int, int]]":
    """(attempt number, byte offset of its header) for each attempt in the file (in
    ``job_id``'s part of it: its headers only)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    if job_id is None:
        return _marks(data)
    start, end = own_span(data, job_id)
    jid = job_id.encode()
    return [(int(m.group(2)), m.start()) for m in _HEADER.finditer(data, start, end)
            if m.group(1) == jid]


def read_attempt(path: Path, attempt: Optional[int] = None, job_id: Optional[str] = None) -> bytes:
    """The whole log, or the section of one attempt (the last one with that number); with
    ``job_id``, of that job's part only."""
    try:
        data = path.read_bytes()
    except OSError:
        return b""
    if job_id is not None:
        start, end = own_span(data, job_id)
        data = data[start:end]
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


def read_last_lines(path: Path, count: int, block: int = 65536,
                    job_id: Optional[str] = None) -> "Tuple[bytes, int]":
    """The last ``count`` lines of a log (of ``job_id``'s part of it) and the offset where
    they start, read from the end: a log can be hundreds of MB and ``logs --tail`` should
    not read it all."""
    try:
        handle = open(path, "rb")
    except OSError:
        return b"", 0
    with handle:
        return last_lines_of(handle, count, block, job_id)


def last_lines_of(handle: BinaryIO, count: int, block: int = 65536,
                  job_id: Optional[str] = None) -> "Tuple[bytes, int]":
    """read_last_lines of an open log."""
    end = handle.seek(0, os.SEEK_END)
    if job_id is None:
        return _last_lines(handle, end, count, block)
    if end <= WHOLE_BYTES:
        handle.seek(0)
        data = handle.read()
        start, end = own_span(data, job_id)
        text = tail_lines(data[start:end], count)
        return text, end - len(text)
    first = own_start(handle, job_id)
    text, offset = _last_lines(handle, end, count, block)
    if offset < first:
        text, offset = text[first - offset:], first
    return text, offset


def _last_lines(handle: BinaryIO, end: int, count: int, block: int) -> "Tuple[bytes, int]":
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


class OwnStream:
    """What ``logs --follow`` prints of a growing log: its job's part only. Output is passed
    on as it comes, partial lines too; once the job's result line has been seen, the next
    lines are held until complete and another job's header ends the stream (a silent run's
    link to a spool sees the next runs' sections until it is removed)."""

    LINE_MAX = 4096  # header and result lines are shorter: a longer line is neither

    def __init__(self, job_id: str) -> None:
        self.jid = job_id.encode()
        self.line = b""       # the current line so far: its first LINE_MAX + 1 bytes, or all
                              # of it while it is held
        self.ended = False    # the last of the job's marks was a result line
        self.closed = False   # another job's section began after that
        self.passing = False  # the held line grew too long for a mark: passed on to its end

    def feed(self, chunk: bytes) -> bytes:
        out: List[bytes] = []
        pos = 0
        while pos < len(chunk) and not self.closed:
            newline = chunk.find(b"\n", pos)
            piece = chunk[pos:] if newline < 0 else chunk[pos:newline + 1]
            pos += len(piece)
            if self.passing:
                out.append(piece)
            elif self.ended:  # held until whole (or too long to be another job's header)
                self.line += piece
                if newline >= 0:
                    line, self.line = self.line, b""
                    if not self._mark(line):
                        out.append(line)
                elif len(self.line) > self.LINE_MAX:
                    out.append(self.line)
                    self.line, self.passing = b"", True
            else:  # passed on as it comes; its start kept to tell a mark when it is whole
                out.append(piece)
                self.line = (self.line + piece)[:self.LINE_MAX + 1]
                if newline >= 0:
                    self._mark(self.line)
                    self.line = b""
            if newline >= 0:
                self.passing = False
        return b"".join(out)

    def _mark(self, line: bytes) -> bool:
        """Note a whole line's mark; True when it is another job's header after this job's
        result line: the stream is closed and the line is not this job's."""
        match = _MARK.match(line.rstrip(b"\n")) if len(line) <= self.LINE_MAX + 1 else None
        if match is None:
            return False
        head, done = match.group(1), match.group(2)
        if head is not None and head != self.jid and self.ended:
            self.closed = True
            return True
        if (head or done) == self.jid:
            self.ended = done is not None
        return False

    def flush(self) -> bytes:
        """At the end: a partial line held after the result line (a stray writer's)."""
        rest, self.line = (self.line if self.ended and not self.closed else b""), b""
        return b"" if b"=== queuectl job ".startswith(rest) else rest


def running_output(path: Path, job_id: str, limit: int = TAIL_BYTES) -> str:
    """A running attempt's output so far: the bounded tail of its log from the line after
    the job's last header (for the dashboard)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            begin = max(0, size - limit)
            handle.seek(begin)
            data = handle.read()
    except OSError:
        return ""
    start, end = own_span(data, job_id)
    data = data[start:end]
    jid = job_id.encode()
    last = None
    for match in _HEADER.finditer(data):
        if match.group(1) == jid:
            last = match
    if last is not None:
        return data[last.end() + 1:].decode("utf-8", "replace")  # from its "$ command" line
    text = data.decode("utf-8", "replace")
    return from_a_line(text) if begin > 0 else text  # the output began before the window
