"""Where a read is served: blocks in memory on the caller's thread, local blocks without a hand-off.

The FUSE layer answers a read whose block is already in memory on the event
loop (`DataPath.read_cached`), and a fetcher reads a directory store's block
on the thread that asks for it. What users rely on stays: every read returns
the file's bytes, a process reads its own unflushed writes, and nothing on
the fast path ever calls a store.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tidefs.fs.cache import DiskBlockCache
from tidefs.fs.data import DataPath
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import ROOT_INODE, Command, Mknod, Outcome, Region, SliceRef
from tidefs.journal.log import open_log
from tidefs.replica.blocks import BLOCKS_PREFIX, block_key, new_slice_id
from tidefs.replica.fetch import BlockFetcher
from tidefs.replica.replica import Replica
from tidefs.replica.state import State
from tidefs.replica.store import FileStore, open_store

CHUNK = 256 << 10
BLOCK = 64 << 10


@dataclass
class Volume:
    state: State
    replica: Replica
    store: FileStore
    data: DataPath

    def create(self, name: bytes) -> int:
        outcome = self.replica.submit(
            Mknod(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0, 0, True), timeout=30
        )
        assert outcome.ok
        return outcome.inode


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    journal = f"sqlite://{tmp_path / 'log.db'}"
    store_url = (tmp_path / "store").as_uri()
    format_volume(journal, "v", [Region("a", store_url)], "a", chunk_size=CHUNK, block_size=BLOCK)
    log = open_log(journal, "v")
    state = State.open(tmp_path / "state")
    replica = Replica(log, state, "a", poll_timeout=0.05).start()
    replica.barrier(30)
    store = open_store(store_url)
    assert isinstance(store, FileStore)
    fetcher = BlockFetcher("a", {"a": store})

    def submit(command: Command, request_id: bytes) -> Outcome:
        return replica.submit(command, request_id=request_id, timeout=30)

    data = DataPath(
        state=state,
        submit=submit,
        region="a",
        chunk_size=CHUNK,
        block_size=BLOCK,
        fetcher=fetcher,
        disk_cache=DiskBlockCache(str(tmp_path / "cache"), 8 << 20),
        flush_interval=3600.0,
        io_threads=4,
    )
    try:
        yield Volume(state, replica, store, data)
    finally:
        data.close()
        fetcher.close()
        replica.stop()
        state.close()
        log.close()
        store.close()


def _store_blocks(store: FileStore) -> list[str]:
    return list(store.list(BLOCKS_PREFIX))


def test_a_block_in_memory_is_read_without_any_store_call(volume: Volume) -> None:
    ino = volume.create(b"f")
    payload = os.urandom(3 * BLOCK + 100)
    fh = volume.data.open(ino, os.O_RDWR)
    volume.data.write(fh, 0, payload)
    volume.data.flush(ino)

    # Not in memory yet: the loop must not wait for the store, so it declines.
    assert volume.data.read_cached(fh, 0, 4096) is None
    assert bytes(volume.data.read(fh, 0, 4096)) == payload[:4096]

    # The block is in memory now. Remove every stored copy: what read_cached
    # returns can only come from memory, never from a store call.
    for key in _store_blocks(volume.store):
        volume.store.delete(key)
    got = volume.data.read_cached(fh, 8192, 16384)
    assert got is not None and bytes(got) == payload[8192 : 8192 + 16384]
    # Reads past the end of the file, as read() answers them.
    assert volume.data.read_cached(fh, len(payload) + 10, 4096) == b""
    # A block never fetched (and no longer in any store) is left to read(),
    # which may wait and fail on a worker thread.
    assert volume.data.read_cached(fh, 2 * BLOCK, 4096) is None
    # A read across two blocks needs a copy: also left to read().
    assert volume.data.read_cached(fh, BLOCK - 10, 20) is None
    volume.data.release(fh)


def test_unflushed_writes_are_never_hidden_by_the_fast_path(volume: Volume) -> None:
    ino = volume.create(b"g")
    fh = volume.data.open(ino, os.O_RDWR)
    volume.data.write(fh, 0, b"a" * BLOCK)
    volume.data.flush(ino)
    assert bytes(volume.data.read(fh, 0, 10)) == b"a" * 10  # the block is in memory
    volume.data.write(fh, 0, b"b" * 10)  # buffered, not committed
    # The committed block is in memory, but it is not what the process wrote last.
    assert volume.data.read_cached(fh, 0, 10) is None
    assert bytes(volume.data.read(fh, 0, 20)) == b"b" * 10 + b"a" * 10
    volume.data.release(fh)


class _RecordingStore(FileStore):
    """A directory store that notes which thread reads each block."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.threads: list[str] = []

    def get_block(self, key: str) -> bytes:
        self.threads.append(threading.current_thread().name)
        return super().get_block(key)


def test_a_directory_store_block_is_read_on_the_calling_thread(tmp_path: Path) -> None:
    # A directory store is local I/O: a hand-off to the region's thread pool
    # and back costs two thread switches per block, most of a small file's
    # read, and bounds nothing (the directory store has no timeout).
    store = _RecordingStore(tmp_path / "store")
    ref = SliceRef(new_slice_id(), 0, 1000, 4096, "a")
    payload = os.urandom(1000)
    store.put_block(block_key(ref.slice_id, 0), payload)
    with BlockFetcher("a", {"a": store}) as fetcher:
        assert fetcher.get(ref, 0) == payload
        assert fetcher.stats().local_reads == 1
    assert store.threads == [threading.current_thread().name]
    store.close()
