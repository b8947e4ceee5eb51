"""The benchmark runs end to end and reports every figure. No timing is asserted: the
machine is shared and noisy; the figures themselves are for benchmarks/RESULTS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
KEYS = ("L0_spawns_per_s", "L0f_spawns_per_s", "W1_jobs_per_s", "W1_vs_L0", "W2_p50_ms", "W2_p95_ms",
        "W2_idle_cpu_pct", "W3_bulk_jobs_per_s", "W3_enqueue_ms", "W3_import_click_ms",
        "W3_python_pass_ms", "W3_enqueue_vs_click", "W4_20k_jobs_per_s", "W4_20k_vs_W1",
        "W4_100k_jobs_per_s", "W4_100k_vs_W1", "M1_idle_rss_mb", "M1_rss_after_mb", "M1_growth_mb")


def test_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True,
                            text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    missing = [key for key in KEYS if not isinstance(data.get(key), (int, float))]
    assert not missing, missing
    assert not list(tmp_path.iterdir())  # nothing left behind in the caller's directory
