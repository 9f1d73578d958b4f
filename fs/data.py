"""The data path of a mount: write buffers, the read path and chunk compaction.

Write buffers
-------------
A file's bytes live in immutable blocks, recorded by `CommitSlice` commands,
and a command costs a log append plus a wait for the fold. So writes are not
sent one by one: each inode open in this mount has an `InodeBuffer`, a list
of *extents* in the order they were started. An extent is a run of bytes
written but not yet committed, inside one chunk; it becomes one slice.

- A write that continues the newest extent (it starts inside that extent's
  still-mutable tail, or right at its end) is copied into it; anything else
  starts a new extent. Only the newest extent ever changes, so the creation
  order of extents is the order in which their bytes overlay one another,
  and committing them in that order reproduces exactly what the writer did.
- An extent is cut into blocks of the volume's block size. Once the end of
  the data has moved past a block, that block is *sealed*: it will never
  change again, so its upload to the local store starts in the background
  while writing continues. A later write into a sealed block starts a new
  extent instead of modifying it, which is what keeps blocks immutable
  (invariant 4) without ever re-uploading.
- An extent that reaches the end of its chunk is complete and is committed in
  the background, so a long sequential write streams: upload, commit, and the
  next chunk fill in parallel, with a bound on what may wait in memory.
- `flush` (fsync, close, the timer, truncate) freezes every extent and commits
  them, oldest first. Runs of small unsealed extents (the random writes of a
  database) are first coalesced in memory into disjoint runs, which are then
  uploaded and committed concurrently: overlap is resolved before it reaches
  the log, so the order among disjoint runs no longer matters, and the log's
  group commit turns them into few durable writes.

Blocks go to the writing region's store. With write-through (the mount's
`--write-through primary`), each block is also put into the primary region's
store, and a slice's command is appended only once both puts succeeded: a
reader at the primary never depends on the writer's region for those bytes,
and a failure of either store fails the flush (EIO) instead of acknowledging.

Extents stay in the buffer until their command has been applied to the
state, and a read snapshots them before it reads the state. Either the read
sees the commit in the state, or it overlays the same bytes from the buffer:
a process always reads its own writes, flushed or not.

Read windows
------------
A read maps its range onto the chunk's slices, newest first, subtracting
what newer slices already cover, so that bytes hidden by later writes are
never fetched; what no slice covers reads as zeros (holes, and the tail of a
file extended by truncate). Each needed block comes from the first of: the
memory cache, the disk cache, then the stores in the replica layer's order:
the local store, the block's home region, any other region (a fallback read,
counted, and written back locally). A block that fails its checksum is
never returned: the next copy is tried, and if none verifies the read fails
with EIO and a log line.

The blocks of one read are fetched in parallel. Sequential reads of an open
file grow a readahead window, one block at first and doubling on every read
that starts near where the furthest one ended (the kernel's readahead
sends several requests at once, and they arrive in any order), up to
`readahead_max`; the window's
blocks are fetched in the background into the memory cache, so a reader
streaming through a file finds its next blocks already local. A read at any
offset further away resets the window, so random access costs nothing extra.
Concurrent requests for one block share a single fetch.

Files removed while open here
-----------------------------
A file unlinked in another region while open in this mount is dropped by
the fold here too when that region reclaims it: the fold cannot know about
this mount's open files and stays the same everywhere. So just before the
fold drops an inode that a handle of this mount holds open, the mount keeps
its attributes and slice lists (`keep`, called from coherence.py), and reads
and fstat through the open handles go on from that snapshot until the last
of them is closed here. The blocks themselves stay in the stores for the
volume's retention period. Writes through such a handle fail with ESTALE:
nothing could ever commit them.

Allocated size
--------------
`st_blocks` counts what slices hold (holes excluded), as du expects: the
union of a file's slice ranges, clipped to its size, plus what is buffered.
getattr is a hot path, so the committed part is cached per inode and
forgotten whenever the fold changes that inode (`changed`).

Compaction
----------
Overwrites fragment a chunk into many slices, and every read then pays for
the planning and for blocks it mostly does not need. A commit that leaves a
chunk with `compact_threshold` slices or more makes it a candidate; once the
chunk has seen no commit for `compact_delay` seconds it is read, written as
one slice, and replaced with `CompactChunk(expected=the slice ids read)`. The
fold rejects that (ESTALE) if the chunk changed meanwhile, and the new blocks
are left to gc — which is why a chunk still being written is left alone: a
database rewriting pages would otherwise pay a whole-chunk rewrite for every
few pages, all of it thrown away.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidefs import telemetry
from tidefs.fs.cache import DiskBlockCache, MemoryBlockCache
from tidefs.journal import features
from tidefs.journal.commands import (
    CommitSlice,
    CompactChunk,
    Outcome,
    SliceRef,
    new_request_id,
)
from tidefs.replica.blocks import CorruptBlockError, StoreError, block_key, new_slice_id
from tidefs.replica.replica import RegionRemoved
from tidefs.replica.store import FileStore

if TYPE_CHECKING:
    from tidefs.journal.commands import Command
    from tidefs.replica.fetch import BlockFetcher
    from tidefs.replica.keys import Attr
    from tidefs.replica.state import State

log = logging.getLogger(__name__)

Submit = Callable[["Command", bytes], Outcome]
"""Append a command under a request id and return its outcome once applied here."""

UPLOAD_ATTEMPTS = 3
"""Tries of one block upload before the flush that needs it fails (EIO)."""

ALLOCATED_CACHE_MAX = 1 << 16
"""Inodes whose allocated size a mount remembers; past that the cache starts over."""


class DataError(Exception):
    """A data-path failure with the errno that the FUSE call should return."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class BlockUnavailable(DataError):
    """No region holds a verifiable copy of a block."""

    def __init__(self, key: str, corrupt: bool) -> None:
        why = "every copy failed verification" if corrupt else "no region has it"
        super().__init__(errno.EIO, f"block {key} unreadable: {why}")
        self.key = key
        self.corrupt = corrupt


# -- extents -----------------------------------------------------------------


@dataclass(eq=False)
class Extent:
    """Bytes written at [start, start + length) of one chunk, not yet committed."""

    chunk: int
    start: int
    block_size: int
    blocks: list[bytes | bytearray] = field(default_factory=list)
    length: int = 0
    sealed: int = 0
    frozen: bool = False
    slice_id: int = field(default_factory=new_slice_id)
    request_id: bytes = field(default_factory=new_request_id)
    uploads: dict[int, Future[None]] = field(default_factory=dict)
    first_write_ns: int = field(default_factory=time.monotonic_ns)
    last_write_ns: int = field(default_factory=time.time_ns)
    append: bool = False
    """O_APPEND bytes: `chunk` and `start` are 0, and the fold decides where they land."""

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def mutable_from(self) -> int:
        """The first file offset a write may still change in this extent."""
        return self.start + self.sealed * self.block_size

    def write(self, off: int, data: memoryview) -> None:
        """Copy `data` to file offset `off`, which lies in [mutable_from, end]."""
        bs = self.block_size
        pos = off - self.start
        i = 0
        while i < len(data):
            b, within = divmod(pos, bs)
            while b >= len(self.blocks):
                self.blocks.append(bytearray())
            blk = self.blocks[b]
            assert isinstance(blk, bytearray), "write into a sealed block"
            n = min(bs - within, len(data) - i)
            blk[within : within + n] = data[i : i + n]
            pos += n
            i += n
        self.length = max(self.length, pos)
        self.last_write_ns = time.time_ns()

    def seal_full(self) -> list[int]:
        """Seal every block the data has moved past; return their indexes."""
        if self.length == 0:
            return []
        last = (self.length - 1) // self.block_size
        newly = []
        while self.sealed < last:
            self.blocks[self.sealed] = bytes(self.blocks[self.sealed])
            newly.append(self.sealed)
            self.sealed += 1
        return newly

    def copy_range(self, lo: int, hi: int) -> bytes:
        """Return this extent's bytes at file offsets [lo, hi) (within the extent)."""
        bs = self.block_size
        parts = []
        pos = lo - self.start
        stop = hi - self.start
        while pos < stop:
            b, within = divmod(pos, bs)
            n = min(bs - within, stop - pos)
            parts.append(bytes(self.blocks[b][within : within + n]))
            pos += n
        return b"".join(parts)

    def payload(self, index: int) -> bytes:
        return bytes(self.blocks[index])


@dataclass(eq=False)
class Run:
    """One slice to commit: coalesced bytes, or a (partly uploaded) extent as it is."""

    chunk: int
    start: int
    data: Extent


class InodeBuffer:
    """The pending writes of one inode, and the locks that order their commits.

    `bytes`, `end` and `last_write_ns` are kept up to date under `lock`, so
    that getattr and the write path never walk a long list of extents.
    """

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self.extents: list[Extent] = []
        self.background: Future[None] | None = None
        self.bytes = 0
        self.end = 0
        """The end of the pending positional writes (appends have no place yet)."""
        self.appends = 0
        """How many pending extents are appends."""
        self.last_write_ns = 0

    def wrote(self, ext: Extent, grown: int) -> None:
        """Account for a write that grew `ext` by `grown` bytes (caller holds lock)."""
        self.bytes += grown
        if not ext.append:
            self.end = max(self.end, ext.end)
        self.last_write_ns = ext.last_write_ns

    def drop(self, done: list[Extent]) -> None:
        """Forget committed extents (caller holds lock)."""
        gone = set(map(id, done))
        self.extents = [e for e in self.extents if id(e) not in gone]
        self.bytes = sum(e.length for e in self.extents)
        self.end = max((e.end for e in self.extents if not e.append), default=0)
        self.appends = sum(1 for e in self.extents if e.append)

    def snapshot(self, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """Copy the pending bytes that overlap [lo, hi), oldest extent first."""
        out = []
        with self.lock:
            for e in self.extents:
                a, b = max(lo, e.start), min(hi, e.end)
                if a < b:
                    out.append((a, e.copy_range(a, b)))
        return out


# -- open files --------------------------------------------------------------


@dataclass(eq=False)
class OpenFile:
    """One open() of an inode in this mount, with its readahead state."""

    fh: int
    ino: int
    flags: int
    ra_next: int = -1
    ra_window: int = 0


@dataclass(frozen=True, slots=True)
class Kept:
    """An inode the fold dropped while this mount held it open: what its handles still read."""

    attr: Attr
    slices: dict[int, list[SliceRef]]


# -- the read plan -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes [within, within + n) of block `index` of `ref`, for output offset `dst`."""

    ref: SliceRef
    index: int
    within: int
    n: int
    dst: int


def visible(slices: Iterable[SliceRef], lo: int, hi: int) -> list[tuple[SliceRef, int, int]]:
    """Return the parts [a, b) of [lo, hi) (chunk offsets) each slice shows, newest on top.

    `slices` is oldest first, as the state returns them. Ranges no slice
    covers are absent from the result: they read as zeros.
    """
    covered: list[tuple[int, int]] = []  # disjoint, sorted
    out: list[tuple[SliceRef, int, int]] = []
    for s in reversed(list(slices)):
        a, b = max(lo, s.offset), min(hi, s.offset + s.length)
        if a >= b:
            continue
        cursor = a
        for c0, c1 in covered:
            if c1 <= cursor:
                continue
            if c0 >= b:
                break
            if c0 > cursor:
                out.append((s, cursor, c0))
            cursor = max(cursor, c1)
            if cursor >= b:
                break
        if cursor < b:
            out.append((s, cursor, b))
        covered = _merge(covered, a, b)
    return out


def _merge(intervals: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    placed = False
    for c0, c1 in intervals:
        if c1 < a:
            merged.append((c0, c1))
        elif c0 > b:
            if not placed:
                merged.append((a, b))
                placed = True
            merged.append((c0, c1))
        else:
            a, b = min(a, c0), max(b, c1)
    if not placed:
        merged.append((a, b))
    return merged


def covered_bytes(slices: Iterable[SliceRef], limit: int) -> int:
    """Return how many bytes of [0, limit) of a chunk the slices cover together."""
    total = 0
    reach = 0
    for start, end in sorted((s.offset, min(s.offset + s.length, limit)) for s in slices):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def coalesce(extents: list[Extent], block_size: int) -> list[Extent]:
    """Merge extents (oldest first; none sealed) into disjoint, non-adjacent runs per chunk.

    Later extents overwrite earlier ones where they overlap, so committing the
    result in any order gives the bytes that committing the inputs in order
    would. Adjacent runs of one chunk are joined: fewer, longer slices. Runs
    are kept sorted by start, so each extent finds its neighbours by bisection.
    """
    by_chunk: dict[int, tuple[list[int], list[bytearray]]] = {}
    for e in extents:
        starts, bufs = by_chunk.setdefault(e.chunk, ([], []))
        lo, hi = e.start, e.end
        data = bytearray(e.copy_range(lo, hi))
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or starts[i] + len(bufs[i]) < lo:
            i += 1  # the run before lo ends before it: it neither overlaps nor touches
        j = bisect.bisect_right(starts, hi)  # runs i..j-1 overlap or touch [lo, hi]
        if i < j:
            new_lo = min(lo, starts[i])
            new_hi = max(hi, starts[j - 1] + len(bufs[j - 1]))
            joined = bytearray(new_hi - new_lo)
            for k in range(i, j):
                joined[starts[k] - new_lo : starts[k] - new_lo + len(bufs[k])] = bufs[k]
            joined[lo - new_lo : hi - new_lo] = data  # the newer bytes win
            data, lo = joined, new_lo
        starts[i:j] = [lo]
        bufs[i:j] = [data]
    out = []
    for chunk, (starts, bufs) in sorted(by_chunk.items()):
        for start, buf in zip(starts, bufs, strict=True):
            ext = Extent(chunk=chunk, start=start, block_size=block_size, frozen=True)
            ext.write(start, memoryview(buf))
            out.append(ext)
    return out


# -- block fetching ----------------------------------------------------------


class BlockReader:
    """Verified block payloads for reads: memory cache, disk cache, then the regions' stores.

    The search across regions (local, home, any other; bounded waits; corrupt
    copies skipped; fallback reads counted and written back) is the replica
    layer's `BlockFetcher`, shared with the block replicator so that both
    follow one set of rules. This adds the caches in front of it and makes
    concurrent requests for one block share a single fetch. Thread-safe.
    """

    def __init__(
        self,
        remote: BlockFetcher,
        memory: MemoryBlockCache,
        disk: DiskBlockCache,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.remote = remote
        self.memory = memory
        self.disk = disk
        self.pool = pool
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[bytes]] = {}
        # A directory store is on this machine already, and blocks fetched from
        # other regions are written back into it: copying its blocks into the
        # disk cache as well doubles a cold read's I/O and buys nothing.
        local = remote.store(remote.local_region)
        self.use_disk = not (isinstance(local, FileStore) and remote.write_back)

    def _claim(self, key: str) -> tuple[Future[bytes], bool]:
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, False
            fut = Future[bytes]()
            self._inflight[key] = fut
            return fut, True

    def _run(self, key: str, ref: SliceRef, index: int, fut: Future[bytes]) -> None:
        try:
            data = self._load(key, ref, index)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(exc)
            return
        self.memory.put(key, data)
        with self._lock:
            self._inflight.pop(key, None)
        fut.set_result(data)

    def get(self, ref: SliceRef, index: int) -> bytes:
        """Return the payload of block `index` of `ref`; raise BlockUnavailable."""
        key = block_key(ref.slice_id, index)
        data = self.memory.get(key)
        if data is not None:
            telemetry.cache_hits.add(1, telemetry.attrs(level="memory"))
            return data
        fut, owner = self._claim(key)
        if owner:
            self._run(key, ref, index, fut)
        return fut.result()

    def start(self, ref: SliceRef, index: int) -> Future[bytes] | None:
        """Begin fetching a block in the background unless it is in memory already."""
        key = block_key(ref.slice_id, index)
        if self.memory.get(key) is not None:
            return None
        fut, owner = self._claim(key)
        if owner:
            self.pool.submit(self._run, key, ref, index, fut)
        return fut

    def _load(self, key: str, ref: SliceRef, index: int) -> bytes:
        if self.use_disk:
            data = self.disk.get(key)
            if data is not None:
                telemetry.cache_hits.add(1, telemetry.attrs(level="disk"))
                return data
        telemetry.cache_misses.add(1, telemetry.attrs())
        try:
            data = self.remote.get(ref, index)
        except CorruptBlockError as exc:
            log.error("block %s of slice %x: %s", key, ref.slice_id, exc)
            raise BlockUnavailable(key, True) from exc
        except StoreError as exc:
            log.error("block %s of slice %x (home %s): %s", key, ref.slice_id, ref.home, exc)
            raise BlockUnavailable(key, False) from exc
        if self.use_disk:
            # In the background: writing the cache file costs as much CPU as the
            # fetch (fs/cache.py), and the reader is waiting for this block.
            self.disk.put_soon(key, data)
        return data


# -- the data path -----------------------------------------------------------


class DataPath:
    """Write buffers, reads and compaction for one mount; every method is thread-safe.

    Methods block (store I/O, log appends): the FUSE layer calls them from
    worker threads, never from the event loop.
    """

    def __init__(
        self,
        *,
        state: State,
        submit: Submit,
        region: str,
        chunk_size: int,
        block_size: int,
        fetcher: BlockFetcher,
        disk_cache: DiskBlockCache,
        memory_cache_bytes: int = 128 << 20,
        flush_interval: float = 2.0,
        compact_threshold: int = 16,
        compact_delay: float = 5.0,
        readahead_max: int = 32 << 20,
        dirty_limit: int = 512 << 20,
        io_threads: int = 32,
        write_through: str | None = None,
        log_appends: bool = True,
    ) -> None:
        self.state = state
        # With False, O_APPEND writes stay writes at the kernel's offset even on a
        # volume that enabled log-placed appends (`log_appends`).
        self._log_appends = log_appends
        self.submit = submit
        self.region = region
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.remote = fetcher
        self.flush_interval = flush_interval
        self.compact_threshold = compact_threshold
        self.compact_delay = compact_delay
        self.readahead_max = max(readahead_max, block_size)
        self.dirty_limit = dirty_limit
        # The region (the primary) whose store must also hold every block
        # before its command is appended; None: the local store only.
        self.write_through = write_through if write_through != region else None
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="tidefs-io")
        self._submits = ThreadPoolExecutor(64, thread_name_prefix="tidefs-submit")
        self._background = ThreadPoolExecutor(4, thread_name_prefix="tidefs-commit")
        self.fetcher = BlockReader(
            fetcher, MemoryBlockCache(memory_cache_bytes), disk_cache, self._io
        )
        self._lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._open_count: dict[int, int] = {}
        self._buffers: dict[int, InodeBuffer] = {}
        self._fh = itertools.count(1)
        self._compacting: set[tuple[int, int]] = set()
        self._candidates: dict[tuple[int, int], float] = {}
        self._closed = False
        self._kept: dict[int, Kept] = {}
        self._alloc_lock = threading.Lock()
        self._allocated: dict[int, tuple[int, int]] = {}  # ino -> (size, bytes in slices)
        self._alloc_epoch = 0

    # -- open files ----------------------------------------------------------

    def open(self, ino: int, flags: int) -> int:
        """Register an open of `ino`; return its file handle."""
        with self._lock:
            fh = next(self._fh)
            self._files[fh] = OpenFile(fh, ino, flags)
            self._open_count[ino] = self._open_count.get(ino, 0) + 1
        return fh

    def inode_of(self, fh: int) -> int:
        """Return the inode of an open file handle (EBADF if unknown)."""
        of = self._files.get(fh)
        if of is None:
            raise DataError(errno.EBADF, f"unknown file handle {fh}")
        return of.ino

    def is_open(self, ino: int) -> bool:
        """Whether any handle of this mount has `ino` open."""
        with self._lock:
            return self._open_count.get(ino, 0) > 0

    def open_inodes(self) -> list[int]:
        with self._lock:
            return [ino for ino, n in self._open_count.items() if n > 0]

    def release(self, fh: int) -> tuple[int, bool]:
        """Flush and forget a handle; return (inode, whether it was the last in this mount)."""
        ino = self.inode_of(fh)
        try:
            self.flush(ino)
        finally:
            with self._lock:
                self._files.pop(fh, None)
                left = self._open_count.get(ino, 1) - 1
                if left > 0:
                    self._open_count[ino] = left
                else:
                    self._open_count.pop(ino, None)
                buf = self._buffers.get(ino)
                if left <= 0 and buf is not None and not buf.extents:
                    del self._buffers[ino]
                if left <= 0:
                    self._kept.pop(ino, None)
        return ino, left <= 0

    # -- files removed while open here (module doc) -------------------------------

    def holds(self, ino: int) -> bool:
        """Whether the fold dropping `ino` must leave it readable here (a handle has it open)."""
        return self.is_open(ino)

    def keep(self, ino: int) -> None:
        """Snapshot what the open handles of `ino` read, just before the fold drops it."""
        attr = self.state.getattr(ino)
        if attr is None or not attr.is_reg:
            return
        slices = {c: self.state.slices(ino, c) for c in self.state.chunks(ino)}
        with self._lock:
            if self._open_count.get(ino, 0) > 0:  # not closed meanwhile
                self._kept[ino] = Kept(attr, slices)

    def kept(self, ino: int) -> Attr | None:
        """The attributes of an inode gone from the state but still open here, else None."""
        k = self._kept.get(ino)
        return None if k is None else k.attr

    def attr(self, ino: int) -> Attr | None:
        """The attributes of `ino`: from the state, or kept for the handles that hold it."""
        attr = self.state.getattr(ino)
        if attr is None:
            return self.kept(ino)
        return attr

    def _slices(self, ino: int, chunk: int) -> list[SliceRef]:
        k = self._kept.get(ino)
        if k is not None:
            return k.slices.get(chunk, [])
        return self.state.slices(ino, chunk)

    # -- allocated size (module doc) ------------------------------------------------

    def changed(self, inodes: Iterable[int]) -> None:
        """The fold changed these inodes: forget their allocated sizes (folding thread).

        A kept inode that the fold did not drop after all (its Reclaim found
        it linked) is the state's again.
        """
        with self._alloc_lock:
            self._alloc_epoch += 1
            for ino in inodes:
                self._allocated.pop(ino, None)
                if ino in self._kept and self.state.getattr(ino) is not None:
                    self._kept.pop(ino, None)

    def allocated(self, attr: Attr) -> int:
        """Bytes of a regular file held by slices or buffered here (holes excluded).

        Committed ranges are counted once and clipped to the size; buffered
        bytes are added as they are (a rewrite may count twice until it
        commits; the caller clips the sum to the size).
        """
        ino, size = attr.ino, attr.size
        buf = self._buffers.get(ino)
        buffered = buf.bytes if buf is not None else 0
        if size <= 0:
            return buffered
        k = self._kept.get(ino)
        if k is not None:
            return self._count(k.slices.__getitem__, list(k.slices), size) + buffered
        with self._alloc_lock:
            hit = self._allocated.get(ino)
            epoch = self._alloc_epoch
        if hit is not None and hit[0] == size:
            return hit[1] + buffered
        # A file within one chunk (most files) needs no scan of its chunk keys.
        chunks = [0] if size <= self.chunk_size else self.state.chunks(ino)
        total = self._count(lambda c: self.state.slices(ino, c), chunks, size)
        with self._alloc_lock:
            # Stored only if no fold ran meanwhile: it may have changed this inode.
            if self._alloc_epoch == epoch:
                if len(self._allocated) >= ALLOCATED_CACHE_MAX:
                    self._allocated.clear()
                self._allocated[ino] = (size, total)
        return total + buffered

    def _count(
        self, slices: Callable[[int], list[SliceRef]], chunks: Iterable[int], size: int
    ) -> int:
        cs = self.chunk_size
        total = 0
        for c in chunks:
            limit = min(cs, size - c * cs)
            if limit > 0:
                total += covered_bytes(slices(c), limit)
        return total

    # -- writing ---------------------------------------------------------------

    def _buffer(self, ino: int) -> InodeBuffer:
        with self._lock:
            buf = self._buffers.get(ino)
            if buf is None:
                buf = self._buffers[ino] = InodeBuffer(ino)
            return buf

    @property
    def log_appends(self) -> bool:
        """Whether an O_APPEND write is an append the fold places (CommitSlice.append).

        The one switch between the two meanings of an O_APPEND write: an append
        placed at the end of the file at its log position, or (a volume that has
        not enabled the `append` feature, which older tidefs cannot read) a write
        at the offset the kernel passed, the size this mount knows.
        """
        return self._log_appends and features.APPEND in self.state.features().features

    def write(self, fh: int, off: int, data: bytes) -> int:
        """Buffer `data` at `off`; return len(data). Uploads and commits run behind.

        On a handle opened with O_APPEND (and `log_appends`), `off` is ignored:
        the kernel passes the size it knows, which another region's appends may
        already have overtaken, so the bytes become an append that the fold
        places at the end of the file.
        """
        of = self._files.get(fh)
        if of is None:
            raise DataError(errno.EBADF, f"unknown file handle {fh}")
        ino = of.ino
        if ino in self._kept:
            raise DataError(errno.ESTALE, f"inode {ino} was removed in another region")
        appending = bool(of.flags & os.O_APPEND) and self.log_appends
        buf = self._buffer(ino)
        view = memoryview(data)
        cs = self.chunk_size
        to_upload: list[tuple[Extent, int]] = []
        commit_behind = False
        with buf.lock:
            pos, i = off, 0
            while i < len(view):
                if appending:
                    ext = self._append_extent(buf)
                    chunk, pos = 0, ext.end
                else:
                    chunk = pos // cs
                    ext = self._extent_for(buf, chunk, pos)
                n = min(len(view) - i, (chunk + 1) * cs - pos)
                before = ext.length
                ext.write(pos, view[i : i + n])
                buf.wrote(ext, ext.length - before)
                to_upload.extend((ext, b) for b in ext.seal_full())
                if ext.end == (chunk + 1) * cs:
                    # A complete chunk (an append as long as one): commit it behind the writer.
                    ext.frozen = True
                    commit_behind = True
                pos += n
                i += n
            dirty = buf.bytes
            if commit_behind and buf.background is None:
                buf.background = self._background.submit(self._commit_behind, buf)
        for ext, b in to_upload:
            ext.uploads[b] = self._io.submit(self._upload, ext.slice_id, b, ext.payload(b))
        if dirty > min(self.dirty_limit, 2 * cs + self.block_size):
            # Backpressure: a writer far ahead of its commits waits for them here,
            # for the chunks committing behind it if any, else by flushing.
            background = buf.background
            if background is not None:
                background.result()
            if buf.bytes > min(self.dirty_limit, 2 * cs + self.block_size):
                self.flush(ino)
        return len(data)

    def _append_extent(self, buf: InodeBuffer) -> Extent:
        """Return the newest extent if it is an open append, else start one (caller holds lock)."""
        last = buf.extents[-1] if buf.extents else None
        if last is not None and last.append and not last.frozen:
            return last
        if last is not None:
            last.frozen = True
        ext = Extent(chunk=0, start=0, block_size=self.block_size, append=True)
        buf.extents.append(ext)
        buf.appends += 1
        return ext

    def _extent_for(self, buf: InodeBuffer, chunk: int, pos: int) -> Extent:
        last = buf.extents[-1] if buf.extents else None
        if (
            last is not None
            and not last.frozen
            and not last.append
            and last.chunk == chunk
            and last.mutable_from <= pos <= last.end
        ):
            return last
        if last is not None:
            last.frozen = True  # only the newest extent may change: that keeps overlay order
        ext = Extent(chunk=chunk, start=pos, block_size=self.block_size)
        buf.extents.append(ext)
        return ext

    def pending(self, ino: int) -> tuple[int, int] | None:
        """Return (end of pending data, time of the last pending write in ns), or None.

        With appends pending, the end is where they will have taken the file
        as far as this mount knows: the state's size plus those not folded yet.
        """
        buf = self._buffers.get(ino)
        if buf is None:
            return None
        with buf.lock:
            if not buf.extents:
                return None
            if not buf.appends:
                return buf.end, buf.last_write_ns
            last_ns = buf.last_write_ns
        _placed, end = self._layout(buf)
        return end, last_ns

    def _layout(self, buf: InodeBuffer) -> tuple[list[tuple[Extent, int, int]], int]:
        """Place the pending extents of `buf` in the file: ([(extent, offset, length)], end).

        An append not folded yet goes at the end of the file as the state
        has it plus the appends and writes before it; a folded one is left
        out, because the same snapshot's size already counts it (see
        `State.size_and_outcomes`). So a read sees each appended byte once,
        with no gap, before and after the fold moves it to its final place.
        """
        with buf.lock:
            exts = [(e, e.length) for e in buf.extents]
        size, folded = self.state.size_and_outcomes(
            buf.ino, [e.request_id for e, _n in exts if e.append]
        )
        end = size or 0
        placed: list[tuple[Extent, int, int]] = []
        appends = iter(folded)
        for e, n in exts:
            if e.append:
                if next(appends):
                    continue
                placed.append((e, end, n))
                end += n
            else:
                placed.append((e, e.start, n))
                end = max(end, e.start + n)
        return placed, end

    def flush(self, ino: int) -> None:
        """Commit every write of `ino` made before this call; raise DataError on failure."""
        buf = self._buffers.get(ino)
        if buf is None:
            return
        with buf.lock:
            if not buf.extents:
                return
            for e in buf.extents:
                e.frozen = True
            upto = buf.extents[-1]
        with buf.commit_lock:
            while True:
                with buf.lock:
                    if upto not in buf.extents:
                        break
                self._commit_leading(buf)
        self.forget_idle(ino)  # a timed flush after the last close leaves nothing behind

    def flush_all(self) -> list[tuple[int, DataError]]:
        """Flush every inode; return the failures instead of stopping at the first."""
        failures = []
        for ino in list(self._buffers):
            try:
                self.flush(ino)
            except DataError as exc:
                failures.append((ino, exc))
        return failures

    def due(self) -> list[int]:
        """Inodes whose oldest pending write is older than the flush interval."""
        limit = time.monotonic_ns() - int(self.flush_interval * 1e9)
        out = []
        for ino, buf in list(self._buffers.items()):
            with buf.lock:
                if buf.extents and buf.extents[0].first_write_ns <= limit:
                    out.append(ino)
        return out

    def forget_idle(self, ino: int) -> None:
        """Drop an empty buffer of an inode no handle has open."""
        with self._lock:
            buf = self._buffers.get(ino)
            if buf is not None and not buf.extents and self._open_count.get(ino, 0) == 0:
                del self._buffers[ino]

    def _commit_behind(self, buf: InodeBuffer) -> None:
        """Commit completed chunks while the writer goes on (runs on a background thread)."""
        while True:
            with buf.lock:
                if not (buf.extents and buf.extents[0].frozen):
                    buf.background = None
                    return
            try:
                with buf.commit_lock:
                    self._commit_leading(buf)
            except Exception as exc:
                # The extents stay buffered; the next flush retries and reports.
                log.warning("background commit of inode %d failed: %s", buf.ino, exc)
                with buf.lock:
                    buf.background = None
                return

    def _commit_leading(self, buf: InodeBuffer) -> None:
        """Commit the leading frozen extents of `buf`, in order; caller holds commit_lock."""
        with buf.lock:
            batch = list(itertools.takewhile(lambda e: e.frozen, buf.extents))
        if not batch:
            return
        for group, runs in self._plan(batch):
            try:
                self._commit_runs(buf.ino, runs)
            except DataError as exc:
                if exc.errno != errno.EIO:
                    # The fold refused the commit (the file is gone, the range
                    # is invalid): retrying cannot succeed. Report it once.
                    with buf.lock:
                        buf.drop(group)
                raise
            with buf.lock:
                buf.drop(group)
            chunks = {r.chunk for r in runs if not r.data.append}
            if len(chunks) < len(runs):
                # An append landed at the end of the file, wherever that was.
                attr = self.state.getattr(buf.ino)
                if attr is not None and attr.size > 0:
                    chunks.add((attr.size - 1) // self.chunk_size)
            self._after_commit(buf.ino, chunks)

    def _plan(self, batch: list[Extent]) -> list[tuple[list[Extent], list[Run]]]:
        """Split extents into groups committed in order; each group's runs are disjoint."""
        plan: list[tuple[list[Extent], list[Run]]] = []
        small: list[Extent] = []
        for e in batch:
            if e.sealed or e.uploads or e.append:
                if small:
                    runs = [Run(c.chunk, c.start, c) for c in coalesce(small, self.block_size)]
                    plan.append((small, runs))
                    small = []
                plan.append(([e], [Run(e.chunk, e.start, e)]))
            else:
                small.append(e)
        if small:
            if len(small) == 1:
                plan.append((small, [Run(small[0].chunk, small[0].start, small[0])]))
            else:
                runs = [Run(c.chunk, c.start, c) for c in coalesce(small, self.block_size)]
                plan.append((small, runs))
        return plan

    def _commit_runs(self, ino: int, runs: list[Run]) -> None:
        if len(runs) == 1:
            self._commit_run(ino, runs[0])
            return
        futures = [self._submits.submit(self._commit_run, ino, r) for r in runs]
        errors = [f.exception() for f in futures]
        for exc in errors:
            if exc is not None:
                raise exc

    def _commit_run(self, ino: int, run: Run) -> None:
        ext = run.data
        nblocks = (ext.length + self.block_size - 1) // self.block_size
        pending = []
        missing = []
        for b in range(nblocks):
            fut = ext.uploads.get(b)
            if fut is None or (fut.done() and fut.exception() is not None):
                missing.append(b)
            else:
                pending.append(fut)
        for b in missing[:-1]:
            fut = ext.uploads[b] = self._io.submit(self._upload, ext.slice_id, b, ext.payload(b))
            pending.append(fut)
        if missing:
            # This thread uploads the last block itself: the one block of a small
            # flush (an fsync after a page write) then waits for no hand-over to
            # the I/O pool and back (0.1-0.6 ms of an overwrite's 10 on S3).
            b = missing[-1]
            fut = ext.uploads[b] = Future()
            try:
                self._upload(ext.slice_id, b, ext.payload(b))
            except Exception as error:
                fut.set_exception(error)
            else:
                fut.set_result(None)
            pending.append(fut)
        for fut in pending:
            exc = fut.exception()
            if exc is not None:
                raise DataError(errno.EIO, f"upload failed: {exc}") from exc
        ref = SliceRef(
            slice_id=ext.slice_id,
            offset=ext.start - ext.chunk * self.chunk_size,
            length=ext.length,
            block_size=self.block_size,
            home=self.region,
        )
        command = CommitSlice(inode=ino, chunk_index=ext.chunk, slice=ref, append=ext.append)
        outcome = self._submit(command, ext)
        if outcome.errno == errno.ENOENT:
            # The file is open here, so it existed: another region removed it since.
            raise DataError(errno.ESTALE, f"inode {ino} was removed in another region")
        if not outcome.ok:
            raise DataError(outcome.errno, f"CommitSlice of inode {ino} rejected")
        telemetry.slices_committed.add(1, telemetry.attrs())

    def _submit(self, command: Command, ext: Extent) -> Outcome:
        try:
            return self.submit(command, ext.request_id)
        except DataError:
            raise
        except RegionRemoved as exc:
            raise DataError(errno.EROFS, str(exc)) from exc
        except Exception as exc:
            log.error("cannot commit to the log: %s", exc)
            raise DataError(errno.EIO, f"log unavailable: {exc}") from exc

    def _upload(self, slice_id: int, index: int, payload: bytes) -> None:
        """Store one block locally and, with write-through, in the primary's store too.

        Both puts finish before the upload's future does, and a commit waits
        for every upload of its slice: so with write-through, a block is in
        the primary's store before the command that references it is in the
        log, and a reader at the primary never needs a fallback for it.
        """
        key = block_key(slice_id, index)
        self._put(self.region, key, payload)
        if self.write_through is not None:
            self._put(self.write_through, key, payload)
        telemetry.blocks_uploaded.add(1, telemetry.attrs())
        telemetry.bytes_uploaded.add(len(payload), telemetry.attrs())
        # What was just written is the likeliest to be read next: keep it on disk
        # (a directory store holds it on this machine already).
        if self.fetcher.use_disk:
            self.fetcher.disk.put(key, payload)

    def _put(self, region: str, key: str, payload: bytes) -> None:
        """Put one block into `region`'s store, with a few tries; raise when all fail."""
        store = self.remote.store(region)
        if store is None:
            raise DataError(errno.EIO, f"region {region} has no block store")
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                # Through the fetcher: bounded by its timeout, and region health is shared.
                self.remote.call(region, store.put_block, key, payload)
                return
            except Exception as exc:
                if attempt == UPLOAD_ATTEMPTS - 1:
                    log.error("upload of %s to region %s failed: %s", key, region, exc)
                    raise
                time.sleep(0.1 * 2**attempt)

    # -- reading ---------------------------------------------------------------

    def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        """Return up to `size` bytes at `off` of an open file: committed, then pending.

        The result is any contiguous buffer (pyfuse3 replies from the buffer
        protocol): a read within one cached block is a view of it, no copy.
        """
        of = self._files.get(fh)
        if of is None:
            raise DataError(errno.EBADF, f"unknown file handle {fh}")
        buf = self._buffers.get(of.ino)
        if buf is not None and buf.appends:
            # An append not folded yet has no final place: shown where the end is
            # now, a later read (after the fold put another region's bytes first)
            # would find it further on and a reader reading in steps would see it
            # twice. So a read commits this mount's appends first and reads them
            # where they landed; only appends written during the read are laid out.
            self.flush(of.ino)
        if buf is not None and buf.appends:
            overlays, appended_end = self._append_overlays(buf, off, off + size)
        else:
            overlays = buf.snapshot(off, off + size) if buf is not None else []
            appended_end = None
        pend = self.pending(of.ino) if appended_end is None else None
        attr = self.attr(of.ino)
        if attr is None:
            raise DataError(errno.ESTALE, f"inode {of.ino} is gone")
        if appended_end is not None:
            # Not the state's size now: an append folded since the layout would be
            # read twice, from the state and from the buffer.
            file_size = appended_end
        else:
            file_size = max(attr.size, pend[0] if pend else 0, *(a + len(b) for a, b in overlays))
        end = min(off + size, file_size)
        if end <= off:
            return b""
        pieces = self._plan_read(of.ino, off, end)
        started = self._start(pieces)
        self._readahead(of, off, end, file_size)  # queued behind this read's own blocks
        if not overlays and len(pieces) == 1 and pieces[0].n == end - off:
            p = pieces[0]
            data = self._block(p, started)
            return memoryview(data)[p.within : p.within + p.n]
        out = bytearray(end - off)
        self._collect(out, pieces, started)
        for start, data in overlays:
            a = max(start, off)
            b = min(start + len(data), end)
            if a < b:
                out[a - off : b - off] = data[a - start : b - start]
        return out

    def _append_overlays(
        self, buf: InodeBuffer, lo: int, hi: int
    ) -> tuple[list[tuple[int, bytes]], int]:
        """Pending bytes over [lo, hi) with appends placed (`_layout`), oldest first; and the end."""
        placed, end = self._layout(buf)
        out = []
        with buf.lock:
            for e, at, n in placed:
                a, b = max(lo, at), min(hi, at + n)
                if a < b:
                    out.append((a, e.copy_range(e.start + a - at, e.start + b - at)))
        return out, end

    def read_cached(self, fh: int, off: int, size: int) -> bytes | memoryview | None:
        """Return `read`'s answer when it needs no I/O and no wait, else None.

        For the event loop: a read that lies within one block already in the
        memory cache (what readahead fetched) is a view of it, answered with
        no trip to a worker thread and back (two thread switches per request,
        a third of a cold sequential read's CPU). Pending writes, a block not
        in memory, or anything unusual: None, and the caller uses `read`.
        """
        of = self._files.get(fh)
        if of is None or self.pending(of.ino) is not None:
            return None
        attr = self.attr(of.ino)
        if attr is None:
            return None
        end = min(off + size, attr.size)
        if end <= off:
            return b""
        cs = self.chunk_size
        if off // cs != (end - 1) // cs:
            return None
        pieces = self._plan_read(of.ino, off, end)
        if len(pieces) != 1 or pieces[0].n != end - off:
            return None
        p = pieces[0]
        data = self.fetcher.memory.get(block_key(p.ref.slice_id, p.index))
        if data is None or len(data) < p.within + p.n:
            return None
        telemetry.cache_hits.add(1, telemetry.attrs(level="memory"))
        self._readahead(of, off, end, attr.size)  # queues fetches: never waits
        return memoryview(data)[p.within : p.within + p.n]

    def _plan_read(
        self, ino: int, lo: int, hi: int, slices: dict[int, list[SliceRef]] | None = None
    ) -> list[Piece]:
        """Map file range [lo, hi) to block pieces (output offsets relative to lo)."""
        cs = self.chunk_size
        pieces: list[Piece] = []
        for chunk in range(lo // cs, (hi - 1) // cs + 1):
            base = chunk * cs
            a, b = max(lo, base) - base, min(hi, base + cs) - base
            refs = slices[chunk] if slices is not None else self._slices(ino, chunk)
            for ref, p, q in visible(refs, a, b):
                bs = ref.block_size
                pos = p - ref.offset
                stop = q - ref.offset
                while pos < stop:
                    index, within = divmod(ref.skip + pos, bs)
                    n = min(bs - within, stop - pos)
                    dst = base + ref.offset + pos - lo
                    pieces.append(Piece(ref, index, within, n, dst))
                    pos += n
        return pieces

    def _fill(self, out: bytearray, pieces: list[Piece]) -> None:
        """Copy every piece into `out`, fetching distinct blocks in parallel."""
        self._collect(out, pieces, self._start(pieces))

    def _start(self, pieces: list[Piece]) -> dict[tuple[int, int], Future[bytes] | None]:
        """Start background fetches of every block but the first (this thread fetches that)."""
        started: dict[tuple[int, int], Future[bytes] | None] = {}
        first = (pieces[0].ref.slice_id, pieces[0].index) if pieces else None
        for p in pieces:
            k = (p.ref.slice_id, p.index)
            if k != first and k not in started:
                started[k] = self.fetcher.start(p.ref, p.index)
        return started

    def _collect(
        self,
        out: bytearray,
        pieces: list[Piece],
        started: dict[tuple[int, int], Future[bytes] | None],
    ) -> None:
        for p in pieces:
            data = self._block(p, started)
            out[p.dst : p.dst + p.n] = memoryview(data)[p.within : p.within + p.n]

    def _block(self, p: Piece, started: dict[tuple[int, int], Future[bytes] | None]) -> bytes:
        """Return the verified payload of the block a piece reads from."""
        fut = started.get((p.ref.slice_id, p.index))
        data = fut.result() if fut is not None else self.fetcher.get(p.ref, p.index)
        if len(data) < p.within + p.n:
            key = block_key(p.ref.slice_id, p.index)
            log.error("block %s holds %d bytes, the slice needs %d", key, len(data), p.within + p.n)
            raise DataError(errno.EIO, f"short block {key}")
        return data

    def _readahead(self, of: OpenFile, off: int, end: int, file_size: int) -> None:
        # The kernel's own readahead sends several requests at once and they reach
        # this thread pool in any order: a read that starts within the window (or
        # one block) of where the furthest read ended is still sequential. Only a
        # read further away resets the window.
        near = of.ra_next >= 0 and abs(off - of.ra_next) <= max(of.ra_window, self.block_size)
        if near:
            of.ra_window = min(max(2 * of.ra_window, self.block_size), self.readahead_max)
            of.ra_next = max(of.ra_next, end)
        else:
            of.ra_window = 0
            of.ra_next = end
        start = of.ra_next
        if of.ra_window == 0 or start >= file_size:
            return
        try:
            ahead = self._plan_read(of.ino, start, min(start + of.ra_window, file_size))
        except Exception as exc:  # readahead is a hint: never fail a read for it
            log.debug("readahead planning failed: %s", exc)
            return
        seen = set()
        for p in ahead:
            k = (p.ref.slice_id, p.index)
            if k not in seen:
                seen.add(k)
                self.fetcher.start(p.ref, p.index)

    # -- compaction ------------------------------------------------------------

    def _after_commit(self, ino: int, chunks: set[int]) -> None:
        """Note chunks fragmented enough to compact; `compact_due` runs them once quiet."""
        if self.compact_threshold <= 0:
            return
        now = time.monotonic()
        for chunk in chunks:
            if self.state.slice_count(ino, chunk, self.compact_threshold) >= self.compact_threshold:
                with self._lock:
                    self._candidates[(ino, chunk)] = now

    def compact_due(self) -> int:
        """Start compacting one candidate chunk untouched for `compact_delay`; never blocks.

        Compacting a chunk that is still being written is wasted work (the fold
        rejects it as stale) and competes with the writer, so a chunk waits
        until its writes pause; and one compaction runs at a time, because each
        may rewrite a whole chunk.
        """
        now = time.monotonic()
        with self._lock:
            if self._compacting or self._closed:
                return 0
            for key, touched in sorted(self._candidates.items(), key=lambda kv: kv[1]):
                if now - touched < self.compact_delay:
                    break
                del self._candidates[key]
                self._compacting.add(key)
                self._background.submit(self._compact_task, *key)
                return 1
        return 0

    def _compact_task(self, ino: int, chunk: int) -> None:
        try:
            result = self.compact(ino, chunk)
            telemetry.compactions.add(1, telemetry.attrs(result=result))
        except Exception as exc:
            telemetry.compactions.add(1, telemetry.attrs(result="failed"))
            log.warning("compaction of inode %d chunk %d failed: %s", ino, chunk, exc)
        finally:
            with self._lock:
                self._compacting.discard((ino, chunk))

    def compact(self, ino: int, chunk: int) -> str:
        """Rewrite one chunk as a single slice; return what happened (a metric label)."""
        buf = self._buffers.get(ino)
        if buf is not None:
            with buf.lock:
                if any(e.chunk == chunk or e.append for e in buf.extents):
                    return "busy"  # pending writes will commit and ask again
        refs = self.state.slices(ino, chunk)
        attr = self.state.getattr(ino)
        if attr is None or len(refs) < 2:
            return "skipped"
        base = chunk * self.chunk_size
        chunk_len = min(self.chunk_size, attr.size - base)
        lo = min(r.offset for r in refs)
        hi = min(max(r.offset + r.length for r in refs), chunk_len)
        if hi <= lo:
            return "skipped"
        data = bytearray(hi - lo)
        self._fill(data, self._plan_read(ino, base + lo, base + hi, {chunk: refs}))
        ext = Extent(chunk=chunk, start=base + lo, block_size=self.block_size, frozen=True)
        ext.write(base + lo, memoryview(data))
        futures = [
            self._io.submit(self._upload, ext.slice_id, b, ext.payload(b))
            for b in range(len(ext.blocks))
        ]
        for f in futures:
            f.result()
        ref = SliceRef(ext.slice_id, lo, hi - lo, self.block_size, self.region)
        command = CompactChunk(
            inode=ino, chunk_index=chunk, expected=tuple(r.slice_id for r in refs), slice=ref
        )
        outcome = self._submit(command, ext)
        if outcome.errno == errno.ESTALE:
            log.debug("compaction of inode %d chunk %d lost a race", ino, chunk)
            return "stale"
        if not outcome.ok:
            return f"errno-{outcome.errno}"
        return "ok"

    # -- shutdown --------------------------------------------------------------

    def close(self) -> list[tuple[int, DataError]]:
        """Flush everything, then stop the thread pools; return flush failures."""
        failures = self.flush_all()
        with self._lock:
            self._closed = True
        self._background.shutdown(wait=True)
        self._submits.shutdown(wait=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        self.fetcher.disk.flush()  # a clean unmount keeps every block its reads fetched
        return failures
