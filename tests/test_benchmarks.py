"""The benchmark scripts run (tiny smoke mode), so they do not rot between GPU sessions."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    ops = ["gated_linear_attention", "sliding_window + sinks", "liger_attention", "liger_decode", "self_saliency"]
    ops += ["select_salient", "still_attention", "parallax_attention", "parallax_decode"]
    for op in ops:  # every op's correctness rows, all passing
        assert f"\n{op} " in result.stdout, op
    assert "FAIL" not in result.stdout and "0 problem(s)" in result.stdout
    for path in ["sdpa causal", "liger (ours)", "still (ours)", "parallax (ours)", "swa (ours)"]:
        assert f" {path} " in result.stdout, path
    assert "decode sweep" in result.stdout
