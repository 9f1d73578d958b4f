"""Smoke test of the file-system benchmark (`python -m bench fs`) at its tiniest scale.

It runs every workload of the benchmark against tmpfs and a real tidefs mount
(embedded log, directory store), so that a change to the mount or to the bench
that breaks a workload (a failed step, a crash, output that is not JSON) shows
up in the default tier, and that the target check reports every target of the
data-path issue with its figure, reference and ratio. It asserts nothing about
speed, and leaves the kernel's page cache alone (other tests run on the same
machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_fs import CHECKS, WORKLOADS, Row, format_check, markdown, targets_met
from tests.harness.mount import fuse_available

pytestmark = pytest.mark.fuse

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_fs_tiny_runs_every_workload_on_tmpfs_and_tidefs() -> None:
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "fs", "--", "--tiny", "--targets", "tmpfs,tidefs-file",
         "--json", "--no-drop-caches"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    rows = report["rows"]
    failed = [(r["target"], r["workload"], r["error"]) for r in rows if r["value"] is None]
    assert not failed, failed
    by_target: dict[str, set[str]] = {}
    for r in rows:
        assert r["value"] > 0, r
        by_target.setdefault(r["target"], set()).add(r["workload"])
    assert set(by_target) == {"tmpfs", "tidefs-file"}
    # tidefs has every workload of tmpfs, plus the references read or written straight
    # in its block store.
    assert by_target["tmpfs"] < by_target["tidefs-file"]
    assert by_target["tidefs-file"] - by_target["tmpfs"] == {
        "same bytes straight to the store",
        "same blocks from the store, cold",
        "4 KiB straight to the store, durable, p50",
        "safetensors' blocks from the store, cold",
        "pickle's blocks from the store, cold",
    }
    assert len(by_target["tmpfs"]) == 16
    assert {"small files written, 1 thread", "small files read cold, 4 threads"} <= by_target[
        "tmpfs"
    ]
    # Every target of the data-path issue is checked, with its figure, reference and ratio.
    checks = {c["check"]: c for c in report["targets"]}
    assert [c["target"] for c in report["targets"]] == ["tidefs-file"] * len(CHECKS)
    assert list(checks) == [c.what for c in CHECKS]
    for c in checks.values():
        assert c["figure"] > 0 and c["reference_figure"] > 0 and c["ratio"] > 0, c
        assert isinstance(c["met"], bool), c
        assert c["value"] == (c["ratio"] if c["on"] == "ratio" else c["figure"]), c
    # create+stat+unlink counts operations (three per file), as the issue does.
    csu8 = checks["create+stat+unlink, 8 threads, a directory each"]
    assert (csu8["unit"], csu8["bound"]) == ("ops/s", ">= 7500")
    row = next(
        r for r in rows
        if (r["target"], r["workload"]) == ("tidefs-file", "create+stat+unlink, 8 threads")
    )  # fmt: skip
    assert (row["unit"], row["value"]) == ("ops/s", csu8["figure"])
    assert checks["small files read cold, 4 threads"]["bound"] == ">= 2500"
    # The write's reference is measured on the same target, the warm reads' on tmpfs.
    assert (
        checks["sequential write + fsync vs the same bytes straight to the store"]["reference"]
        == "same bytes straight to the store"
    )
    assert checks["warm sequential read vs tmpfs"]["reference"] == "tmpfs"


def _row(target: str, key: str, value: float | None, note: str | None = None) -> Row:
    w = WORKLOADS[key]
    return Row(target, w.label, w.unit, value, None if value else "failed", note)


def test_target_check_judges_ratios_figures_and_s3_bounds() -> None:
    rows = [
        _row("tidefs-file", "seq_read_cold", 450.0),
        _row("tidefs-file", "raw_store", 500.0),
        _row("tidefs-file", "overwrite", 0.8),
        _row("tidefs-file", "raw_put", 0.4),
        _row("tidefs-file", "small_read_cold", 2000.0, "partial: 900 of 3,000 files in 60 s"),
        _row("tidefs-s3", "small_read_cold", 2000.0),
        _row("tidefs-s3", "seq_write", None),
        _row("tidefs-s3", "raw_write", 300.0),
    ]
    checks = {(c["target"], c["check"]): c for c in targets_met(rows)}
    # Only what ran is checked.
    assert len(checks) == 5
    cold = checks[("tidefs-file", "cold sequential read vs the raw store read of the same blocks")]
    assert (cold["ratio"], cold["value"], cold["met"]) == (0.9, 0.9, True)
    # A latency: judged on the figure; the ratio is the reference's over it.
    ow = checks[("tidefs-file", "4 KiB pwrite + fsync inside the big file, p50")]
    assert (ow["value"], ow["ratio"], ow["met"], ow["bound"]) == (0.8, 0.5, True, "<= 1")
    # The same figure misses the directory store's bound and meets S3's.
    small_file = checks[("tidefs-file", "small files read cold, 4 threads")]
    small_s3 = checks[("tidefs-s3", "small files read cold, 4 threads")]
    assert (small_file["met"], small_file["partial"]) == (False, True)
    assert (small_s3["met"], small_s3["bound"], small_s3["partial"]) == (True, ">= 1700", False)
    assert small_file["ratio"] is None  # no tmpfs row in this report
    # A failed figure is neither met nor missed.
    write = checks[
        ("tidefs-s3", "sequential write + fsync vs the same bytes straight to the store")
    ]
    assert (write["figure"], write["ratio"], write["met"]) == (None, None, None)
    assert "NOT met (on a partial figure)" in format_check(small_file)
    table = markdown(list(checks.values()))
    assert "| S3 | small files read cold, 4 threads | 2,000 files/s | tmpfs: - | - |" in table
