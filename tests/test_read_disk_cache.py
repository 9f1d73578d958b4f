"""Which blocks a mount's reads copy into its on-disk block cache."""

from __future__ import annotations

import itertools
import os
import shutil
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
        # Served while its file is still being written, and kept once written:
        # the cache a remount opens (a new index, read from the directory) has it.
        assert disk.get(block_key(ref.slice_id, 0)) == payload
        assert disk.flush()
        assert DiskBlockCache(disk.directory, 8 << 20).get(block_key(ref.slice_id, 0)) == payload
    finally:
        reader.remote.close()


def test_a_block_written_in_the_background_is_verified_when_read_back(tmp_path: Path) -> None:
    cache = DiskBlockCache(str(tmp_path / "cache"), 8 << 20)
    payload = b"sealed" * 5000
    assert cache.put_soon("k1", payload)
    assert cache.flush()
    (path,) = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    raw = bytearray(path.read_bytes())
    assert raw.endswith(payload)  # header, then the payload as given
    raw[-1] ^= 0xFF
    path.write_bytes(raw)
    assert cache.get("k1") is None  # damaged: dropped, never served
    assert not path.exists()


def test_the_background_queue_is_bounded(tmp_path: Path) -> None:
    # A reader faster than the cache disk must not queue blocks without end:
    # beyond `pending_limit` bytes waiting, a block is not cached at all.
    cache = DiskBlockCache(str(tmp_path / "cache"), 8 << 20, pending_limit=1000)
    assert not cache.put_soon("big", b"x" * 1001)
    assert cache.skipped == 1
    assert cache.put_soon("small", b"y" * 1000)
    assert cache.flush()
    assert cache.get("big") is None
    assert cache.get("small") == b"y" * 1000
    assert cache.size <= cache.capacity


def test_the_disk_cache_stays_within_its_capacity(tmp_path: Path) -> None:
    cache = DiskBlockCache(str(tmp_path / "cache"), 3 * 4200)
    blocks = {f"k{i}": bytes([i]) * 4000 for i in range(6)}
    for key, data in blocks.items():
        assert cache.put_soon(key, data)
        assert cache.flush()  # one at a time: the order of use is the order of puts
    assert cache.size <= cache.capacity
    assert [cache.get(k) is not None for k in blocks] == [False] * 3 + [True] * 3
    assert cache.get("k5") == blocks["k5"]
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) == 3


def test_a_cache_directory_is_made_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Caching a small file's block cost a makedirs (a stat and a mkdir) per
    # block: a fifth of the work. A directory the cache made is not asked for
    # again, and one removed behind its back is made anew.
    cache = DiskBlockCache(str(tmp_path / "cache"), 8 << 20)
    key = "blocks/00/k"
    cache.put(key, b"a" * 100)
    made: list[str] = []
    real = os.makedirs

    def counting(path: str, *args: object, **kwargs: object) -> None:
        made.append(path)
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "makedirs", counting)
    sub = os.path.dirname(os.path.join(cache.directory, DiskBlockCache._name(key)))
    for i in range(3):  # keys that land in the directory of `key`
        other = _beside(cache, key, f"k{i}-")
        cache.put(other, b"b" * 100)
        assert cache.get(other) == b"b" * 100
    assert made == []
    shutil.rmtree(sub)
    fresh = _beside(cache, key, "z")
    cache.put(fresh, b"c" * 100)
    assert cache.get(fresh) == b"c" * 100
    assert made == [sub]


def _beside(cache: DiskBlockCache, key: str, prefix: str) -> str:
    """A key whose cache file shares the directory of `key`'s."""
    want = DiskBlockCache._name(key)[:2]
    return next(
        k for n in itertools.count() if DiskBlockCache._name(k := f"{prefix}{n}")[:2] == want
    )
