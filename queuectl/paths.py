"""Where queuectl keeps its files: one home directory, overridable for tests and demos."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "QUEUECTL_HOME"
# Job output and environments often hold secrets: whatever the umask, what queuectl creates
# is private to its user (directories 0700, files 0600).
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: "str | os.PathLike[str]") -> None:
    """mkdir -p, each directory created here 0700 whatever the umask (existing ones untouched)."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.parent.exists():
        private_dir(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def private_file(path: "str | os.PathLike[str]", flags: int = os.O_WRONLY) -> int:
    """Open (creating it 0600 whatever the umask) and return the fd."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE and os.fstat(fd).st_size == 0:
            os.fchmod(fd, FILE_MODE)  # a umask like 0o277 took bits we want
    except OSError:
        pass
    return fd


class Paths:
    """Every file location derives from one home so ``QUEUECTL_HOME`` moves all of them."""

    def __init__(self, home: "str | os.PathLike[str] | None" = None) -> None:
        if home is None:
            home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".queuectl")
        self.home = Path(home).absolute()
        # Plain attributes, not properties: workers look these up for every job.
        self.db = self.home / "queue.db"
        self.workers_dir = self.home / "workers"
        self.logs_dir = self.home / "logs"
        self.job_logs_dir = self.logs_dir / "jobs"
        self._job_logs_prefix = f"{self.job_logs_dir}{os.sep}"
        self.spool_dir = self.logs_dir / "spool"  # queuectl/spool.py: beside jobs/, same filesystem

    def job_log(self, job_id: str) -> Path:
        return Path(self.job_log_name(job_id))

    def job_log_name(self, job_id: str) -> str:
        """job_log as a plain string, for the worker's per-job path (no Path to build)."""
        # Job ids are validated (no '/', no '..'), so they are safe file names.
        return f"{self._job_logs_prefix}{job_id}.log"

    def worker_log(self, pid: int) -> Path:
        return self.logs_dir / f"worker-{pid}.log"
