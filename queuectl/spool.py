"""Job logs without a new file per run: each worker slot appends its runs to one spool file.

Creating a file per job was most of what a short job cost a worker on a fresh home (ext4
allocates an inode per create, and freeing many makes the next creates slow: retention),
so a job's log starts as a hard link to its slot's spool (a directory entry, no inode):

- a run that completed, printed nothing and left no process writing to the log (a read
  lease is refused while any process has the file open for writing) has its link removed
  once its result is recorded; `logs` prints its header and result line from the database;
- any other run (output, a failure, a stray writer, a result not recorded) keeps its link as
  its log file, and the slot starts a new spool: nothing is ever appended after that run's
  section by another job. A job that has a log already (an earlier attempt) appends to it,
  first made a file of its own if it is still linked to a spool (a result that was lost);
- a spool is also started afresh every ROTATE_JOBS runs, so a kept log begins with at most
  that many other jobs' (silent) sections; readers keep only their job's part
  (joblog.own_span).

A worker removes its spool names when it stops, and dead workers' names when it starts.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable, List

from queuectl import joblog
from queuectl.paths import FILE_MODE, private_dir

ROTATE_JOBS = 256  # runs per spool: bounds the other jobs' sections at the head of a kept log
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)  # Linux; the value is fixed by its ABI
_F_RDLCK = getattr(fcntl, "F_RDLCK", 0)
_F_UNLCK = getattr(fcntl, "F_UNLCK", 2)


class Spool:
    """One slot's spool: the file runs' logs are linked to, and how many runs it holds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs = 0
        self.usable = True  # False once links or leases turn out unsupported: a file per job

    def attach(self, log_path: str, job_id: str) -> bool:
        """Make ``log_path`` a link to the spool; False when it cannot be one (the job has a
        log already, from an earlier attempt): the run then opens ``log_path`` as before."""
        if not self.usable:
            return False
        if self.runs >= ROTATE_JOBS:
            self.retire()
        for _ in range(2):
            try:
                os.link(self.path, log_path)
            except FileExistsError:
                _make_private(log_path, job_id)
                return False
            except FileNotFoundError:
                if not self._create():
                    return False
                continue
            except OSError:  # no hard links here (some network or FUSE filesystems)
                self.usable = False
                return False
            self.runs += 1
            return True
        return False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return True  # (a race with ourselves cannot happen; an old name is as good)
        except OSError:
            self.usable = False
            return False
        os.close(fd)
        self.runs = 0
        return True

    def keeps(self, silent: bool) -> bool:
        """After a run attached to the spool has ended (its log closed): whether its link
        must stay as its log. Then the spool is retired: no later run writes after it."""
        if silent and self._alone():
            return False
        self.retire()
        return True

    def _alone(self) -> bool:
        """Whether no process has the spool open for writing (the job's own processes,
        say a daemon it left behind): a read lease is granted only then."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            fcntl.fcntl(fd, _F_SETLEASE, _F_RDLCK)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                self.usable = False  # leases unsupported: every run gets a file of its own
            return False
        else:
            fcntl.fcntl(fd, _F_SETLEASE, _F_UNLCK)
            return True
        finally:
            os.close(fd)

    def retire(self) -> None:
        """Start afresh at the next run; the runs linked to the old spool keep it."""
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.runs = 0


class Spools:
    """A worker's spools, one per run going on at once (taken at a run's start)."""

    def __init__(self, directory: "os.PathLike[str] | str", worker_id: str) -> None:
        self.directory = str(directory)
        self.worker_id = worker_id
        self.all: List[Spool] = []
        self.free: List[Spool] = []
        private_dir(self.directory)

    def take(self) -> Spool:
        if self.free:
            return self.free.pop()
        name = f"{self.worker_id}.{len(self.all)}".replace(os.sep, "_")  # ($QUEUECTL_HOST)
        spool = Spool(os.path.join(self.directory, name))
        spool.retire()  # a name left by an earlier process with our pid: not ours to append to
        self.all.append(spool)
        return spool

    def give(self, spool: Spool) -> None:
        self.free.append(spool)

    def retire_all(self) -> None:
        """When other processes may write to logs linked to our spools (a job recovered
        elsewhere and run again, results left for recovery to read)."""
        for spool in self.all:
            spool.retire()

    def close(self) -> None:
        self.retire_all()


def _make_private(log_path: str, job_id: str) -> None:
    """An earlier attempt's log still linked to a spool (its result was not recorded, and
    that worker went on appending other runs): replaced by a file of the job's part only,
    so this attempt's section follows it, not other jobs' sections."""
    try:
        if os.stat(log_path).st_nlink <= 1:
            return  # the usual case: a log of its own
        with open(log_path, "rb") as handle:
            data = handle.read()
        start, end = joblog.own_span(data, job_id)
        temporary = f"{log_path}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, data[start:end])
        finally:
            os.close(fd)
        os.replace(temporary, log_path)
    except OSError:
        pass  # then this attempt appends to the shared log: readers still find its part


def prune(log_path: str) -> None:
    """Remove a silent run's link once its result is recorded."""
    try:
        os.unlink(log_path)
    except OSError:
        pass


def sweep(directory: "os.PathLike[str] | str", alive: Callable[[str], bool]) -> int:
    """Remove the spool names of dead workers (``alive(worker_id)`` False); their runs'
    kept links stay. Returns how many went."""
    gone = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        worker_id = name.rsplit(".", 1)[0]
        if not alive(worker_id):
            try:
                os.unlink(os.path.join(directory, name))
                gone += 1
            except OSError:
                pass
    return gone

