"""Where queuectl keeps its files: one home directory, overridable for tests and demos."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "QUEUECTL_HOME"


class Paths:
    """Every file location derives from one home so ``QUEUECTL_HOME`` moves all of them."""

    def __init__(self, home: "str | os.PathLike[str] | None" = None) -> None:
        if home is None:
            home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".queuectl")
        self.home = Path(home).absolute()

    @property
    def db(self) -> Path:
        return self.home / "queue.db"

    @property
    def workers_dir(self) -> Path:
        return self.home / "workers"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def job_logs_dir(self) -> Path:
        return self.home / "logs" / "jobs"

    def job_log(self, job_id: str) -> Path:
        # Job ids are validated (no '/', no '..'), so they are safe file names.
        return self.job_logs_dir / f"{job_id}.log"

    def worker_log(self, pid: int) -> Path:
        return self.logs_dir / f"worker-{pid}.log"
