"""The benchmark scripts run (tiny smoke mode), so they do not rot between GPU sessions."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "liger unfused (ours)" in result.stdout and "sdpa causal" in result.stdout
    assert "still (ours)" in result.stdout
