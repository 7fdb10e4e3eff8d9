"""`make bench` does not rot: `benchmarks/run.py --quick` runs every workload and writes
its tables, RESULTS.md and the chart (into a temporary folder, not the committed ones)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("fixed_size", "fixed_size_mlp", "pack", "bucket", "shuffle", "per_device")


@pytest.mark.slow
def test_run_quick_writes_tables_results_and_chart(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # about a minute on a quiet 2-core machine; generous for a busy one
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for name in WORKLOADS:  # one table per workload, each with the fused path and the copy
        assert f"### `{name}`" in out
    assert out.count("| numpy copy (reference) |") == len(WORKLOADS)
    assert "time ~ n^" in out and "Peak RSS" in out and "trace + compile" in out
    assert "Summary" in out and "Scaling" in out

    results = (tmp_path / "RESULTS.md").read_text()
    assert "## Machine" in results and "## How to reproduce" in results
    assert "JAX " in results and "cores" in results
    for name in WORKLOADS:
        assert f"### `{name}`" in results
    assert "## Notes on `fixed_size`" in results
    assert "throughput.png" in results
    assert "## Standalone benchmarks" in results and "failed (exit" not in results
    assert "bench_pipeline.py" in results and "bench_host.py" in results

    png = (tmp_path / "throughput.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
