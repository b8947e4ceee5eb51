"""How fast can ONE process keep two `sh -c true` jobs running, given W µs of its own Python
work per job? The ceiling of W1c2 (one worker, two slots) against L0, without the queue.

Each job is started with queuectl's own executor.spawn (as workers and L0 start them) and
watched through its pidfd; between jobs the loop burns W µs of CPU in Python, standing in
for a worker's per-job work (claim, record, log header and result line, spool link). The
L0 of the same run (bench.py's: two spawner processes) is measured before and after, and
each ratio is to their mean. Usage: python benchmarks/one_process_ceiling.py [JOBS] [W ...]
"""
from __future__ import annotations

import os
import select
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from bench import bench_l0  # this directory is on sys.path when the script runs
from queuectl.executor import spawn


def l0(directory: str, jobs: int) -> float:
    """bench.py's L0: two spawner processes, each starting jobs/2 `sh -c true` in turn."""
    return bench_l0(Path(directory), jobs // 2)["L0_spawns_per_s"]


def _burn(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def one_process(directory: str, jobs: int, work_us: float, slots: int = 2) -> float:
    """One loop, ``slots`` jobs at a time: work before each start and after each end."""
    fd = os.open(os.path.join(directory, "one.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    poller = select.poll()
    running = {}
    started = ended = 0
    t0 = time.time()
    while ended < jobs:
        while len(running) < slots and started < jobs:
            _burn(work_us / 2)
            proc = spawn("true", False, None, fd)
            pidfd = os.pidfd_open(proc.pid)
            running[pidfd] = proc
            poller.register(pidfd, select.POLLIN)
            started += 1
        for pidfd, _ in poller.poll():
            proc = running.pop(pidfd)
            poller.unregister(pidfd)
            os.close(pidfd)
            proc.wait()
            _burn(work_us / 2)
            ended += 1
    os.close(fd)
    return jobs / (time.time() - t0)


def main(argv: List[str]) -> int:
    jobs = int(argv[0]) if argv else 4000
    works = [float(w) for w in argv[1:]] or [0.0, 50.0, 100.0, 150.0, 200.0]
    with tempfile.TemporaryDirectory(prefix="queuectl-ceiling-") as directory:
        before = l0(directory, jobs)
        rates = [(w, one_process(directory, jobs, w)) for w in works]
        ceiling = (before + l0(directory, jobs)) / 2
    print(f"L0 (2 spawner processes): {ceiling:,.0f}/s (mean of before and after)")
    for work, rate in rates:
        print(f"one process, 2 slots, {work:4.0f} us of work per job: {rate:,.0f}/s = {rate / ceiling:.2f} x L0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
