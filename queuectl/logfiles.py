"""Logs of long-lived processes (workers, the supervisor): stderr to a file that rotates by size.

A detached worker's stderr *is* its log file (the launcher opens it before the exec), so a
crash's traceback lands there too. Rotation therefore moves the file aside and points fd 2 at
a fresh one (dup2): logging, tracebacks and stray writes all follow. Under systemd or a
terminal stderr is not a regular file and nothing rotates: journald keeps its own bounds.
"""
from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path
from typing import Optional

from queuectl.paths import private_file

# A worker logs failures (and, with --log-jobs, two lines per job, ~150 bytes each): 4 MiB is
# about 14k jobs of --log-jobs. Three files (the live one, .1, .2) bound a log at 12 MiB.
MAX_BYTES = 4 * 1024 * 1024
KEEP = 2  # rotated files kept beside the live one


class RotatingStderr(logging.StreamHandler):
    """A handler on sys.stderr that rotates ``path`` once fd 2 (that file) passes ``max_bytes``."""

    def __init__(self, path: "os.PathLike[str]", max_bytes: Optional[int] = None,
                 keep: Optional[int] = None) -> None:
        super().__init__(sys.stderr)
        self.path = Path(path)
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.keep = KEEP if keep is None else keep

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        try:
            self._maybe_rotate()
        except OSError:
            pass  # a full disk must not turn logging into a crash; the next line tries again

    def _maybe_rotate(self) -> None:
        here = os.fstat(2)
        if here.st_size < self.max_bytes:
            return
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return
        if (named.st_dev, named.st_ino) != (here.st_dev, here.st_ino):
            return  # our file is not (yet) at its name: the launcher renames it after the fork
        rotate_files(self.path, self.keep)
        fd = private_file(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            sys.stderr.flush()
            os.dup2(fd, 2)
        finally:
            os.close(fd)


def rotate_files(path: Path, keep: int) -> None:
    """path.(keep-1) -> path.keep, ..., path -> path.1; the oldest beyond ``keep`` is dropped."""
    for index in range(keep, 0, -1):
        older = Path(f"{path}.{index}")
        newer = Path(f"{path}.{index - 1}") if index > 1 else path
        if index == keep and older.exists():
            older.unlink()
        if newer.exists():
            os.replace(newer, older)


def setup(name: str, log_path: Optional["os.PathLike[str]"]) -> None:
    """Log INFO and up to stderr as ``<time> name[pid] LEVEL message``, rotating ``log_path``
    when stderr is that (regular) file."""
    try:
        regular = stat.S_ISREG(os.fstat(2).st_mode)
    except OSError:
        regular = False
    handler: logging.Handler = (RotatingStderr(log_path) if log_path is not None and regular
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(f"%(asctime)s {name}[{os.getpid()}] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
