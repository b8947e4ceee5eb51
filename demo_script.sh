#!/usr/bin/env bash
# End-to-end tour of queuectl that checks itself: exits non-zero on the first mismatch.
# Runs in a temporary QUEUECTL_HOME, so your real ~/.queuectl is never touched.
set -euo pipefail

if command -v queuectl >/dev/null 2>&1; then Q=(queuectl); else Q=(python3 -m queuectl.cli); fi
export QUEUECTL_HOME="$(mktemp -d "${TMPDIR:-/tmp}/queuectl-demo.XXXXXX")"
WORK="$QUEUECTL_HOME/work"; mkdir -p "$WORK"

cleanup() {
  "${Q[@]}" worker stop --force --wait 5 >/dev/null 2>&1 || true
  rm -rf "$QUEUECTL_HOME"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run()  { printf '$ queuectl'; printf ' %q' "$@"; echo; "${Q[@]}" "$@"; }
fail() { echo "DEMO FAILED: $*" >&2; exit 1; }
check() { # check DESCRIPTION ACTUAL EXPECTED
  if [[ "$2" == "$3" ]]; then echo "  ok: $1 ($2)"; else fail "$1: expected '$3', got '$2'"; fi
}
field() { # field JOB_ID KEY -> value from `show --json`
  "${Q[@]}" show "$1" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"
}
count() { # count STATE
  "${Q[@]}" status --json | python3 -c "import json,sys; print(json.load(sys.stdin)['jobs']['$1'])"
}

step "1. Initialise (idempotent) in $QUEUECTL_HOME"
run init-db
run initdb >/dev/null
if [[ "${QUEUECTL_DB:-}" == postgres* ]]; then  # the queue lives in PostgreSQL, not in a file
  check "database is PostgreSQL" "$("${Q[@]}" init-db | grep -c 'database ready: postgres')" "1"
else
  check "database file exists" "$(test -f "$QUEUECTL_HOME/queue.db" && echo yes)" "yes"
fi

step "2. Configure quick retries"
run config set max_retries 2
run config set backoff_base 1
run config list
check "alias default_max_retries reads max_retries" "$("${Q[@]}" config get default_max_retries)" "max_retries = 2"

step "3. Enqueue a successful and a failing job, and one with bad input"
run enqueue '{"id":"ok1","command":"echo Hello World"}'
run enqueue '{"id":"bad1","command":"exit 3","max_retries":2}'
run add "echo 'from add'" --id add1 --priority 10
if "${Q[@]}" enqueue '{"id":"x","command":""}' 2>"$WORK/err"; then fail "empty command was accepted"; fi
echo "  rejected as expected: $(cat "$WORK/err")"
check "pending jobs" "$(count pending)" "3"

step "4. Start 2 detached workers"
run worker start --count 2
run worker status
run wait ok1 add1 --timeout 30
check "ok1 completed" "$(field ok1 state)" "completed"
run logs ok1
check "ok1 output captured (under the attempt's header and command)" "$("${Q[@]}" logs ok1 | sed -n 3p)" "Hello World"
check "ok1 log ends with the attempt's result" "$("${Q[@]}" logs ok1 | tail -n 1)" \
  "--- queuectl job ok1 attempt 1 finished: exit 0 ---"

step "5. Watch the failing job retry with backoff (1s, 1s) and land in the DLQ"
set +e; "${Q[@]}" wait bad1 --timeout 30; rc=$?; set -e
check "wait reports a dead job with exit 1" "$rc" "1"
check "bad1 is dead" "$(field bad1 state)" "dead"
check "bad1 ran 1 + 2 retries" "$(field bad1 attempts)" "3"
check "bad1 last error" "$(field bad1 last_error)" "exit code 3"
run dlq list
run show bad1

step "6. Retry from the DLQ (a fresh retry budget; attempt numbers go on); pause first so we can look"
run pause
run dlq retry bad1
check "bad1 pending again" "$(field bad1 state)" "pending"
check "bad1 keeps its 3 attempts" "$(field bad1 attempts)" "3"
check "bad1 retry budget reset" "$(field bad1 retry_base)" "3"
run status
run resume
set +e; "${Q[@]}" wait bad1 --timeout 30 >/dev/null; set -e
check "bad1 dead again after its retries" "$(field bad1 state)" "dead"
check "bad1 runs numbered on: 3 + 3" "$(field bad1 attempts)" "6"
run pause >/dev/null
run requeue bad1 >/dev/null
check "requeue (alias of dlq retry) resets the budget" "$(field bad1 retry_base)" "6"
run cancel bad1
check "cancelled is final, not the DLQ" "$(field bad1 state)" "cancelled"
run resume >/dev/null

step "7. Persistence across a worker restart"
run worker stop
check "no workers left" "$("${Q[@]}" worker status)" "No running workers."
run add "echo survived > '$WORK/survived.txt'" --id persist1
run status
run worker start --count 3
run wait persist1 --timeout 30
check "job enqueued while no worker ran, completed after restart" "$(cat "$WORK/survived.txt")" "survived"

step "8. Parallel jobs: 3 workers run three 'sleep 2' at once"
start=$(date +%s.%N)
for i in 1 2 3; do "${Q[@]}" add "sleep 2" --id "par$i" >/dev/null; done
run wait par1 par2 par3 --timeout 30
elapsed=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
echo "  three 2-second jobs took ${elapsed}s"
python3 -c "import sys; sys.exit(0 if $elapsed < 5.5 else 1)" || fail "jobs did not run in parallel (${elapsed}s)"

step "9. No job ran twice: 60 jobs, 3 workers, each appends its id once"
seq 1 60 | sed "s|.*|{\"command\":\"echo \$QUEUECTL_JOB_ID >> '$WORK/ids.txt'\"}|" > "$WORK/jobs.jsonl"
run enqueue --file "$WORK/jobs.jsonl"
run wait --all --timeout 60
check "60 executions recorded" "$(wc -l < "$WORK/ids.txt" | tr -d ' ')" "60"
check "60 distinct ids" "$(sort -u "$WORK/ids.txt" | wc -l | tr -d ' ')" "60"

step "10. Graceful stop lets the running job finish"
run add "sleep 2; echo done > '$WORK/graceful.txt'" --id graceful1
python3 - <<PY
import json, subprocess, sys, time
deadline = time.time() + 20
while time.time() < deadline:
    out = subprocess.run([*"${Q[*]}".split(), "show", "graceful1", "--json"], capture_output=True, text=True).stdout
    if json.loads(out)["state"] == "processing":
        sys.exit(0)
    time.sleep(0.05)
sys.exit("graceful1 never started")
PY
run worker stop --wait 20
check "in-flight job completed during stop" "$(field graceful1 state)" "completed"
check "its output" "$(cat "$WORK/graceful.txt")" "done"

step "11. Final status"
run status
echo
echo "DEMO PASSED"
