from helpers import counts, wait_until


def test_worker_runs_a_job_end_to_end(cli, home, workers):
    cli("enqueue", '{"id":"hello","command":"echo hi"}')
    workers.start(1)
    wait_until(lambda: counts(home)["completed"] == 1, message="job completed")
    assert "hi" in cli("logs", "hello").stdout
    assert workers.stop().returncode == 0
    wait_until(lambda: not workers.alive(), message="workers exit")
