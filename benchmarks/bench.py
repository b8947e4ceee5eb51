#!/usr/bin/env python3
"""queuectl benchmark: how close the queue gets to the machine's own process-spawn ceiling.

    python benchmarks/bench.py [--quick] [--json] [--keep]

Everything runs in ONE fresh temporary QUEUECTL_HOME (several, in fact: one per scenario) and
every figure is compared with its target. Times on a shared 2-core machine are noisy, so the
targets are ratios measured within the same run (W1/L0, CLI/`import click`, W4/W1).

Scenarios (see issue 4):
  L0  ceiling: `sh -c true` spawned by 2 concurrent Python processes with
      queuectl.executor.spawn (exactly what workers call), output to a file, like a worker.
  W1  drain: N `true` jobs bulk-enqueued in one transaction, 2 running idle workers drain them
      (best of 3 drains in the full run; W4 likewise, W3's bulk enqueue best of 3).
      Rate = N / (last finished_at - first started_at) from the jobs' own timestamps
      (worker start-up is excluded; end-to-end from enqueue commit is shown too).
  W2  pickup latency: one `true` job at a time into idle workers; enqueue commit -> finished_at.
      Idle worker CPU from /proc/<pid>/stat over a few idle seconds.
  W3  bulk enqueue: `queuectl enqueue --file` with 100k lines, end to end (process start to
      exit, so it includes Python start-up, JSON parsing and the fsync'd commit); one
      `queuectl enqueue` call vs `python -c "import click"` and `python -c pass`.
  W4  scale: W1 again with 20k and 100k completed jobs (and their run records) in the table.
  M1  memory: RSS of an idle worker, and after it ran its share of W1..W4.
  M2  memory: peak RSS of one `queuectl enqueue --file` of 1M lines (100k with --quick).
  Capacity (issue 12), each in fresh homes with a warmed log directory:
  W1c2 W1 on ONE worker with --concurrency 2, against L0.
  W1x8 W1 with 8 workers against W1 with 2 (more workers than cores must not cost throughput).
  W5  200 `sleep 1` jobs on one worker with --concurrency 200: seconds from the enqueue's
      commit to the last finished_at, and the worker's peak RSS while they run.
  G1  W1 of the default group (2 workers) while a group with --parallel 1 is full and has
      1000 jobs waiting (its running job is on a third worker, serving only that group),
      against W1 in the same home without it.
  R1  W1 during retention (issue 14): W1's drain while the workers' retention chore deletes
      a backlog of old completed jobs and their log files the whole time; against L0f of the
      same run (deleting files slows ext4's next creations; L0f pays per-file creation too).
  F1  first drain of a fresh install: N `true` jobs into a new home with 2 idle workers,
      timed from the start of `queuectl enqueue --file` (as a user sees it) to the last
      finished_at; against L0. R1 and F1 are each bracketed by two runs of their reference
      (L0f, L0) and the median ratio of 3 (--service: 5) is reported, with every run's.

    python benchmarks/bench.py --service   # only L0, L0f, W1, R1 and F1 (a few minutes)

Every process the bench starts is ended (workers by PID, spawners by PID), also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from queuectl import executor, worker_launcher  # noqa: E402
from queuectl.jobspec import parse_job  # noqa: E402
from queuectl.models import Queue  # noqa: E402
from queuectl.paths import Paths  # noqa: E402
from queuectl.store import Store, is_postgres, open_store  # noqa: E402
from queuectl import wakeup  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SPAWNER = r"""
import os, sys, time
from queuectl.executor import spawn
n, out, go, per_job = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
fd = os.open(out, flags, 0o644)
while time.time() < go:
    time.sleep(0.0005)
t0 = time.time()
for i in range(n):
    if per_job:  # a new file per spawn, as workers create one log file per job
        fd = os.open(f"{out}.{i}", flags, 0o644)
    spawn("true", False, None, fd).wait()
    if per_job:
        os.close(fd)
print(t0, time.time())
"""

# -- process bookkeeping: everything we start is ended by PID -------------------------------
_children: List[subprocess.Popen] = []
_worker_pids: List[int] = []
_homes: List[Paths] = []


def _cleanup() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut it short
        signal.signal(sig, signal.SIG_IGN)
    for proc in _children:
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
    for paths in _homes:
        try:
            worker_launcher.stop_workers(paths, wait=5.0)
        except Exception:
            pass
    for pid in _worker_pids:
        try:
            os.kill(pid, signal.SIGKILL)  # only our own workers, by PID, if still there
        except (ProcessLookupError, PermissionError):
            pass
    _worker_pids.clear()
    _homes.clear()
    _drop_pg_schemas()


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- small measuring tools --------------------------------------------------------------------
def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 1e6


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


_pg_base: List[str] = []  # --db postgresql://...: each home gets a schema of its own
_pg_schemas: List[str] = []


def new_home(base: Path, name: str) -> Paths:
    """A fresh home; with --db postgresql://... also a fresh schema, named in QUEUECTL_DB
    (os.environ, which workers and CLI calls inherit), dropped at the end."""
    paths = Paths(base / name)
    paths.home.mkdir(parents=True)
    if _pg_base:
        schema = f"bench_{os.getpid()}_{name.replace('-', '_')}"
        _pg_schemas.append(schema)
        base_url = _pg_base[0]
        os.environ["QUEUECTL_DB"] = f"{base_url}{'&' if '?' in base_url else '?'}schema={schema}"
    return paths


def _drop_pg_schemas() -> None:
    if not _pg_schemas:
        return
    from queuectl.pg_store import drop_schema  # only with --db, which needs the extra anyway

    for schema in _pg_schemas:
        drop_schema(_pg_base[0], schema)
    _pg_schemas.clear()


def start_workers(paths: Paths, count: int = 2, options: List[str] = ()) -> List[int]:
    _homes.append(paths)
    pids = worker_launcher.start_detached(paths, count, list(options))
    _worker_pids.extend(pids)
    deadline = time.monotonic() + 20
    # Ready once listening: its doorbell FIFO exists (SQLite) or it logged "started" (it does
    # so after LISTEN; PostgreSQL workers have no FIFO).
    def ready(pid: int) -> bool:
        if not _pg_base:
            return wakeup.fifo_path(paths.workers_dir, pid).exists()
        log = paths.logs_dir / f"worker-{pid}.log"
        return log.exists() and f"started (pid {pid}" in log.read_text(errors="replace")

    while not all(ready(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start; see " + str(paths.logs_dir))
        time.sleep(0.02)
    time.sleep(0.3)  # let them finish start-up work (recovery pass) and go idle
    return pids


def stop_workers(paths: Paths, pids: List[int]) -> None:
    worker_launcher.stop_workers(paths, wait=10.0)
    for pid in pids:
        if pid in _worker_pids:
            _worker_pids.remove(pid)


def queuectl_argv() -> List[str]:
    script = Path(sys.executable).with_name("queuectl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "queuectl.cli"]


# -- scenarios ------------------------------------------------------------------------------------
def bench_l0(base: Path, per_spawner: int, per_job_file: bool = False,
             out: Optional[Path] = None) -> Dict[str, Any]:
    go = time.time() + 0.5
    procs = []
    out = out or base / ("l0f" if per_job_file else "l0")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SPAWNER, str(per_spawner), str(out / f"l0-{i}.log"),
                                 repr(go), "1" if per_job_file else "0"],
                                stdout=subprocess.PIPE, text=True, cwd=str(base))
        _children.append(proc)
        procs.append(proc)
    spans = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError("L0 spawner failed")
        spans.append([float(x) for x in out.split()])
    elapsed = max(s[1] for s in spans) - min(s[0] for s in spans)
    return {"L0_spawns_per_s": 2 * per_spawner / elapsed}


def _specs(n: int, command: str = "true") -> List[Dict[str, Any]]:
    now = time.time()
    cwd = os.getcwd()
    return [parse_job({"command": command}, now=now, default_cwd=cwd) for _ in range(n)]


def best_drain(paths: Paths, store: Store, n: int, repeat: int) -> Dict[str, float]:
    """The best of ``repeat`` drains: background bursts on a shared machine only slow runs down."""
    return max((drain(paths, store, n) for _ in range(repeat)), key=lambda r: r["rate"])


def drain(paths: Paths, store: Store, n: int) -> Dict[str, float]:
    """Enqueue n jobs in one transaction into running idle workers; wait until all completed."""
    marks: Dict[str, float] = {}
    results = Queue(store).enqueue(_specs(n))
    marks["commit"] = time.time()  # committed and rung: the workers' doorbells are written
    first, last = int(results[0].id), int(results[-1].id)
    deadline = time.monotonic() + max(120, n / 50)
    # Cheap completion probe (read-only, by primary key): the tail of the batch, then the rest.
    while True:
        left = store.span(max(first, last - 3), last)["left"]
        if left == 0:
            left = store.span(first, last)["left"]
            if left == 0:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"drain of {n} jobs did not finish ({left} left)")
        time.sleep(0.05)
    span = store.span(first, last)
    lo, hi = span["started_at"], span["finished_at"]
    return {"rate": n / (hi - lo), "e2e_rate": n / (hi - marks["commit"]), "seconds": hi - lo}


def add_completed(store: Store, total: int) -> int:
    """Top the table up to ``total`` completed jobs (with a run record each), fast, via the store."""
    have = store.counts().get("completed", 0)
    need = max(0, total - have)
    now = time.time()
    cwd = os.getcwd()
    with store.transaction():
        ids = store.insert_jobs([(None, "true", 0, 0, None, None, cwd, now, now, None, 0, None)] * need)
        # Store-level, one row at a time (any backend); uncommitted, so idle workers never
        # see these rows pending.
        done = {"state": "completed", "attempts": 1, "finished_at": now}
        for job_id in ids:
            store.update_job(job_id, done)
            store.add_run(job_id, 1, "bench:0:0", now, now, 0, None)
    # These rows went pending -> completed in one go, so the claim index holds 10^5 dead
    # entries at once, which a table that grew to this size job by job never has (the
    # database vacuums it along the way): let the housekeeping catch up before measuring.
    store.tidy()
    return need


def warm_directory(directory: Path, count: int) -> None:
    """Create ``count`` files, as a long-lived home has. Not deleted: ext4's inode allocator
    (find_inode_bit -> recently_deleted, seen with perf) scans past recently freed inodes,
    which made creates cost up to 1.4 ms of system CPU each on this shared machine."""
    for i in range(count):
        os.close(os.open(directory / f"warm-{i}", os.O_WRONLY | os.O_CREAT, 0o644))


def add_old_completed(paths: Paths, store: Store, count: int, age: float = 2 * 86400) -> None:
    """``count`` completed jobs that finished ``age`` ago, each with a small log file: what
    retention has to delete in a home that ran for a while."""
    now = time.time()
    cwd = os.getcwd()
    with store.transaction():
        ids = store.insert_jobs([(None, "true", 0, 0, None, None, cwd, now - age, now - age, None, 0,
                                  None)] * count)
        done = {"state": "completed", "attempts": 1, "started_at": now - age, "finished_at": now - age}
        for job_id in ids:
            store.update_job(job_id, done)
    for job_id in ids:
        fd = os.open(paths.job_log_name(job_id), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"=== old output ===\n")
        os.close(fd)


def bench_retention(paths: Paths, store: Store, n: int, repeat: int, backlog: int,
                    spawns: int) -> Dict[str, Any]:
    """W1 again while retention purges, each time bracketed by two L0f runs (the machine's
    load drifts; the ratio is to their mean) and next to a W1 drain without retention: a
    backlog of old completed jobs (and logs) is topped up, keep_completed set so only it is
    due, and the drain starts once the workers are purging; the backlog outlasts the drain
    (purged_during > 0 with some left)."""
    queue = Queue(store)
    runs = []
    leftover = 0
    for _ in range(repeat):
        l0f_a = bench_l0(paths.home.parent, spawns, per_job_file=True,
                         out=paths.job_logs_dir)["L0_spawns_per_s"]
        plain = drain(paths, store, n)["rate"]
        add_old_completed(paths, store, backlog)
        before = store.counts().get("completed", 0)
        queue.config_set("keep_completed", "1d")
        deadline = time.monotonic() + 30
        while store.counts().get("completed", 0) >= before:  # the chores noticed
            if time.monotonic() > deadline:
                raise RuntimeError("retention did not start purging")
            time.sleep(0.05)
        start = store.counts().get("completed", 0)
        rate = drain(paths, store, n)["rate"]
        end = store.counts().get("completed", 0) - n
        queue.config_set("keep_completed", "none")  # the rest of the bench keeps its rows
        due = leftover + backlog                  # old jobs due when keep_completed was set
        leftover = due - (before - end)           # still due when the drain ended
        l0f_b = bench_l0(paths.home.parent, spawns, per_job_file=True,
                         out=paths.job_logs_dir)["L0_spawns_per_s"]
        runs.append({"rate": rate, "purged": start - end, "left": leftover,
                     "vs_l0f": rate / ((l0f_a + l0f_b) / 2), "vs_w1": rate / plain})
    runs.sort(key=lambda r: r["vs_l0f"])
    mid = runs[len(runs) // 2]
    return {"R1_jobs_per_s": mid["rate"], "R1_purged_during_drain": mid["purged"],
            "R1_backlog_left": mid["left"],
            "R1_vs_L0f": mid["vs_l0f"], "R1_vs_W1": statistics.median(r["vs_w1"] for r in runs),
            "R1_vs_L0f_runs": [round(r["vs_l0f"], 3) for r in runs],
            "R1_vs_W1_runs": sorted(round(r["vs_w1"], 3) for r in runs)}


def bench_fresh(base: Path, n: int, repeat: int, spawns: int) -> Dict[str, Any]:
    """A user's first drain: new home, 2 workers started, `enqueue --file` of n jobs, timed
    from the command's start to the last job's finished_at; each bracketed by two L0 runs
    (the ratio is to their mean). The median ratio is reported, with every run's."""
    jobs_file = base / "fresh.jsonl"
    jobs_file.write_text('{"command": "true"}\n' * n)
    qctl = queuectl_argv()
    runs = []
    for i in range(repeat):
        paths = new_home(base, f"fresh-{i}")
        env = dict(os.environ, QUEUECTL_HOME=str(paths.home))
        pids = start_workers(paths)
        store = open_store(paths, "reader")
        try:
            l0_a = bench_l0(base, spawns)["L0_spawns_per_s"]
            t0 = time.time()
            subprocess.run([*qctl, "enqueue", "--file", str(jobs_file)], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + max(120, n / 50)
            while store.span(1, n)["left"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("fresh drain did not finish")
                time.sleep(0.05)
            span = store.span(1, n)
            rate = n / (span["finished_at"] - t0)
            l0_b = bench_l0(base, spawns)["L0_spawns_per_s"]
            # Where the time went: the enqueue command, then the drain itself.
            runs.append((rate / ((l0_a + l0_b) / 2), rate, span["started_at"] - t0,
                         n / (span["finished_at"] - span["started_at"]) / ((l0_a + l0_b) / 2)))
        finally:
            store.close()
            stop_workers(paths, pids)
    runs.sort()
    ratio, rate, to_first, drain_ratio = runs[len(runs) // 2]
    return {"F1_jobs_per_s": rate, "F1_vs_L0": ratio, "F1_vs_L0_runs": [round(r[0], 3) for r in runs],
            "F1_to_first_start_s": to_first, "F1_drain_only_vs_L0": drain_ratio}


def bench_w2(paths: Paths, store: Store, samples: int, pause: float) -> Dict[str, Any]:
    lat = []
    for _ in range(samples):
        marks: Dict[str, float] = {}
        job_id = Queue(store).enqueue(_specs(1))[0].id
        marks["commit"] = time.time()
        deadline = time.monotonic() + 10
        while True:
            job = store.get(job_id)
            if job and job["finished_at"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} not picked up in 10 s")
            time.sleep(0.002)
        lat.append((job["finished_at"] - marks["commit"]) * 1000)
        time.sleep(pause)
    return {"W2_p50_ms": statistics.median(lat), "W2_p95_ms": pct(lat, 0.95), "W2_max_ms": max(lat)}


def idle_cpu(pids: List[int], seconds: float) -> float:
    before = {pid: cpu_ticks(pid) for pid in pids}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return max((cpu_ticks(pid) - before[pid]) / CLK_TCK / dt * 100 for pid in pids)


def timed_run(argv: List[str], env: Dict[str, str]) -> float:
    t0 = time.perf_counter()
    # stderr captured: with no worker running, every enqueue notes so on stderr
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - t0


def bench_w3(base: Path, bulk: int, calls: int, repeat: int = 1) -> Dict[str, Any]:
    paths = new_home(base, "w3")
    env = dict(os.environ, QUEUECTL_HOME=str(paths.home))
    qctl = queuectl_argv()
    subprocess.run([*qctl, "init-db"], env=env, stdout=subprocess.DEVNULL, check=True)
    jobs_file = base / "bulk.jsonl"
    jobs_file.write_text('{"command": "true"}\n' * bulk)
    bulk_runs = []
    for i in range(repeat):  # each into a fresh home; background bursts only ever slow a run down
        home = new_home(base, f"w3-bulk-{i}")
        bulk_env = dict(os.environ, QUEUECTL_HOME=str(home.home))
        subprocess.run([*qctl, "init-db"], env=bulk_env, stdout=subprocess.DEVNULL, check=True)
        bulk_runs.append(timed_run([*qctl, "enqueue", "--file", str(jobs_file)], bulk_env))
    bulk_s = min(bulk_runs)
    one_job = json.dumps({"command": "true"})
    runs: Dict[str, List[float]] = {"pass": [], "click": [], "enqueue": []}
    argvs = {"pass": [sys.executable, "-c", "pass"], "click": [sys.executable, "-c", "import click"],
             "enqueue": [*qctl, "enqueue", one_job]}
    for name, argv in argvs.items():  # warm the page cache
        timed_run(argv, env)
    for _ in range(calls):  # interleaved, so background noise hits all three alike
        for name, argv in argvs.items():
            runs[name].append(timed_run(argv, env))
    med = {name: statistics.median(v) * 1000 for name, v in runs.items()}
    # Inside the command, approximately: minus the fixed cost of a one-job enqueue (start-up,
    # imports, opening the DB, one fsync'd commit).
    inside_s = bulk_s - med["enqueue"] / 1000
    return {"W3_bulk_jobs_per_s": bulk / bulk_s, "W3_bulk_seconds": bulk_s,
            "W3_bulk_in_command_jobs_per_s": bulk / inside_s if inside_s > 0 else None,
            "W3_enqueue_ms": med["enqueue"], "W3_import_click_ms": med["click"],
            "W3_python_pass_ms": med["pass"], "W3_enqueue_vs_click": med["enqueue"] / med["click"]}


def bench_m2(base: Path, lines: int) -> Dict[str, Any]:
    """Peak RSS (ru_maxrss) of one `queuectl enqueue --file` of ``lines`` lines: it streams,
    so this must stay flat (< 100 MB) however large the file. Measured from a fresh parent,
    whose RUSAGE_CHILDREN maximum is then that one child's."""
    home = new_home(base, "m2")
    jobs_file = base / "m2.jsonl"
    with open(jobs_file, "w") as handle:
        for _ in range(lines // 100_000):
            handle.write('{"command": "true"}\n' * 100_000)
        handle.write('{"command": "true"}\n' * (lines % 100_000))
    code = ("import os, resource, subprocess, sys\n"
            f"subprocess.run({[*queuectl_argv(), 'enqueue', '--file', str(jobs_file)]!r}, check=True,"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,"
            f" env=dict(os.environ, QUEUECTL_HOME={str(home.home)!r}))\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    jobs_file.unlink()
    shutil.rmtree(home.home, ignore_errors=True)
    return {"M2_bulk_peak_rss_mb": int(out) / 1024, "M2_bulk_lines": lines}


def _capacity_home(base: Path, name: str, warm: int) -> "tuple[Paths, Store]":
    paths = new_home(base, name)
    os.environ["QUEUECTL_HOME"] = str(paths.home)
    store = open_store(paths, "cli")
    paths.job_logs_dir.mkdir(parents=True, exist_ok=True)
    warm_directory(paths.job_logs_dir, warm)
    return paths, store


def bench_capacity(base: Path, size: Dict[str, Any]) -> Dict[str, Any]:
    res: Dict[str, Any] = {}
    n, repeat = size["drain"], size["repeat"]
    # W1 with 2 and with 8 workers, and on one worker of 2 slots, each in a home of its own.
    for key, count, options in (("W1x2", 2, []), ("W1x8", 8, []), ("W1c2", 1, ["--concurrency", "2"])):
        paths, store = _capacity_home(base, key.lower(), size["warm"])
        pids = start_workers(paths, count, options)
        drain(paths, store, min(n, 1000))  # warm-up
        if key == "W1c2":  # its own ceiling, bracketing it: the machine drifts over a run
            l0_before = bench_l0(base, size["spawns"])["L0_spawns_per_s"]
        res[f"{key}_jobs_per_s"] = best_drain(paths, store, n, repeat)["rate"]
        if key == "W1c2":
            res["W1c2_L0_spawns_per_s"] = (l0_before + bench_l0(base, size["spawns"])["L0_spawns_per_s"]) / 2
        stop_workers(paths, pids)
        store.close()
    res["W1x8_vs_W1x2"] = res["W1x8_jobs_per_s"] / res["W1x2_jobs_per_s"]

    # W5: 200 one-second sleeps on one worker of 200 slots.
    paths, store = _capacity_home(base, "w5", 0)
    pids = start_workers(paths, 1, ["--concurrency", "200"])
    results = Queue(store).enqueue(_specs(200, "sleep 1"))
    commit = time.time()
    first, last = int(results[0].id), int(results[-1].id)
    peak = 0.0
    deadline = time.monotonic() + 60
    while store.span(first, last)["left"]:
        peak = max(peak, rss_mb(pids[0]))
        if time.monotonic() > deadline:
            raise RuntimeError("W5 did not drain in 60 s")
        time.sleep(0.02)
    res["W5_drain_s"] = store.span(first, last)["finished_at"] - commit
    res["W5_worker_rss_mb"] = peak
    stop_workers(paths, pids)
    store.close()

    # G1: the default group's W1 next to a full group of 1000 waiting jobs.
    paths, store = _capacity_home(base, "g1", size["warm"])
    queue = Queue(store)
    queue.set_group_limit("full", 1)
    holder = start_workers(paths, 1, ["--groups", "full"])
    pids = start_workers(paths, 2)
    drain(paths, store, min(n, 1000))  # warm-up
    res["G1_base_jobs_per_s"] = best_drain(paths, store, n, repeat)["rate"]
    # The full group's running job must be the holder's: the two workers serve every group
    # and one of them would otherwise take it and sleep, halving the drain. They stop while
    # it is claimed, and two new ones (serving every group, seeing the full one in every
    # claim) start after.
    for pid in pids:  # not stop_workers: that would stop the holder too
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(executor.pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError("G1: the two workers did not stop")
        time.sleep(0.02)
    for pid in pids:
        _worker_pids.remove(pid)
    now, cwd = time.time(), os.getcwd()
    queue.enqueue([parse_job({"command": "sleep 600", "group": "full"}, now=now, default_cwd=cwd)
                   for _ in range(1001)])
    deadline = time.monotonic() + 20
    while next(g for g in queue.groups() if g["name"] == "full")["running"] != 1:
        if time.monotonic() > deadline:
            raise RuntimeError("G1: the full group's job did not start")
        time.sleep(0.02)
    pids = start_workers(paths, 2)
    drain(paths, store, min(n, 1000))  # warm-up, as for the base
    res["G1_full_jobs_per_s"] = best_drain(paths, store, n, repeat)["rate"]
    res["G1_full_vs_base"] = res["G1_full_jobs_per_s"] / res["G1_base_jobs_per_s"]
    queue.pause_group("full")
    worker_launcher.stop_workers(paths, wait=10.0, force=True)
    for pid in pids + holder:
        if pid in _worker_pids:
            _worker_pids.remove(pid)
    store.close()
    return res


# -- the run ----------------------------------------------------------------------------------------
def run(quick: bool, keep: bool, service: bool = False) -> Dict[str, Any]:
    size = dict(spawns=300, drain=1000, warm=2_000, repeat=1, samples=30, pause=0.02, idle=1.5, bulk=20_000, calls=5,
                scale=(4_000, 20_000), backlog=4_000, frepeat=1) if quick else \
        dict(spawns=2_000, drain=5_000, warm=10_000, repeat=3, samples=100, pause=0.05, idle=4.0, bulk=100_000, calls=20,
             scale=(20_000, 100_000), backlog=20_000, frepeat=5 if service else 3)
    base = Path(tempfile.mkdtemp(prefix="queuectl-bench-"))
    res: Dict[str, Any] = {"quick": quick, "sizes": size}
    # Child processes (workers, CLI calls, spawners) cache their bytecode, as an installed
    # package would, but in our temporary directory rather than in the checkout.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
    try:
        res.update(bench_l0(base, size["spawns"]))
        # F1 first: a fresh home on a file system the rest of the bench has not churned yet.
        res.update(bench_fresh(base, size["drain"], size["frepeat"], size["spawns"]))

        paths = new_home(base, "main")
        os.environ["QUEUECTL_HOME"] = str(paths.home)
        store = open_store(paths, "cli")  # the enqueue side is a CLI-like, durable connection
        pids = start_workers(paths)
        res["M1_idle_rss_mb"] = max(rss_mb(pid) for pid in pids)
        if not service:
            res["W2_idle_cpu_pct"] = idle_cpu(pids, size["idle"])
            res.update(bench_w2(paths, store, size["samples"], size["pause"]))

        # A fresh directory is cold on ext4 here: the first few thousand files created in it
        # cost up to 0.7-1.4 ms of system CPU each, then ~25 us (perf: the inode allocator
        # skipping inodes other processes deleted recently). A real queue home is long-lived,
        # so the first drain warms it up and is reported apart; W1 is the second drain.
        res["W1_cold_jobs_per_s"] = drain(paths, store, size["drain"])["rate"]
        warm_directory(paths.job_logs_dir, size["warm"])
        w1 = best_drain(paths, store, size["drain"], size["repeat"])
        res["W1_jobs_per_s"] = w1["rate"]
        res["W1_e2e_jobs_per_s"] = w1["e2e_rate"]
        # The ceiling again, right after W1: background load drifts, so W1 is compared with
        # the mean of the two L0 runs that bracket it.
        l0_first = res["L0_spawns_per_s"]
        l0_again = bench_l0(base, size["spawns"])["L0_spawns_per_s"]
        res["L0_runs"] = [l0_first, l0_again]
        res["L0_spawns_per_s"] = (l0_first + l0_again) / 2
        res["W1_vs_L0"] = w1["rate"] / res["L0_spawns_per_s"]
        # Not a target: the same ceiling with a new file per spawn shows what the per-job log
        # file (a directory entry + inode, journalled by the file system) costs on this disk.
        res["L0f_spawns_per_s"] = bench_l0(base, size["spawns"], per_job_file=True,
                                           out=paths.job_logs_dir)["L0_spawns_per_s"]
        res["W1_vs_L0f"] = w1["rate"] / res["L0f_spawns_per_s"]
        if not service:
            time.sleep(0.3)
            res["M1_rss_after_mb"] = max(rss_mb(pid) for pid in pids)
            res["M1_growth_mb"] = res["M1_rss_after_mb"] - res["M1_idle_rss_mb"]
            # W4 before R1: retention's deleting thousands of log files slows ext4's next
            # file creations for a while (R1 measures that on purpose; W4 must not).
            for label, total in zip(("20k", "100k"), size["scale"]):
                add_completed(store, total)
                w4 = best_drain(paths, store, size["drain"], size["repeat"])
                res[f"W4_{label}_jobs_per_s"] = w4["rate"]
                res[f"W4_{label}_vs_W1"] = w4["rate"] / w1["rate"]
        res.update(bench_retention(paths, store, size["drain"], size["frepeat"], size["backlog"],
                                   size["spawns"]))
        if service:
            stop_workers(paths, pids)
            store.close()
            return res
        res["M1_rss_end_mb"] = max(rss_mb(pid) for pid in pids)
        stop_workers(paths, pids)
        store.close()

        res.update(bench_capacity(base, size))
        res["W1c2_vs_L0"] = res["W1c2_jobs_per_s"] / res["W1c2_L0_spawns_per_s"]

        res.update(bench_w3(base, size["bulk"], size["calls"], size["repeat"]))
        res.update(bench_m2(base, 100_000 if quick else 1_000_000))
    finally:
        _cleanup()
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return res


TARGETS = [  # (label, key, format, target text, check)
    ("L0 ceiling: sh -c true, 2 spawners", "L0_spawns_per_s", "{:,.0f}/s", "(mean of 2 runs)", None),
    ("L0f ceiling, new file per spawn", "L0f_spawns_per_s", "{:,.0f}/s", "(information)", None),
    ("W1 drain, 2 workers", "W1_jobs_per_s", "{:,.0f}/s", "", None),
    ("W1 end-to-end from enqueue commit", "W1_e2e_jobs_per_s", "{:,.0f}/s", "", None),
    ("W1 first drain, cold log directory", "W1_cold_jobs_per_s", "{:,.0f}/s", "(information)", None),
    ("W1 / L0", "W1_vs_L0", "{:.2f}", ">= 0.80", lambda v: v >= 0.80),
    ("W1 / L0f", "W1_vs_L0f", "{:.2f}", "(information)", None),
    ("R1 W1 during retention", "R1_jobs_per_s", "{:,.0f}/s", "", None),
    ("R1 / L0f", "R1_vs_L0f", "{:.2f}", ">= 0.80", lambda v: v >= 0.80),
    ("R1 / W1 (retention's cost)", "R1_vs_W1", "{:.2f}", ">= 0.95", lambda v: v >= 0.95),
    ("F1 first drain, fresh home, from enqueue", "F1_jobs_per_s", "{:,.0f}/s", "", None),
    ("F1 / L0", "F1_vs_L0", "{:.2f}", ">= 0.85", lambda v: v >= 0.85),
    ("F1 enqueue start to first job start", "F1_to_first_start_s", "{:.2f} s", "(information)", None),
    ("F1 drain alone / L0", "F1_drain_only_vs_L0", "{:.2f}", "(information)", None),
    ("W2 pickup latency p50", "W2_p50_ms", "{:.1f} ms", "<= 10 ms", lambda v: v <= 10),
    ("W2 pickup latency p95", "W2_p95_ms", "{:.1f} ms", "<= 30 ms", lambda v: v <= 30),
    ("W2 idle worker CPU (max of 2)", "W2_idle_cpu_pct", "{:.2f} %", "< 1 %", lambda v: v < 1),
    ("W3 bulk enqueue --file, end to end", "W3_bulk_jobs_per_s", "{:,.0f}/s", ">= 100,000/s",
     lambda v: v >= 100_000),
    ("W3 bulk, inside the command (approx.)", "W3_bulk_in_command_jobs_per_s", "{:,.0f}/s", "(information)",
     None),
    ("W3 one `queuectl enqueue` (median)", "W3_enqueue_ms", "{:.1f} ms", "", None),
    ("W3 `python -c 'import click'`", "W3_import_click_ms", "{:.1f} ms", "", None),
    ("W3 `python -c pass`", "W3_python_pass_ms", "{:.1f} ms", "", None),
    ("W3 enqueue / import click", "W3_enqueue_vs_click", "{:.2f}x", "<= 1.5x", lambda v: v <= 1.5),
    ("W4 drain, 20k completed in table", "W4_20k_jobs_per_s", "{:,.0f}/s", "", None),
    ("W4 20k / W1", "W4_20k_vs_W1", "{:.2f}", ">= 0.90", lambda v: v >= 0.90),
    ("W4 drain, 100k completed in table", "W4_100k_jobs_per_s", "{:,.0f}/s", "", None),
    ("W4 100k / W1", "W4_100k_vs_W1", "{:.2f}", ">= 0.90", lambda v: v >= 0.90),
    ("M1 idle worker RSS", "M1_idle_rss_mb", "{:.1f} MB", "<= 30 MB", lambda v: v <= 30),
    ("M1 worker RSS after the drains", "M1_rss_end_mb", "{:.1f} MB", "", None),
    ("M1 growth after W1", "M1_growth_mb", "{:+.1f} MB", "<= +2 MB (flat)", lambda v: v <= 2),
    ("M2 bulk enqueue peak RSS (1M lines)", "M2_bulk_peak_rss_mb", "{:.1f} MB", "< 100 MB",
     lambda v: v < 100),
    ("W1c2 drain, 1 worker, 2 slots", "W1c2_jobs_per_s", "{:,.0f}/s", "", None),
    ("W1c2 / L0", "W1c2_vs_L0", "{:.2f}", ">= 0.80", lambda v: v >= 0.80),
    ("W1x2 drain, 2 workers (own home)", "W1x2_jobs_per_s", "{:,.0f}/s", "", None),
    ("W1x8 drain, 8 workers", "W1x8_jobs_per_s", "{:,.0f}/s", "", None),
    ("W1x8 / W1x2", "W1x8_vs_W1x2", "{:.2f}", ">= 0.95", lambda v: v >= 0.95),
    ("W5 200 x sleep 1, 1 worker x 200 slots", "W5_drain_s", "{:.2f} s", "<= 1.5 s", lambda v: v <= 1.5),
    ("W5 worker RSS while 200 run", "W5_worker_rss_mb", "{:.1f} MB", "<= 40 MB", lambda v: v <= 40),
    ("G1 W1 beside a full group (1000 wait)", "G1_full_jobs_per_s", "{:,.0f}/s", "", None),
    ("G1 / W1 without it (same home)", "G1_full_vs_base", "{:.2f}", ">= 0.90", lambda v: v >= 0.90),
]


# PostgreSQL's own targets (the server shares the 2 CPUs with the workers it serves): where
# a figure has none here, the SQLite target above applies to it on both backends.
PG_TARGETS: Dict[str, Tuple[str, Optional[Callable[[float], bool]]]] = {
    "W1_vs_L0": (">= 0.60", lambda v: v >= 0.60),
    "W2_p50_ms": ("<= 5 ms", lambda v: v <= 5),
    "W2_p95_ms": ("(information)", None),
    "W3_bulk_jobs_per_s": (">= 50,000/s", lambda v: v >= 50_000),
    "W3_enqueue_vs_click": ("(information)", None),
    "M1_idle_rss_mb": ("(information)", None),
}


def _cell(res: Dict[str, Any], key: str, fmt: str, target: str,
          check: Optional[Callable[[float], bool]]) -> Tuple[str, str, str]:
    """(value, target, ok) of one figure of one run, the target as the run's backend has it."""
    if res.get("env", {}).get("db") == "postgresql" and key in PG_TARGETS:
        target, check = PG_TARGETS[key]
    value = res.get(key)
    shown = fmt.format(value) if value is not None else "n/a"
    ok = "" if check is None or value is None else ("yes" if check(value) else "NO")
    if ok and res.get("quick"):
        ok = "-"
    return shown, target, ok


def side_by_side(runs: List[Dict[str, Any]]) -> str:
    """One row per figure, one column group (value, target, ok) per backend's run."""
    head = f"{'figure':40}" + "".join(f" {r['env']['db']:>14}  {'target':16} ok " for r in runs)
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    for label, key, fmt, target, check in TARGETS:
        cells = [_cell(r, key, fmt, target, check) for r in runs]
        lines.append((f"{label:40}" + "".join(f" {v:>14}  {t:16} {o:3}" for v, t, o in cells)).rstrip())
    if any(r.get("quick") for r in runs):
        lines.append("--quick: a smoke run, too small to judge the targets (run without --quick)")
    return "\n".join(lines)


def table(res: Dict[str, Any]) -> str:
    """The figures against their targets; a --quick run is a smoke run whose sizes are too
    small (1,000-job drains into a barely warm directory, a 20k-line file) to judge them."""
    lines = [f"{'figure':40} {'value':>14}  {'target':16} ok", "-" * 76]
    for label, key, fmt, target, check in TARGETS:
        shown, target, ok = _cell(res, key, fmt, target, check)
        lines.append(f"{label:40} {shown:>14}  {target:16} {ok}")
    if res.get("quick"):
        lines.append("--quick: a smoke run, too small to judge the targets (run without --quick)")
    return "\n".join(lines)


def environment() -> Dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "db": "postgresql" if _pg_base else "sqlite",
            "machine": platform.machine(), "load_avg_1m": os.getloadavg()[0]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a < 60 s smoke run (CI)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--service", action="store_true",
                        help="only the figures of running as a service: L0, L0f, W1, R1, F1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes for inspection")
    parser.add_argument("--db", metavar="URL", help="run on PostgreSQL: postgresql://USER@HOST/DB "
                        "(a schema per scenario, dropped afterwards); default: SQLite in each home")
    parser.add_argument("--both", metavar="URL", help="run on SQLite, then on this PostgreSQL "
                        "URL, and print both side by side (one run, one machine state)")
    args = parser.parse_args(argv)
    for url in (args.db, args.both):
        if url and not is_postgres(url):
            parser.error("--db and --both take a postgresql:// URL (SQLite is the default)")
    if args.db and args.both:
        parser.error("give --db or --both, not both")
    os.environ.pop("QUEUECTL_DB", None)
    if args.db:
        _pg_base.append(args.db)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started = time.monotonic()
    runs: List[Dict[str, Any]] = []
    try:
        for url in ([None, args.both] if args.both else [args.db]):
            if url and not _pg_base:
                _pg_base.append(url)
            res = run(args.quick, args.keep, args.service)
            res["env"] = environment()
            res["bench_seconds"] = time.monotonic() - started
            runs.append(res)
    except KeyboardInterrupt:
        print("interrupted; every process the bench started has been stopped", file=sys.stderr)
        return 130
    if args.both:
        if args.json:
            print(json.dumps({r["env"]["db"]: r for r in runs}, indent=2))
        else:
            env = runs[-1]["env"]
            print(f"queuectl bench  {env['date']}  {env['cpus']} CPUs  Python {env['python']}  SQLite "
                  f"{env['sqlite']} and PostgreSQL  load {runs[0]['env']['load_avg_1m']:.2f} / "
                  f"{env['load_avg_1m']:.2f}  {'--quick' if args.quick else ''}".rstrip())
            print(side_by_side(runs))
            print(f"({time.monotonic() - started:.0f} s)")
        return 0
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        env = res["env"]
        print(f"queuectl bench  {env['date']}  {env['cpus']} CPUs  Python {env['python']}  "
              f"{'PostgreSQL' if _pg_base else 'SQLite ' + env['sqlite']}  load {env['load_avg_1m']:.2f}  {'--quick' if args.quick else ''}")
        print(table(res))
        print(f"({res['bench_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
