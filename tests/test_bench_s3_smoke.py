"""Smoke test of `bench fs` on the S3 target: the raw-store references and the small files run.

The raw 4 KiB put is what makes the S3 overwrite figure readable (the mount's
share is the difference), and the raw multipart upload is the reference of the
S3 write target, so a change that breaks them on S3 — boto3 event handlers,
the store URL they parse — must show up in the default tier; so must the
small-file workloads, whose S3 target differs from the directory store's.
Tiny scale, the `seq` and `small` groups only; nothing about speed is
asserted. It runs on both endpoints the benchmark offers: moto's server and
gofakes3 (built by `scripts/fetch-gofakes3` during setup).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.mount import fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("server", ["moto", "gofakes3"])
def test_bench_fs_on_s3_measures_the_raw_references_and_the_small_files(server: str) -> None:
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    if server == "gofakes3" and not (REPO_ROOT / ".cache/gofakes3/bin/gofakes3").exists():
        message = "gofakes3 is not built: run scripts/fetch-gofakes3 (needs Go)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI builds it; a missing endpoint must not pass quietly
        pytest.skip(message)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "fs", "--", "--tiny", "--targets", "tmpfs,tidefs-s3",
         "--workloads", "seq,small", "--json", "--no-drop-caches", "--s3-server", server],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["s3_server"] == server
    rows = {(r["target"], r["workload"]): r for r in report["rows"]}
    for workload in (
        "4 KiB overwrite + fsync, p50",
        "4 KiB straight to the store, durable, p50",
        "sequential write",
        "same bytes straight to the store",
        "small files written, 1 thread",
        "small files read cold, 4 threads",
        "tar -xf a tree of small files",
    ):
        row = rows[("tidefs-s3", workload)]
        assert row["error"] is None and row["value"] > 0, row
    # tmpfs has no store: no raw references there.
    assert ("tmpfs", "4 KiB straight to the store, durable, p50") not in rows
    assert ("tmpfs", "same bytes straight to the store") not in rows
    checks = {c["check"]: c for c in report["targets"] if c["target"] == "tidefs-s3"}
    write = checks["sequential write + fsync vs the same bytes straight to the store"]
    assert write["ratio"] > 0 and isinstance(write["met"], bool), write
    # The small-file read has a bound of its own on S3.
    assert checks["small files read cold, 4 threads"]["bound"] == ">= 1700"
