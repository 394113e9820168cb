"""bench/gpu.sh's script runs on CPU too (CUDA rows skipped), without Ray (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_runs_in_cpu_mode_without_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--quick", "--preset", "tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    assert "| what | mode | batch | images/s | peak MiB | note |" in table
    for what in ("| loader |", "| model | fp32 |", "| end-to-end | bf16 |", "| fixed |"):
        assert what in table, table
    assert "| model | bf16+compile |" not in table or "skipped: CUDA only" in table
    assert "ray imported: False" in table
