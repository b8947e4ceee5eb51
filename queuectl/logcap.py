"""Keep one attempt's output in its log within ``max_log_bytes``: the head and the tail stay,
the middle goes, and a marker line says where and how much.

The job writes straight into the log (its stdout is the file, opened O_APPEND), so the
worker cannot filter what it writes; it checks the size at each heartbeat tick (every
second) and at the end of the run, and cuts when the attempt's output is over the cap:
- where the filesystem can (ext4, xfs): ``fallocate(FALLOC_FL_COLLAPSE_RANGE)`` removes
  whole blocks from the middle of the file in place, atomically with respect to the job's
  appends: nothing is copied and nothing the job writes meanwhile is lost. The marker is
  written over the first bytes of the block that follows the removed range, so it sits
  exactly at the cut;
- elsewhere (tmpfs, btrfs): the tail is copied, the file truncated after the head and the
  marker and tail appended. Output written during the few microseconds between reading the
  tail and truncating can be lost; the marker then says "at least".
The head is half the cap, the tail kept at each cut a quarter, so a cut happens once per
quarter cap of further output. Recovery reads the end of the log (the result line), which a
cut never touches; the attempt's header is in the head.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Optional

BLOCK = 4096               # the granularity COLLAPSE_RANGE needs (a multiple of ext4/xfs blocks)
_COLLAPSE_RANGE = 0x08     # FALLOC_FL_COLLAPSE_RANGE (linux/falloc.h)
MARK_PREFIX = b"--- queuectl: output cut here: "


def marker(dropped: int, cap: int, exact: bool = True) -> bytes:
    """The line that marks a cut (never mistaken for a header or result line: no "job")."""
    amount = f"{dropped} bytes" if exact else f"at least {dropped} bytes"
    return (b"\n" + MARK_PREFIX
            + f"{amount} of output removed (max_log_bytes {cap}) ---\n".encode())


def _load_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def collapse(fd: int, offset: int, length: int) -> None:
    """Remove [offset, offset + length) from the file in place (block multiples); OSError
    (EOPNOTSUPP, EINVAL, ...) when the filesystem cannot."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, _COLLAPSE_RANGE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class OutputCap:
    """The cut state of one attempt's output in an open log (``start``: its first byte)."""

    def __init__(self, fd: int, start: int, cap: int) -> None:
        self.fd, self.start, self.cap = fd, start, cap
        self.head = cap // 2
        self.keep = cap // 4
        self.dropped = 0                # bytes of output removed so far
        self.mark_len = 0               # length of the marker now in the file (0: none yet)
        self.in_place: Optional[bool] = None if _fallocate is not None else False

    def check(self) -> None:
        """Cut if the attempt's output is over the cap; a failure to cut (disk full, odd
        filesystem) leaves the log as it is."""
        try:
            size = os.fstat(self.fd).st_size
            if size - self.start <= self.cap:
                return
            if self.in_place is not False:
                try:
                    self._collapse(size)
                    self.in_place = True
                    return
                except OSError as exc:
                    if self.in_place or exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP,
                                                         errno.EINVAL, errno.ENOSYS):
                        return  # collapse worked before: a transient failure, try next tick
                    self.in_place = False
            self._copy(size)
        except OSError:
            pass

    def _collapse(self, size: int) -> None:
        # Aligned to the file's blocks (not the attempt's start): what COLLAPSE_RANGE needs.
        cut_from = -(-(self.start + self.head) // BLOCK) * BLOCK
        mark_at = ((size - self.keep) // BLOCK) * BLOCK - BLOCK
        if mark_at <= cut_from:
            return
        dropped = self.dropped + (mark_at - cut_from) - self.mark_len
        mark = marker(dropped, self.cap)
        for _ in range(3):  # the marker is written over as much output as it is long
            mark = marker(dropped + len(mark), self.cap)
        dropped += len(mark)
        writer = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY)  # pwrite: not O_APPEND
        try:
            collapse(self.fd, cut_from, mark_at - cut_from)
            os.pwrite(writer, mark, cut_from)
        finally:
            os.close(writer)
        self.dropped, self.mark_len = dropped, len(mark)

    def _copy(self, size: int) -> None:
        cut_from = self.start + self.head
        tail = os.pread(self.fd, self.keep, size - self.keep)
        if os.fstat(self.fd).st_size != size:  # the job wrote meanwhile: read again
            size = os.fstat(self.fd).st_size
            tail = os.pread(self.fd, self.keep, size - self.keep)
        os.ftruncate(self.fd, cut_from)
        dropped = self.dropped + (size - self.keep - cut_from) - self.mark_len
        mark = marker(dropped, self.cap, exact=False)  # appends during the cut go uncounted
        os.write(self.fd, mark + tail)
        self.dropped, self.mark_len = dropped, len(mark)
