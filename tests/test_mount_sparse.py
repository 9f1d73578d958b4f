"""st_blocks counts what a file holds, holes excluded, as du expects.

A file's bytes are slices; what no slice covers (a hole, the space a
truncate added) reads as zeros and takes no space. `st_blocks` is the union
of the slice ranges, clipped to the size, in 512-byte units, while the
writes are buffered, once committed, and after a remount.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.mount import TEST_BLOCK_SIZE, TEST_CHUNK_SIZE, TidefsMount

pytestmark = pytest.mark.fuse

HOLE = 100 << 20
PAGE = 4096


def used(p: Path) -> int:
    """Bytes the file takes, as du sees them (st_blocks in 512-byte units)."""
    return os.stat(p).st_blocks * 512


def du_kib(p: Path) -> int:
    return int(
        subprocess.run(["du", "-k", str(p)], capture_output=True, check=True).stdout.split()[0]
    )


def test_sparse_file_reports_what_it_holds(tidefs_mount: TidefsMount) -> None:
    sparse = tidefs_mount.path / "sparse"
    dense = tidefs_mount.path / "dense"
    grown = tidefs_mount.path / "grown"
    size = TEST_CHUNK_SIZE + 3 * TEST_BLOCK_SIZE + 17  # across a chunk boundary

    with open(sparse, "wb") as f:
        f.truncate(HOLE)
        f.seek(HOLE - PAGE)
        f.write(b"x" * PAGE)
        f.flush()
        assert PAGE <= used(sparse) <= 2 * PAGE  # still buffered here
    dense.write_bytes(os.urandom(size))
    with open(grown, "wb") as f:
        f.write(b"y" * PAGE)
        f.truncate(3 * TEST_CHUNK_SIZE)  # extended by truncate: a hole after the data
        f.seek(2 * TEST_CHUNK_SIZE + 10)
        f.write(b"z" * 100)

    def check() -> None:
        assert os.stat(sparse).st_size == HOLE
        assert PAGE <= used(sparse) <= 2 * PAGE
        assert du_kib(sparse) <= 8
        assert os.stat(dense).st_size == size
        assert os.stat(dense).st_blocks == (size + 511) // 512
        assert PAGE + 100 <= used(grown) <= PAGE + 100 + 1024
        with open(sparse, "rb") as f:
            f.seek(HOLE - 2 * PAGE)
            assert f.read() == b"\0" * PAGE + b"x" * PAGE

    check()
    tidefs_mount.remount()
    check()
    # Truncating away the data leaves nothing allocated; filling the hole allocates it.
    os.truncate(sparse, HOLE - PAGE)
    assert used(sparse) == 0
    with open(grown, "r+b") as f:
        f.write(b"w" * (3 * TEST_CHUNK_SIZE))
    assert os.stat(grown).st_blocks == 3 * TEST_CHUNK_SIZE // 512
