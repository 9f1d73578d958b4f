"""Data integrity through a real mount: every byte read back is the byte written.

The volume uses 1 MiB chunks and 64 KiB blocks, so random writes here cross
block, slice and chunk boundaries. A local file receives the same operations
and is the oracle; contents are compared with the kernel's page cache dropped
(so the mount's read path answers), then again after a remount.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.mount import (
    TEST_BLOCK_SIZE,
    TEST_CHUNK_SIZE,
    MountFactory,
    TidefsMount,
)

pytestmark = pytest.mark.fuse

MAX_SIZE = 3 * TEST_CHUNK_SIZE + 1000

# Offsets cluster around block and chunk boundaries, where off-by-ones live.
boundaries = st.sampled_from(
    [k * TEST_BLOCK_SIZE for k in range(0, 50)] + [k * TEST_CHUNK_SIZE for k in range(4)]
)
offsets = st.one_of(
    st.integers(0, MAX_SIZE),
    st.builds(lambda b, d: max(0, b + d), boundaries, st.integers(-3, 3)),
)
sizes = st.one_of(
    st.integers(1, 4096), st.integers(1, 3 * TEST_BLOCK_SIZE), st.integers(1, 1 << 20)
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, sizes, st.integers(0, 2**32)),
        st.tuples(st.just("truncate"), st.one_of(offsets, st.just(0))),
        st.tuples(st.just("read"), offsets, sizes),
        st.tuples(st.just("fsync")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("drop_cache")),
    ),
    min_size=1,
    max_size=14,
)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_all(path: Path) -> bytes:
    """Read a file through the mount's read path, not the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while data := os.read(fd, 1 << 20):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


class Pair:
    """One file on the mount and its local twin, open for reading and writing."""

    def __init__(self, mine: Path, ref: Path) -> None:
        self.paths = (mine, ref)
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in self.paths]

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "write":
            _, off, size, seed = op
            data = pattern(seed, size)
            for fd in self.fds:
                assert os.pwrite(fd, data, off) == len(data)
        elif kind == "truncate":
            for fd in self.fds:
                os.ftruncate(fd, op[1])
        elif kind == "read":
            _, off, size = op
            got = [os.pread(fd, size, off) for fd in self.fds]
            assert got[0] == got[1], f"read of {size} at {off} differs"
        elif kind == "fsync":
            os.fsync(self.fds[0])
        elif kind == "reopen":
            self.close()
            self.fds = [os.open(p, os.O_RDWR) for p in self.paths]
        elif kind == "drop_cache":
            os.posix_fadvise(self.fds[0], 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def check_random_writes(mount: TidefsMount, tmp_path: Path, examples: int) -> None:
    expected: dict[str, bytes] = {}
    counter = itertools.count()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(operations)
    def run(ops: list[tuple[Any, ...]]) -> None:
        name = f"f{next(counter)}"
        pair = Pair(mount.path / name, tmp_path / name)
        try:
            for op in ops:
                pair.apply(op)
            # Before close: the writer reads its own buffered writes.
            assert os.fstat(pair.fds[0]).st_size == os.fstat(pair.fds[1]).st_size
            assert read_all(pair.paths[0]) == read_all(pair.paths[1])
        finally:
            pair.close()
        want = (tmp_path / name).read_bytes()
        assert read_all(mount.path / name) == want
        expected[name] = want

    run()
    mount.remount()
    for name, want in expected.items():
        assert read_all(mount.path / name) == want, f"{name} differs after remount"


def test_random_writes_match_local_file(store_mount: TidefsMount, tmp_path: Path) -> None:
    check_random_writes(store_mount, tmp_path, examples=25)


def test_sequential_large_file_across_chunks(store_mount: TidefsMount) -> None:
    data = pattern(7, 5 * TEST_CHUNK_SIZE + 12345)
    p = store_mount.path / "big"
    with open(p, "wb") as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
    assert read_all(p) == data
    store_mount.remount()
    assert os.stat(p).st_size == len(data)
    assert read_all(p) == data
    # random reads of the cold file, each through the read path
    fd = os.open(p, os.O_RDONLY)
    try:
        rng = random.Random(1)
        for _ in range(50):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 300_000)
            assert os.pread(fd, n, off) == data[off : off + n]
    finally:
        os.close(fd)


def test_sparse_file_reads_zeros(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "sparse"
    far = 3 * TEST_CHUNK_SIZE + 17
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(far)
        f.write(b"tail")
    want = b"head" + bytes(far - 4) + b"tail"
    assert read_all(p) == want
    os.truncate(p, far + 100)
    assert read_all(p) == want + bytes(96)
    os.truncate(p, 2)
    os.truncate(p, 10)
    assert read_all(p) == b"he" + bytes(8), "a truncated tail must not come back"


def test_overwrites_are_compacted(tidefs_mount: TidefsMount) -> None:
    """Many small overwrites in one chunk end as few slices, with the same bytes."""
    p = tidefs_mount.path / "frag"
    ref = bytearray(pattern(3, 300_000))
    p.write_bytes(ref)
    rng = random.Random(5)
    for i in range(30):
        off = rng.randrange(len(ref) - 100)
        chunk = pattern(100 + i, 100)
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(chunk)
        ref[off : off + 100] = chunk
    ino = os.stat(p).st_ino

    from tidefs.replica.state import State

    def slices() -> int:
        state = State.open(tidefs_mount.state_dir, read_only=True)
        try:
            return len(state.slices(ino, 0))
        finally:
            state.close()

    deadline = time.monotonic() + 20
    while slices() >= 8 and time.monotonic() < deadline:
        time.sleep(0.2)  # compaction waits for the chunk to be quiet, then runs behind
    assert slices() < 8, f"chunk 0 still has {slices()} slices"
    assert read_all(p) == bytes(ref)
    tidefs_mount.remount()
    assert read_all(p) == bytes(ref)


def test_writes_are_durable_at_close_and_umount(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "held"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"written before umount, never closed")
    try:
        tidefs_mount.stop()  # flushes the buffer of a file still open, then detaches
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone under it
            os.close(fd)
    tidefs_mount.start()
    assert p.read_bytes() == b"written before umount, never closed"


def _block_files(store: Path) -> list[Path]:
    return sorted(q for q in store.rglob("*") if q.is_file() and "blocks" in q.parts)


def test_corrupt_block_is_eio_never_wrong_bytes(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "victim"
    p.write_bytes(pattern(9, 3 * TEST_BLOCK_SIZE))
    tidefs_mount.stop()
    blocks = _block_files(tidefs_mount.root / "store-a")
    assert len(blocks) == 3
    for b in blocks:
        raw = bytearray(b.read_bytes())
        raw[-1] ^= 0xFF
        b.write_bytes(raw)
    shutil.rmtree(tidefs_mount.cache_dir)
    tidefs_mount.start()
    with pytest.raises(OSError) as exc:
        read_all(p)
    assert exc.value.errno == errno.EIO
    assert "corrupt" in tidefs_mount.log_path.read_text()


def test_reads_fall_back_to_the_home_region(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A mirror reads blocks it lacks from their home region, and skips a corrupt local copy."""
    store_a, store_b = (tmp_path / "sa").as_uri(), (tmp_path / "sb").as_uri()
    a = mount_factory(regions=[("a", store_a), ("b", store_b)], region="a")
    data = pattern(11, 4 * TEST_BLOCK_SIZE + 5)
    (a.path / "shared").write_bytes(data)
    b = mount_factory(
        volume=a.volume, journal_url=a.journal_url, region="b", extra=["--no-replicate"]
    )
    assert not _block_files(tmp_path / "sb"), "nothing copied the blocks to region b yet"
    assert read_all(b.path / "shared") == data

    # A corrupt copy in region b's own store is skipped for the home region's good one.
    b.stop()
    for src in _block_files(tmp_path / "sa"):
        dst = tmp_path / "sb" / src.relative_to(tmp_path / "sa")
        dst.parent.mkdir(parents=True, exist_ok=True)
        raw = bytearray(src.read_bytes())
        raw[-1] ^= 0x55
        dst.write_bytes(raw)
    shutil.rmtree(b.cache_dir)
    b.start()
    assert read_all(b.path / "shared") == data
