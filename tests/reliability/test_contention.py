"""Scenario 2: 8 workers drain 3000 jobs while 4 processes enqueue 2000 more and a fifth
loops status/list/dlq retry. No "database is locked" may reach a user or stop a worker,
and the final counts must add up exactly (every good job ran exactly once).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

from helpers import wait_until
from relhelpers import enqueue_file, executions, jobs, record, state_counts, worker_log_text

INITIAL = 3000
FAILING = 50            # part of INITIAL: max_retries 0, so they die and get retried from the DLQ
PRODUCERS = 4
PER_PRODUCER = 500

# Each child drives the real CLI code (Click, error handling, a fresh connection per call)
# in a loop, in-process, so 2000 invocations do not pay 2000 interpreter start-ups.
PRODUCER = r"""
import json, sys
from click.testing import CliRunner
from queuectl.cli import cli
name, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runner = CliRunner()
cmd = 'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $$" >> ' + out
i = 0
while i < count:
    if i % 100 == 0:   # now and then a batch of 20 through stdin, in one transaction
        lines = "".join(json.dumps({"id": f"{name}-{i + k}", "command": cmd}) + "\n" for k in range(20))
        result = runner.invoke(cli, ["enqueue", "--file", "-"], input=lines)
        i += 20
    else:
        result = runner.invoke(cli, ["enqueue", json.dumps({"id": f"{name}-{i}", "command": cmd})])
        i += 1
    if result.exit_code != 0 or result.stderr:
        print("FAIL", result.exit_code, repr(result.stderr), repr(result.exception), flush=True)
print("DONE", flush=True)
"""

OPERATOR = r"""
import os, sys
from click.testing import CliRunner
from queuectl.cli import cli
stop = sys.argv[1]
runner = CliRunner()
loops = revived = 0
while not os.path.exists(stop):
    for args in (["status"], ["list", "--limit", "20"], ["dlq", "retry", "--all"], ["worker", "status"],
                 ["list", "--dlq", "--json"], ["status", "--json"]):
        result = runner.invoke(cli, args)
        if result.exit_code != 0 or "rror" in result.stderr or "is locked" in result.stderr:
            print("FAIL", args, result.exit_code, repr(result.stderr), repr(result.exception), flush=True)
        elif args[0] == "dlq" and "moved" in result.stdout:
            revived += 1
    loops += 1
print("DONE", loops, revived, flush=True)
"""


def test_contention_no_locked_errors_and_exact_counts(cli, home, workers, tmp_path, report):
    out = tmp_path / "executions"
    good = enqueue_file(tmp_path / "good.jsonl", [record(out)] * (INITIAL - FAILING))
    cli("enqueue", "--file", str(good))
    bad = enqueue_file(tmp_path / "bad.jsonl", [record(out, "exit 3")] * FAILING, max_retries=0,
                        priority=5)  # claimed first: they die early and keep the DLQ busy
    cli("enqueue", "--file", str(bad))
    failing_ids = {job_id for job_id, job in jobs(home).items() if job_id.isdigit()
                   and int(job_id) > INITIAL - FAILING}
    assert len(failing_ids) == FAILING

    env = dict(os.environ, QUEUECTL_HOME=str(home))
    stop = tmp_path / "stop-operator"
    workers.start(8)
    children = []
    try:
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, f"p{n}", str(PER_PRODUCER), str(out)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for n in range(PRODUCERS)]
        operator = subprocess.Popen([sys.executable, "-c", OPERATOR, str(stop)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
        children = [*producers, operator]
        produced = [p.communicate(timeout=120) for p in producers]
        stop.touch()
        operated = operator.communicate(timeout=60)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    for (stdout, stderr), proc in zip(produced, producers):
        assert proc.returncode == 0 and stdout.strip() == "DONE" and not stderr, (stdout, stderr)
    stdout, stderr = operated
    assert operator.returncode == 0 and stdout.startswith("DONE") and not stderr, (stdout, stderr)
    _, loops, revived = stdout.split()

    total = INITIAL + PRODUCERS * PER_PRODUCER
    wait_until(lambda: sum(state_counts(home)[s] for s in ("completed", "dead")) == total,
               timeout=120, interval=0.2, message="the queue to drain")
    counts = state_counts(home)
    report(f"contention: {total} jobs, 8 workers, {PRODUCERS}x{PER_PRODUCER} enqueues, "
           f"{loops} operator loops, {revived} DLQ retries; final {dict(counts)}")
    assert counts == Counter(completed=total - FAILING, dead=FAILING)
    runs_of = Counter(job_id for job_id, _, _ in executions(out))
    good_ids = set(jobs(home)) - failing_ids
    assert len(good_ids) == total - FAILING
    assert all(runs_of[job_id] == 1 for job_id in good_ids), \
        sorted((j, runs_of[j]) for j in good_ids if runs_of[j] != 1)[:10]
    assert int(revived) > 0, "the operator never retried a dead job: the DLQ path was not exercised"
    assert len(workers.alive()) == 8, "a worker died under contention"
    text = worker_log_text(home)
    assert "database is locked" not in text and "Traceback" not in text and " ERROR " not in text, text[-2000:]
