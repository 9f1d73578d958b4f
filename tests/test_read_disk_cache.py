"""Which blocks a mount's reads copy into its on-disk block cache."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tidefs.fs.cache import DiskBlockCache, MemoryBlockCache
from tidefs.fs.data import BlockReader
from tidefs.journal.commands import SliceRef
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import BlockFetcher
from tidefs.replica.store import open_store


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as p:
        yield p


def _reader(
    tmp_path: Path, pool: ThreadPoolExecutor, *, write_back: bool
) -> tuple[BlockReader, DiskBlockCache, SliceRef, bytes]:
    store = open_store(f"file://{tmp_path / 'store'}")
    payload = b"tidefs" * 1000
    ref = SliceRef(
        slice_id=0x1234, offset=0, length=len(payload), block_size=len(payload), home="a"
    )
    store.put_block(block_key(ref.slice_id, 0), payload)
    fetcher = BlockFetcher("a", {"a": store}, write_back=write_back)
    disk = DiskBlockCache(str(tmp_path / "cache"), 8 << 20)
    return BlockReader(fetcher, MemoryBlockCache(8 << 20), disk, pool), disk, ref, payload


def test_directory_store_reads_skip_the_disk_cache(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    # A directory store is local already: caching its blocks on disk again
    # would double the I/O of a cold read.
    reader, disk, ref, payload = _reader(tmp_path, pool, write_back=True)
    try:
        assert reader.get(ref, 0) == payload
        assert disk.size == 0
    finally:
        reader.remote.close()


def test_without_write_back_reads_fill_the_disk_cache(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    # Without write-back, blocks from other regions never reach the local
    # store: the disk cache is what keeps them local.
    reader, disk, ref, payload = _reader(tmp_path, pool, write_back=False)
    try:
        assert reader.get(ref, 0) == payload
        assert disk.get(block_key(ref.slice_id, 0)) == payload
    finally:
        reader.remote.close()
