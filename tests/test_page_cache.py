"""The kernel's page cache serves a second read of an unchanged file: the mount never sees it.

A warm read (the same bytes read again, by any process) is as fast as the
page cache only if no request reaches the mount. The mount opens files with
`keep_cache` and invalidates pages only for changes other writers made, so
reads of a file nobody changes stop at the kernel, on every block store.
The proof is the mount's own count of FUSE read requests (its Prometheus
endpoint), not a timing.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from tests.harness.mount import MountFactory, fuse_requests
from tests.harness.s3 import free_port

MIB = 1 << 20


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_second_read_of_an_unchanged_file_stays_in_the_page_cache(
    mount_factory: MountFactory, store_url: str
) -> None:
    port = free_port()
    m = mount_factory(store_url, extra=["--metrics-port", str(port)])
    data = random.Random(7).randbytes(3 * MIB + 12345)  # several blocks and chunks
    path = m.path / "weights.bin"
    path.write_bytes(data)
    m.remount()  # a fresh kernel mount: nothing of the file is cached

    assert _read_all(path) == data
    after_cold = fuse_requests(port, ("read",))
    assert after_cold > 0, "the first read must come from the mount"

    # Read again: in this process, in another process, and with a fresh open.
    assert _read_all(path) == data
    other = subprocess.run(
        ["cat", str(path)], stdout=subprocess.PIPE, check=True
    ).stdout  # a different process, as the benchmark's warm read is
    assert other == data
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 2 * MIB) == data[2 * MIB : 2 * MIB + 4096]
    finally:
        os.close(fd)
    assert fuse_requests(port, ("read",)) == after_cold, "a warm read reached the mount"


def test_a_file_written_here_is_reread_from_the_page_cache_after_its_commit(
    mount_factory: MountFactory, store_url: str
) -> None:
    # The fold applies this mount's own CommitSlice: that invalidates the
    # file's attributes (mtime moves to the commit), but it must not cost
    # the pages of a file that has not changed since it was read.
    port = free_port()
    m = mount_factory(store_url, extra=["--metrics-port", str(port)])
    data = random.Random(8).randbytes(2 * MIB)
    path = m.path / "shard.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert _read_all(path) == data  # may come from the mount once (the commit's new mtime)
    settled = fuse_requests(port, ("read",))
    assert _read_all(path) == data
    assert _read_all(path) == data
    assert fuse_requests(port, ("read",)) == settled, (
        "re-reading an unchanged file reached the mount"
    )
