"""Block caches of a mount: a small one in memory and a large one on local disk.

Blocks are immutable (invariant 4), so a cached block is never stale: a key
names the same bytes forever, and neither cache needs invalidation. What they
need is a bound. Both are LRU by bytes.

The memory cache exists because the kernel asks for at most a megabyte per
read while a block is up to 4 MiB: without it, one sequential pass over a block
would load it from disk (or the network) four times or more. The disk cache
exists because a store read is a network round trip in the distributed setup;
it survives remounts, which is what makes a second epoch over a dataset local.

On disk, each block is kept in its sealed form (`tidefs.replica.blocks.seal`),
so that the same checksum that guards the stores guards the cache: a damaged
cache file is dropped and refetched, never served.

A read does not write the disk cache itself: `put_soon` hands the verified
block to one background writer and returns. Writing a fresh 4 MiB file costs
about as much CPU as fetching the block from a fast S3 endpoint, so on the
read path it halved a cold sequential read. What waits for the writer is
bounded (`pending_limit` bytes); a block that would exceed it is not cached
at all (counted in `skipped`): the cache is a speed-up, and a reader outrunning
the cache disk must not turn it into a queue without end. A block still
waiting is served from the queue, so `get` never misses what `put_soon` took.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque

from tidefs import private
from tidefs.replica.blocks import CorruptBlockError, block_header, unseal

log = logging.getLogger(__name__)


class MemoryBlockCache:
    """An LRU map of block key -> payload, bounded by total payload bytes; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        """Return the cached payload of `key`, or None."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        """Remember `data` under `key`, evicting the least recently used beyond capacity."""
        if len(data) > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    @property
    def size(self) -> int:
        """Bytes currently held."""
        return self._bytes


class DiskBlockCache:
    """An LRU directory of sealed blocks, bounded by total file bytes; thread-safe.

    The index lives in memory and is rebuilt from the directory when the cache
    opens (oldest modification first), so a remount keeps what it had.
    """

    def __init__(self, directory: str, capacity: int, pending_limit: int = 64 << 20) -> None:
        self.directory = directory
        self.capacity = capacity
        self.pending_limit = pending_limit
        self.skipped = 0
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> size
        self._bytes = 0
        self._tmp = itertools.count()
        # put_soon's blocks not yet in the index: key -> payload, and their total bytes
        self._pending: dict[str, bytes] = {}
        self._pending_bytes = 0
        self._queue: deque[str] = deque()  # the keys of _pending that nobody writes yet
        self._wake = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._made: set[str] = set()  # subdirectories known to exist
        if capacity > 0:
            private.makedirs(directory)
            self._load_index()

    def _load_index(self) -> None:
        found: list[tuple[float, str, int]] = []
        for sub in os.scandir(self.directory):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(".tmp"):
                    # a write interrupted by a crash: never renamed, never valid
                    _unlink_quietly(entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, os.path.join(sub.name, entry.name), st.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self._bytes += size
        self._evict()

    @staticmethod
    def _name(key: str) -> str:
        digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
        return os.path.join(digest[:2], digest[2:])

    def get(self, key: str) -> bytes | None:
        """Return the verified payload of `key`, or None when absent or damaged."""
        if self.capacity <= 0:
            return None
        name = self._name(key)
        with self._lock:
            queued = self._pending.get(key)
            if queued is not None:
                return queued
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            return unseal(key, raw)
        except FileNotFoundError:
            self._forget(name)
            return None
        except (OSError, CorruptBlockError) as exc:
            log.warning("dropping damaged cache file for %s: %s", key, exc)
            self._forget(name)
            _unlink_quietly(path)
            return None

    def put_soon(self, key: str, data: bytes) -> bool:
        """Store `data` under `key` in the background; False when it is not cached at all.

        The caller must not change `data` afterwards. A block already cached or
        queued is only marked recently used; one that would take the queue
        beyond `pending_limit` bytes is skipped.
        """
        if self.capacity <= 0 or len(data) > self.capacity:
            return False
        name = self._name(key)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return True
            if key in self._pending:
                return True
            if self._pending_bytes + len(data) > self.pending_limit:
                self.skipped += 1
                return False
            self._pending[key] = data
            self._pending_bytes += len(data)
            self._queue.append(key)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_pending, name="tidefs-cache-writer", daemon=True
                )
                self._writer.start()
            self._wake.notify()
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Write every block `put_soon` took, on this thread too; False if not all are in time.

        The caller does the writing rather than wait for the writer, whose low
        priority could leave it without CPU on a busy machine (an unmount would
        then wait on it).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._queue:
                    # What is left is the writer's current block, if any.
                    return self._wake.wait_for(
                        lambda: not self._pending, max(0.0, deadline - time.monotonic())
                    )
                key = self._queue.popleft()
                data = self._pending[key]
            self._write_one(key, data)
            if time.monotonic() > deadline:
                with self._lock:
                    return not self._pending

    def _write_pending(self) -> None:
        # The lowest CPU priority (Linux: per thread): the cache is filled with the
        # CPU that reads leave over, and when there is none the queue fills and
        # further blocks are skipped, instead of slowing the read that fetched them.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            with self._lock:
                self._wake.wait_for(lambda: bool(self._queue))
                key = self._queue.popleft()
                data = self._pending[key]
            self._write_one(key, data)

    def _write_one(self, key: str, data: bytes) -> None:
        try:
            self.put(key, data)
        except Exception as exc:  # the writer must outlive any one block
            log.warning("cannot cache block %s: %s", key, exc)
        finally:
            with self._lock:
                # Only now: until the file is in the index, `get` serves the queue.
                del self._pending[key]
                self._pending_bytes -= len(data)
                self._wake.notify_all()

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` now (atomically: a reader sees all of it or nothing)."""
        if self.capacity <= 0 or len(data) > self.capacity:
            return
        name = self._name(key)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return
        path = os.path.join(self.directory, name)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{next(self._tmp)}.tmp"
        header = block_header(data)
        sealed_size = len(header) + len(data)
        try:
            fd = self._create(tmp)
            try:
                _write_all(fd, header, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or failing cache disk costs speed, never correctness.
            log.warning("cannot cache block %s: %s", key, exc)
            _unlink_quietly(tmp)
            return
        with self._lock:
            if name not in self._index:
                self._index[name] = sealed_size
                self._bytes += sealed_size
            victims = self._evict_locked()
        for victim in victims:
            _unlink_quietly(os.path.join(self.directory, victim))

    def _create(self, tmp: str) -> int:
        """Open a new temporary file, making its directory the first time only.

        The cache never removes its directories, so one known to exist is not
        asked for again: a makedirs per block cost a stat and a mkdir, a fifth
        of what caching a small file's block costs.
        """
        directory = os.path.dirname(tmp)
        if directory not in self._made:
            os.makedirs(directory, mode=private.DIR_MODE, exist_ok=True)
            self._made.add(directory)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, private.FILE_MODE)
        except FileNotFoundError:  # removed behind our back: make it again
            os.makedirs(directory, mode=private.DIR_MODE, exist_ok=True)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, private.FILE_MODE)

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._bytes -= size

    def _evict_locked(self) -> list[str]:
        victims = []
        while self._bytes > self.capacity and self._index:
            name, size = self._index.popitem(last=False)
            self._bytes -= size
            victims.append(name)
        return victims

    def _evict(self) -> None:
        with self._lock:
            victims = self._evict_locked()
        for victim in victims:
            _unlink_quietly(os.path.join(self.directory, victim))

    @property
    def size(self) -> int:
        """Bytes of cache files currently indexed."""
        return self._bytes


def _write_all(fd: int, header: bytes, payload: bytes) -> None:
    """Write header then payload to `fd` without joining them (writev may write less)."""
    done = os.writev(fd, [header, payload])
    total = len(header) + len(payload)
    if done < len(header):
        os.write(fd, header[done:])
        done = len(header)
    view = memoryview(payload)
    while done < total:
        done += os.write(fd, view[done - len(header) :])


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
