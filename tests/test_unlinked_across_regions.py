"""A file removed in one region while open in another stays readable there until closed.

On each journal (SQLite, Kafka). Region a unlinks the file and, holding it open nowhere, reclaims it: every
region's fold drops the inode (the fold cannot know who holds it open, and
decides the same everywhere). Region b's mount kept what its open handle
reads just before that, so reads and fstat through the handle go on; writes
through it fail with ESTALE. Once b closes it, nothing of it is left.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from tests.harness.mount import TEST_BLOCK_SIZE, TEST_CHUNK_SIZE, MountFactory, TidefsMount
from tidefs.fs.coherence import ObservedState
from tidefs.fs.mount import sync_mount
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import (
    ROOT_INODE,
    CommitSlice,
    CreateVolume,
    Envelope,
    Mknod,
    Noop,
    Reclaim,
    Region,
    SliceRef,
    Unlink,
    inode_for_offset,
)
from tidefs.replica.keys import Attr
from tidefs.replica.state import State

SIZE = TEST_CHUNK_SIZE + 5 * TEST_BLOCK_SIZE + 123  # two chunks, many blocks


def content(size: int) -> bytes:
    seed = b"0123456789abcdefghijklmnopqrstuvwxyz|"
    return (seed * (size // len(seed) + 1))[:size]


def sync(m: TidefsMount) -> None:
    assert sync_mount(str(m.path), timeout=60.0) == 0, m.log_tail()


def present_in_state(m: TidefsMount, ino: int) -> bool:
    state = State.open(str(m.state_dir), read_only=True)
    try:
        return state.getattr(ino) is not None
    finally:
        state.close()


@pytest.mark.fuse
def test_file_unlinked_in_a_stays_readable_in_b_until_closed(
    mount_factory: MountFactory, journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    format_volume(
        journal_url,
        journal_volume,
        [Region(r, (tmp_path / f"store-{r}").as_uri()) for r in ("a", "b")],
        "a",
        chunk_size=TEST_CHUNK_SIZE,
        block_size=TEST_BLOCK_SIZE,
    )
    a, b = (mount_factory(volume=journal_volume, journal_url=journal_url, region=r) for r in "ab")
    data = content(SIZE)
    (a.path / "f").write_bytes(data)
    sync(b)

    fd = os.open(b.path / "f", os.O_RDWR)
    try:
        ino = os.fstat(fd).st_ino
        assert os.pread(fd, 100, 0) == data[:100]  # only the start is read (and cached)
        os.unlink(a.path / "f")
        # a reclaims it behind the unlink: wait until b's fold has dropped the inode.
        deadline = time.monotonic() + 30
        while present_in_state(b, ino):
            assert time.monotonic() < deadline, "the inode was never reclaimed"
            sync(b)
            time.sleep(0.1)
        assert not (b.path / "f").exists()

        st = os.fstat(fd)
        assert (st.st_size, st.st_nlink) == (SIZE, 0)
        assert os.pread(fd, SIZE + 10, 0) == data
        assert os.pread(fd, 1000, TEST_CHUNK_SIZE - 500) == data[TEST_CHUNK_SIZE - 500 :][:1000]
        with pytest.raises(OSError) as written:
            os.pwrite(fd, b"late", 0)
        assert written.value.errno == errno.ESTALE
        with pytest.raises(OSError) as truncated:
            os.ftruncate(fd, 1)
        assert truncated.value.errno == errno.ESTALE
        assert os.pread(fd, SIZE, 0) == data
    finally:
        os.close(fd)
    sync(a)
    sync(b)
    assert not (a.path / "f").exists()
    assert os.listdir(b.path) == os.listdir(a.path) == []


class Recorder:
    """A keeper that holds some inodes open and records what it is told."""

    def __init__(self, state: State, held: set[int]) -> None:
        self.state = state
        self.held = held
        self.kept: dict[int, tuple[Attr | None, dict[int, list[SliceRef]]]] = {}
        self.changes: list[frozenset[int]] = []

    def holds(self, ino: int) -> bool:
        return ino in self.held

    def keep(self, ino: int) -> None:
        slices = {c: self.state.slices(ino, c) for c in self.state.chunks(ino)}
        self.kept[ino] = (self.state.getattr(ino), slices)

    def changed(self, inodes: frozenset[int]) -> None:
        self.changes.append(inodes)


def test_a_batch_is_cut_just_before_the_reclaim_of_an_inode_held_open(tmp_path: Path) -> None:
    """The keeper sees the inode as the log left it right before its Reclaim, and the
    state, outcomes and digest are those of folding the batch in one piece."""
    t = 1_700_000_000_000_000_000
    f = inode_for_offset(1)
    first = SliceRef(1, 0, 10, 16, "a")
    late = SliceRef(2, 10, 5, 16, "a")  # committed after the unlink, before the Reclaim
    commands = [
        CreateVolume("v", (Region("a", "file:///nowhere"),), "a", chunk_size=64, block_size=16),
        Mknod(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0, 0, True),
        CommitSlice(f, 0, first),
        Unlink(ROOT_INODE, b"f"),
        CommitSlice(f, 0, late),
        Reclaim(f),
        Noop("after"),
    ]
    batch = [(i, Envelope(c, "a", t + i)) for i, c in enumerate(commands)]
    whole = State.open(tmp_path / "whole")
    cut = State.open(tmp_path / "cut")
    try:
        expected = whole.apply(batch)
        recorder = Recorder(cut, {f})
        result = ObservedState(cut, recorder).apply(batch)
        assert result == expected
        assert cut.applied_and_digest() == whole.applied_and_digest()
        assert cut.getattr(f) is None
        attr, slices = recorder.kept[f]
        assert attr is not None and (attr.size, attr.nlink) == (15, 0)
        assert slices == {0: [first, late]}
        assert recorder.changes == [expected.changed_inodes]
    finally:
        whole.close()
        cut.close()
