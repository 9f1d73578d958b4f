"""Smoke test of the replication benchmark (`python -m bench replicate`) at its tiniest scale.

Directory stores and a SQLite log, no delay: it checks that the benchmark
whose figures the README quotes still runs end to end (its delay proxies in
their own process included) and reports every figure, including the split of
the metadata lag into the append at A and the rest. Nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_replicate_tiny_reports_every_figure() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_replicate", "--store", "file", "--lag-journal",
         "sqlite", "--delay-ms", "0", "--rate", "50", "--seconds", "1", "--samples", "1",
         "--blocks", "1", "--repeat", "1", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout)["delays"]["0"]
    lag = row["metadata_lag"]
    assert lag["records"] == 50
    assert 0 < lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"]
    for part in ("append_at_a", "acked_to_applied_at_b"):
        assert 0 <= lag[part]["p50_ms"] <= lag[part]["p99_ms"], lag
    assert row["replication_latency"]["replicated"]["samples"] == 1
    cold = row["cold_read"]
    assert cold["no_write_back_fallback_reads"] >= 1  # the reads did fall back to A
    assert all(cold[f"{m}_{n}"]["ratio"] > 0 for m in ("no_write_back", "write_back")
               for n in ("sequential", "parallel_8"))  # fmt: skip

    lag_only = subprocess.run(
        [sys.executable, "-m", "bench.bench_replicate", "--store", "file", "--lag-journal",
         "sqlite", "--delay-ms", "0", "--seconds", "0.2", "--figures", "lag", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert lag_only.returncode == 0, lag_only.stderr[-3000:]
    assert set(json.loads(lag_only.stdout)["delays"]["0"]) == {"metadata_lag"}
