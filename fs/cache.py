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
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
from collections import OrderedDict

from tidefs.replica.blocks import CorruptBlockError, seal, unseal

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

    def __init__(self, directory: str, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> size
        self._bytes = 0
        self._tmp = itertools.count()
        if capacity > 0:
            os.makedirs(directory, exist_ok=True)
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

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (atomically: a reader sees all of it or nothing)."""
        if self.capacity <= 0 or len(data) > self.capacity:
            return
        name = self._name(key)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return
        path = os.path.join(self.directory, name)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{next(self._tmp)}.tmp"
        sealed = seal(data)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(sealed)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or failing cache disk costs speed, never correctness.
            log.warning("cannot cache block %s: %s", key, exc)
            _unlink_quietly(tmp)
            return
        with self._lock:
            if name not in self._index:
                self._index[name] = len(sealed)
                self._bytes += len(sealed)
            victims = self._evict_locked()
        for victim in victims:
            _unlink_quietly(os.path.join(self.directory, victim))

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


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
