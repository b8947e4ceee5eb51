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
        # Plain attributes, not properties: workers look these up for every job.
        self.db = self.home / "queue.db"
        self.workers_dir = self.home / "workers"
        self.logs_dir = self.home / "logs"
        self.job_logs_dir = self.logs_dir / "jobs"
        self._job_logs_prefix = f"{self.job_logs_dir}{os.sep}"

    def job_log(self, job_id: str) -> Path:
        return Path(self.job_log_name(job_id))

    def job_log_name(self, job_id: str) -> str:
        """job_log as a plain string, for the worker's per-job path (no Path to build)."""
        # Job ids are validated (no '/', no '..'), so they are safe file names.
        return f"{self._job_logs_prefix}{job_id}.log"

    def worker_log(self, pid: int) -> Path:
        return self.logs_dir / f"worker-{pid}.log"
