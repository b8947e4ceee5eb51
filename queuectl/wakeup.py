"""Doorbells: one FIFO per worker so an enqueue wakes idle workers at once, without polling.

A worker blocks in select() on its FIFO; anyone who adds work writes one byte to every FIFO.
Nobody listening (ENXIO) or a full pipe (EAGAIN: a wake-up is already pending) are both fine.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional


def fifo_path(workers_dir: Path, pid: int) -> Path:
    return workers_dir / f"{pid}.fifo"


def ring(workers_dir: Path) -> int:
    """Wake every listening worker; returns how many were reached."""
    try:
        names = os.listdir(workers_dir)
    except OSError:
        return 0
    reached = 0
    for name in names:
        if not name.endswith(".fifo"):
            continue
        try:
            fd = os.open(workers_dir / name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # ENXIO: no reader (worker gone); ENOENT: removed meanwhile
        try:
            os.write(fd, b"\0")
            reached += 1
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                reached += 1
        finally:
            os.close(fd)
    return reached


class Doorbell:
    """The listening end, owned by one worker."""

    def __init__(self, workers_dir: Path, pid: Optional[int] = None) -> None:
        self.path = fifo_path(workers_dir, pid or os.getpid())
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.mkfifo(self.path, 0o600)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Holding a writer ourselves keeps the FIFO from reporting EOF (always readable).
        self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self._keepalive):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
