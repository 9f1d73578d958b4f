"""Smoke test of the file-system benchmark (`python -m bench fs`) at its tiniest scale.

It runs every workload of the benchmark against tmpfs and a real tidefs mount
(embedded log, directory store), so that a change to the mount or to the bench
that breaks a workload (a failed step, a crash, output that is not JSON) shows
up in the default tier. It asserts nothing about speed, and leaves the kernel's
page cache alone (other tests run on the same machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # tidefs has every workload of tmpfs, plus the cold read straight from its block store.
    assert by_target["tmpfs"] < by_target["tidefs-file"]
    assert "same blocks from the store, cold" in by_target["tidefs-file"]
    assert len(by_target["tmpfs"]) == 14
    checks = {(c["target"], c["check"]): c["value"] for c in report["targets"]}
    # One file is three operations (create, stat, unlink): both readings of the target.
    ops = checks[("tidefs-file", "create+stat+unlink, 8 threads (ops/s)")]
    files = checks[("tidefs-file", "create+stat+unlink, 8 threads (files/s)")]
    assert ops == pytest.approx(3 * files)
    csu8 = next(
        r for r in rows
        if (r["target"], r["workload"]) == ("tidefs-file", "create+stat+unlink, 8 threads")
    )  # fmt: skip
    assert (csu8["unit"], csu8["value"]) == ("ops/s", ops)
