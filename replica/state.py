"""A region's state of one volume: RocksDB, written only by folding the log.

`State` is the one owner of a region's RocksDB directory. The write side is
`apply`, which folds a batch of (offset, envelope) records and commits the
changes of all of them, the new applied offset and the new digest in ONE
RocksDB write batch (invariant 3): a crash anywhere leaves the state at the
end of some earlier batch, never between two records or in the middle of
one. Records at or below the applied offset are skipped, so re-delivery is
harmless.

The write batch goes through RocksDB's WAL but is not fsynced: the log is the
source of truth, so a machine crash that loses the last batches only rewinds
the applied offset, and the fold reads those records again. A killed process
loses nothing, since the WAL write reached the kernel before `apply` returned.

Within a batch, records see the writes of the records before them through an
overlay (`_Batch`) in front of the database; the digest is updated on every
put and delete from the value it replaces. Outcomes of old requests leave in
whole generations (see fold.py): one range deletion, and the generation's
share of the digest, kept in meta, subtracted at once. A small cache of values read or
written by earlier batches serves the fold's hot keys (the volume record,
busy directories); only the single writer fills it, under the directory's
exclusive lock, so it is never stale.

The read side (`getattr`, `lookup`, `readdir`, ...) is what the FUSE mount and
the CLI use. Reads go straight to RocksDB and are safe from any thread while a
fold runs; each sees the state at the end of some applied batch. A read-only
State sees the directory as it was when it was opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Checkpoint,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from tidefs import private
from tidefs.journal.commands import Envelope, Outcome, SliceRef
from tidefs.journal.features import LEGACY, Enabled
from tidefs.replica import keys as K
from tidefs.replica.fold import OUTCOME_WINDOW, fold_record, merge_scan
from tidefs.replica.keys import Attr, VolumeInfo

LOCK_FILE = "tidefs.lock"
"""Name of the lock file inside a state directory; held by the one writable State."""

_CACHE_MAX = 200_000
_LEN = struct.Struct(">I")  # the key-length prefix of keys.entry_hash
_PREFIX = 9  # tag + inode: every scan of the fold stays within one such prefix
_MISSING: Any = object()
_INODE_TAGS = frozenset(
    t[0] for t in (K.TAG_INODE, K.TAG_SYMLINK, K.TAG_PARENT, K.TAG_CHUNK, K.TAG_XATTR, K.TAG_ORPHAN)
)
_DIRENT_TAG = K.TAG_DIRENT[0]
_OUTCOME_TAG = K.TAG_OUTCOME[0]


class StateError(Exception):
    """Base of the errors a State raises."""


class StateLockedError(StateError):
    """The state directory is already open for writing, by this or another process."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one `apply` did.

    `outcomes` lines up with the batch. A record folded by this call gets its
    outcome (for a retried request id, the stored outcome of its first
    offset). A re-delivered record (offset <= the applied offset before the
    call) changes nothing and gets the outcome stored for its request id, or
    `Outcome(0, 0, -1)` once that has been trimmed.

    `changed_inodes` and `changed_entries` name what the batch changed, so
    that a mount can invalidate the kernel's caches of them: an inode whose
    attributes, data, xattrs or existence changed, and every (parent, name)
    that was added, removed or repointed.
    """

    outcomes: list[Outcome]
    changed_inodes: frozenset[int] = frozenset()
    changed_entries: frozenset[tuple[int, bytes]] = frozenset()
    applied_offset: int = -1
    skipped: int = 0


class _Batch:
    """The state during one apply: pending writes over the database.

    The digest is brought up to date once, in `finish`, from each written
    key's value before the batch and after it: a directory touched by a
    hundred records of a batch is hashed once, not a hundred times.
    """

    __slots__ = ("by_prefix", "cache", "db", "dirty", "dropped", "gensums", "hashes", "orig")

    def __init__(
        self,
        db: Rdict,
        cache: dict[bytes, bytes | None],
        hashes: dict[bytes, int],
        gensums: dict[int, int],
    ) -> None:
        self.db = db
        self.cache = cache
        self.hashes = hashes
        self.gensums = gensums
        self.dirty: dict[bytes, bytes | None] = {}
        self.orig: dict[bytes, bytes | None] = {}
        self.by_prefix: dict[bytes, list[bytes]] = {}
        self.dropped: list[int] = []

    def get(self, key: bytes) -> bytes | None:
        """Return the value of `key` as the batch has left it so far."""
        value = self.dirty.get(key, _MISSING)
        if value is _MISSING:
            value = self.cache.get(key, _MISSING)
            if value is _MISSING:
                value = self.db.get(key)
                if key[0] != _OUTCOME_TAG:  # looked up once per record, never again
                    self.cache[key] = value
        return value

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Yield the live keys in [lo, hi), the batch's writes included."""
        pending: Iterable[bytes]
        prefix = lo[:_PREFIX]
        if len(prefix) == _PREFIX and hi <= K.prefix_end(prefix):
            # The fold scans within one tag + inode prefix: look at those writes only.
            pending = self.by_prefix.get(prefix, ())
        else:
            pending = self.dirty
        overlay = sorted((k, self.dirty[k]) for k in pending if lo <= k < hi)
        return merge_scan(_items(self.db, lo, hi), overlay)

    def write(self, writes: dict[bytes, bytes | None], fresh: AbstractSet[bytes]) -> None:
        """Apply one record's puts (deletes where None); keys in `fresh` cannot exist yet."""
        dirty, orig = self.dirty, self.orig
        for key, value in writes.items():
            if key not in dirty:
                orig[key] = None if key in fresh else self.get(key)
                self.by_prefix.setdefault(key[:_PREFIX], []).append(key)
                if key[0] == _OUTCOME_TAG:
                    # List the generation at once, so lookups in this batch find it.
                    self.gensums.setdefault(K.read_u64(key, 1), 0)
            dirty[key] = value

    def drop(self, gen: int) -> None:
        """Delete outcome generation `gen` as a whole; `finish` takes its share off the digest."""
        lo, hi = K.outcome_prefix(gen), K.outcome_prefix(gen + 1)
        for key in self.by_prefix.get(lo[:_PREFIX], ()):
            if lo <= key < hi:
                # Written in this batch: it never reaches the digest or the share.
                self.dirty[key] = None
                self.orig[key] = None
        self.dropped.append(gen)

    def finish(self, digest: int) -> int:
        """Fold every written key's change into `digest` and the generation shares; return it."""
        hashes, gensums, blake2b, size = self.hashes, self.gensums, hashlib.blake2b, K.DIGEST_SIZE
        for gen in self.dropped:
            digest -= gensums.pop(gen, 0)
        for key, value in self.dirty.items():
            old = self.orig[key]
            if old == value:
                continue
            delta = 0
            if old is not None:
                old_hash = hashes.get(key)
                delta -= K.entry_hash(key, old) if old_hash is None else old_hash
            new_hash = 0
            if value is not None:
                prefix = _LEN.pack(len(key))
                new_hash = int.from_bytes(blake2b(prefix + key + value, digest_size=size).digest())
                delta += new_hash
            digest += delta
            if key[0] == _OUTCOME_TAG:
                # Outcomes are written once and leave with their generation:
                # their hashes go to the generation's share, not the cache.
                gen = K.read_u64(key, 1)
                gensums[gen] = gensums.get(gen, 0) + delta
            elif value is not None:
                hashes[key] = new_hash
        return digest % K.DIGEST_MOD


class State:
    """One region's RocksDB state of one volume; see the module doc."""

    def __init__(
        self,
        db: Rdict,
        path: Path,
        *,
        read_only: bool,
        lock_fd: int | None,
    ) -> None:
        self._db = db
        self.path = path
        self.read_only = read_only
        self._lock_fd = lock_fd
        self._window = OUTCOME_WINDOW
        self._wopts = WriteOptions()
        self._wopts.sync = False  # WAL without fsync: the log is the source of truth
        self._cache: dict[bytes, bytes | None] = {}
        self._hashes: dict[bytes, int] = {}
        self._applied = self._read_applied()
        raw = db.get(K.META_DIGEST)
        self._digest = int.from_bytes(raw, "big") if raw is not None else 0
        self._gensums = {
            K.read_u64(key, len(K.META_GENSUM)): int.from_bytes(value, "big")
            for key, value in _items(db, K.META_GENSUM, K.prefix_end(K.META_GENSUM))
        }

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        read_only: bool = False,
        outcome_window: int | None = None,
    ) -> State:
        """Open (creating if needed) the state directory at `path`.

        A writable open takes an exclusive lock on the directory and fails at
        once with StateLockedError when another writable State holds it, in
        this process or another. `outcome_window` (for tests) is fixed when
        the state is created, as it shapes the state: every region of a volume
        must fold with the same one, and a different value later is an error.
        """
        path = Path(path)
        if outcome_window is not None and outcome_window < 1:
            raise ValueError("outcome_window must be at least 1")
        if read_only:
            if not (path / "CURRENT").exists():
                raise StateError(f"no tidefs state at {path}")
            try:
                db = Rdict(
                    str(path), _options(create=False), access_type=AccessType.read_only(False)
                )
            except Exception as exc:
                raise StateError(f"cannot open the state at {path} read-only: {exc}") from exc
            state = cls(db, path, read_only=True, lock_fd=None)
            try:
                state._check_format(outcome_window)
            except BaseException:
                state.close()
                raise
            return state
        try:
            # 0700: RocksDB's own files take the umask's mode, this keeps them private.
            private.makedirs(path)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {path}: {exc}") from exc
        lock_fd = _lock(path)
        try:
            db = Rdict(str(path), _options(create=True))
        except Exception as exc:
            os.close(lock_fd)
            raise StateError(f"cannot open the state at {path}: {exc}") from exc
        state = cls(db, path, read_only=False, lock_fd=lock_fd)
        try:
            state._check_format(outcome_window)
        except BaseException:
            state.close()
            raise
        return state

    def _check_format(self, window: int | None) -> None:
        """Check (or, for a new state, record) the key format and the outcome window."""
        raw = self._db.get(K.META_FORMAT)
        if raw is not None and K.decode_u32(raw) != K.FORMAT_VERSION:
            raise StateError(
                f"the state at {self.path} has key format {K.decode_u32(raw)}; "
                f"this tidefs reads format {K.FORMAT_VERSION}: replay it into a new directory "
                "(a mount rebuilds an empty state directory from a snapshot and the log)"
            )
        stored = self._db.get(K.META_WINDOW)
        if stored is not None:
            self._window = K.decode_offset(stored)
            if window is not None and window != self._window:
                raise StateError(
                    f"the state at {self.path} keeps outcomes for {self._window} offsets, "
                    f"not {window}: every fold of a volume must use the same window"
                )
            return
        self._window = OUTCOME_WINDOW if window is None else window
        if not self.read_only:
            self._db.put(K.META_FORMAT, K.encode_u32(K.FORMAT_VERSION), self._wopts)
            self._db.put(K.META_WINDOW, K.encode_offset(self._window), self._wopts)

    def close(self) -> None:
        """Close the database and release the directory lock (idempotent)."""
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoint(self, dest: str | Path) -> None:
        """Write a consistent copy of the state to the new directory `dest` (a RocksDB checkpoint)."""
        Checkpoint(self._db).create_checkpoint(str(dest))

    # -- the write side --------------------------------------------------------

    def apply(self, batch: Sequence[tuple[int, Envelope]]) -> ApplyResult:
        """Fold `batch` (in offset order) and commit it in one RocksDB write batch.

        If anything raises, nothing is written and the state stays as it was.
        One thread applies (the follower); any number may read meanwhile.
        """
        if self.read_only:
            raise StateError(f"the state at {self.path} is open read-only")
        for cached in (self._cache, self._hashes):
            if len(cached) > _CACHE_MAX:
                # Dicts keep insertion order: forget the older half, keep the warm one.
                for key in list(itertools.islice(cached, len(cached) // 2)):
                    del cached[key]
        try:
            return self._apply(batch)
        except BaseException:
            # The batch's value hashes went into _hashes as it finished: a
            # batch that did not commit must leave no trace in either cache.
            self._cache.clear()
            self._hashes.clear()
            raise

    def _apply(self, batch: Sequence[tuple[int, Envelope]]) -> ApplyResult:
        start = self._applied
        applied = start
        view = _Batch(self._db, self._cache, self._hashes, dict(self._gensums))
        outcomes: list[Outcome] = []
        inodes: set[int] = set()
        entries: set[tuple[int, bytes]] = set()
        skipped = 0
        for offset, env in batch:
            if offset <= applied:
                if offset < 0:
                    raise ValueError(f"negative log offset {offset}")
                skipped += 1
                known = _find_outcome(view.get, view.gensums, env.request_id)
                outcomes.append(known or Outcome(0, 0, -1))
                continue
            folded = fold_record(view, applied, offset, env, window=self._window)
            view.write(folded.writes, folded.fresh)
            for gen in folded.drops:
                view.drop(gen)
            outcomes.append(folded.outcome)
            applied = offset
        if applied == start:
            return ApplyResult(outcomes, applied_offset=applied, skipped=skipped)
        digest = view.finish(self._digest)
        wb = WriteBatch(raw_mode=True)
        cacheable: dict[bytes, bytes | None] = {}
        for key, value in view.dirty.items():
            tag = key[0]
            if tag in _INODE_TAGS:
                inodes.add(K.key_inode(key))
            elif tag == _DIRENT_TAG:
                parent, _cookie, name = K.split_dirent_key(key)
                entries.add((parent, name))
                inodes.add(parent)
            if tag != _OUTCOME_TAG:
                cacheable[key] = value
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        for gen in view.dropped:
            wb.delete_range(K.outcome_prefix(gen), K.outcome_prefix(gen + 1))
            wb.delete(K.gensum_key(gen))
        gensums = {gen: total % K.DIGEST_MOD for gen, total in view.gensums.items()}
        for gen, total in gensums.items():
            if self._gensums.get(gen) != total:
                wb.put(K.gensum_key(gen), K.digest_bytes(total))
        wb.put(K.META_APPLIED, K.encode_offset(applied))
        wb.put(K.META_DIGEST, K.digest_bytes(digest))
        self._db.write(wb, self._wopts)
        if view.dropped:
            # A range deletion in the memtable costs every later point read a
            # check against it; flushed to a table file it costs nothing. Once
            # per outcome window, so the flush is cheap.
            self._db.flush(wait=False)
        self._cache.update(cacheable)
        self._applied = applied
        self._digest = digest
        self._gensums = gensums
        return ApplyResult(outcomes, frozenset(inodes), frozenset(entries), applied, skipped)

    # -- the read side -----------------------------------------------------------

    def applied_offset(self) -> int:
        """Return the last applied log offset, -1 when nothing was applied."""
        if not self.read_only:
            return self._applied
        return self._read_applied()

    def _read_applied(self) -> int:
        raw = self._db.get(K.META_APPLIED)
        return -1 if raw is None else K.decode_offset(raw)

    def digest(self) -> bytes:
        """Return the 32-byte digest of the state at the applied offset."""
        raw = self._db.get(K.META_DIGEST)
        return K.EMPTY_DIGEST if raw is None else bytes(raw)

    def digest_hex(self) -> str:
        """Return the digest as 64 hex digits."""
        return self.digest().hex()

    def applied_and_digest(self) -> tuple[int, bytes]:
        """Return (applied offset, digest) as one batch left them, from one RocksDB snapshot.

        `apply` writes both in the same write batch, so a snapshot sees a
        matching pair even while a fold runs on another thread; reading them
        one after the other could pair an offset with the next batch's digest.
        """
        snap = self._db.snapshot()
        try:
            raw_applied = _snap_get(snap, K.META_APPLIED)
            raw_digest = _snap_get(snap, K.META_DIGEST)
        finally:
            del snap
        applied = -1 if raw_applied is None else K.decode_offset(raw_applied)
        return applied, K.EMPTY_DIGEST if raw_digest is None else bytes(raw_digest)

    def recompute_digest(self) -> bytes:
        """Recompute the digest from every live key (slow; for verify and tests)."""
        return K.digest_of(self.dump())

    def volume(self) -> VolumeInfo | None:
        """Return the volume record, None before CreateVolume was applied."""
        raw = self._db.get(K.VOLUME_KEY)
        return None if raw is None else K.decode_volume(raw)

    def features(self) -> Enabled:
        """Return the schema version and features the volume has enabled (legacy before any)."""
        raw = self._db.get(K.FEATURES_KEY)
        if raw is None:
            return LEGACY
        schema_version, names = K.decode_features(raw)
        return Enabled(schema_version, names)

    def getattr(self, ino: int) -> Attr | None:
        """Return the attributes of inode `ino`, None when it does not exist."""
        if not 0 < ino <= K.U64_MAX:
            return None
        raw = self._db.get(K.inode_key(ino))
        return None if raw is None else K.decode_attr(ino, raw)

    def lookup(self, parent: int, name: bytes) -> int | None:
        """Return the inode named `name` in directory `parent`, or None."""
        if not 0 < parent <= K.U64_MAX:
            return None
        raw = self._db.get(K.dirent_key(parent, name))
        return None if raw is None else K.decode_dirent(raw)[0]

    def parent(self, ino: int) -> int | None:
        """Return the parent of directory `ino` (the root's is itself), None for other inodes."""
        if not 0 < ino <= K.U64_MAX:
            return None
        raw = self._db.get(K.parent_key(ino))
        return None if raw is None else K.read_u64(raw)

    def readdir(self, ino: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """Yield (cookie, name, child inode) of directory `ino` with cookie > `after_cookie`.

        Entries come in cookie order; a cookie stays a valid place to resume
        while the directory changes (see keys.py).
        """
        if not 0 < ino <= K.U64_MAX or after_cookie >= K.I64_MAX:
            return
        prefix = K.dirent_prefix(ino)
        start = K.dirent_cookie_key(ino, max(after_cookie, 0) + 1)
        for key, value in self._scan(start, K.prefix_end(prefix)):
            _parent, cookie, name = K.split_dirent_key(key)
            yield cookie, name, K.decode_dirent(value)[0]

    def readdir_types(
        self, ino: int, after_cookie: int = 0
    ) -> Iterator[tuple[int, bytes, int, int]]:
        """As readdir, with the child's file type bits (`stat.S_IFDIR`, ...) as a fourth field."""
        if not 0 < ino <= K.U64_MAX or after_cookie >= K.I64_MAX:
            return
        prefix = K.dirent_prefix(ino)
        start = K.dirent_cookie_key(ino, max(after_cookie, 0) + 1)
        for key, value in self._scan(start, K.prefix_end(prefix)):
            _parent, cookie, name = K.split_dirent_key(key)
            child, kind = K.decode_dirent(value)
            yield cookie, name, child, kind

    def readlink(self, ino: int) -> bytes | None:
        """Return the target of symlink `ino`, None when it is not a symlink."""
        if not 0 < ino <= K.U64_MAX:
            return None
        raw = self._db.get(K.symlink_key(ino))
        return None if raw is None else bytes(raw)

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        """Return the value of xattr `name` of `ino`, None when absent."""
        if not 0 < ino <= K.U64_MAX:
            return None
        raw = self._db.get(K.xattr_key(ino, name))
        return None if raw is None else bytes(raw)

    def listxattr(self, ino: int) -> list[bytes]:
        """Return the xattr names of `ino`, in byte order."""
        if not 0 < ino <= K.U64_MAX:
            return []
        prefix = K.xattr_prefix(ino)
        return [key[len(prefix) :] for key, _v in self._scan(prefix, K.prefix_end(prefix))]

    def slices(self, ino: int, chunk_index: int) -> list[SliceRef]:
        """Return the slices of one chunk, oldest first: later ones overlay earlier ones."""
        if not 0 < ino <= K.U64_MAX or not 0 <= chunk_index <= K.U64_MAX:
            return []
        prefix = K.chunk_key(ino, chunk_index)
        return [K.decode_slice(v) for _k, v in self._scan(prefix, K.prefix_end(prefix))]

    def slice_count(self, ino: int, chunk_index: int, limit: int) -> int:
        """Return how many slices a chunk holds, counting no further than `limit`."""
        if not 0 < ino <= K.U64_MAX or not 0 <= chunk_index <= K.U64_MAX:
            return 0
        prefix = K.chunk_key(ino, chunk_index)
        n = 0
        for _item in self._scan(prefix, K.prefix_end(prefix)):
            n += 1
            if n >= limit:
                break
        return n

    def chunks(self, ino: int) -> list[int]:
        """Return the indexes of the chunks of `ino` that hold slices, ascending."""
        if not 0 < ino <= K.U64_MAX:
            return []
        prefix = K.chunk_prefix(ino)
        out: list[int] = []
        for key, _v in self._scan(prefix, K.prefix_end(prefix)):
            index = K.split_chunk_key(key)[1]
            if not out or out[-1] != index:
                out.append(index)
        return out

    def outcome(self, request_id: bytes) -> Outcome | None:
        """Return the stored outcome of a request id, None if unknown or forgotten."""
        return _find_outcome(self._db.get, self._gensums, request_id)

    def size_and_outcomes(
        self, ino: int, request_ids: Sequence[bytes]
    ) -> tuple[int | None, list[bool]]:
        """Return (size of `ino`, whether each request id has an outcome), from one snapshot.

        A writer with appends in flight asks this: an append whose outcome is
        in the snapshot is in the size too, one without is not, so its
        buffered bytes go right after that size; a fold between two separate
        reads would show an append twice or not at all.
        """
        snap = self._db.snapshot()
        try:
            get = functools.partial(_snap_get, snap)
            raw = get(K.inode_key(ino)) if 0 < ino <= K.U64_MAX else None
            size = None if raw is None else K.decode_attr(ino, raw).size
            # Read after the snapshot: every generation the snapshot holds is listed.
            gensums = dict(self._gensums)
            done = [_find_outcome(get, gensums, rid) is not None for rid in request_ids]
        finally:
            del snap, get
        return size, done

    def iter_live_slices(self) -> Iterator[tuple[int, int, SliceRef]]:
        """Yield (inode, chunk index, slice) for every slice of every file."""
        for key, value in self._scan(K.TAG_CHUNK, K.prefix_end(K.TAG_CHUNK)):
            ino, index = K.split_chunk_key(key)
            yield ino, index, K.decode_slice(value)

    def orphans(self) -> list[int]:
        """Return the inodes with no links left that no Reclaim has dropped yet."""
        return [
            K.key_inode(key) for key, _v in self._scan(K.TAG_ORPHAN, K.prefix_end(K.TAG_ORPHAN))
        ]

    def dump(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield every live (digested) key and value in key order; meta keys are left out."""
        return _items(self._db, K.LIVE_START, None)

    def _scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        return _items(self._db, lo, hi)


def _items(db: Rdict, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """Iterate the keys in [lo, hi) (to the end when hi is None); raw mode yields bytes.

    RocksDB's iterator keeps a pointer to the upper bound held by the
    ReadOptions, so this generator holds `ro` for the iterator's whole life (an
    iterator that outlived its ReadOptions was seen to stop early). The bound
    is also checked here, which costs one comparison per key.
    """
    ro = ReadOptions()
    if hi is None:
        yield from cast(Iterator[tuple[bytes, bytes]], db.items(from_key=lo, read_opt=ro))
        return
    ro.set_iterate_upper_bound(hi)
    for key, value in cast(Iterator[tuple[bytes, bytes]], db.items(from_key=lo, read_opt=ro)):
        if key >= hi:
            break
        yield key, value
    del ro


def _snap_get(snap: Any, key: bytes) -> bytes | None:
    """Return the value of `key` in a RocksDB snapshot, None when absent."""
    try:
        return cast(bytes, snap[key])
    except KeyError:
        return None
    except Exception as exc:  # rocksdict raises a bare Exception for a missing key
        if "not found" in str(exc):
            return None
        raise


def _find_outcome(
    get: Callable[[bytes], bytes | None], gensums: dict[int, int], request_id: bytes
) -> Outcome | None:
    """Look a request id up in every outcome generation still kept, newest first."""
    for gen in sorted(gensums, reverse=True):
        raw = get(K.outcome_key(gen, request_id))
        if raw is not None:
            return K.decode_outcome(raw)
    return None


def _options(*, create: bool) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(create)
    table = BlockBasedOptions()
    # Most fold reads are point lookups of keys that do not exist yet (a new
    # name, a new request id): a bloom filter answers those without disk reads.
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    return opts


def _lock(path: Path) -> int:
    """Take the directory's exclusive write lock or raise StateLockedError at once."""
    lock_path = path / LOCK_FILE
    fd = private.create_file(lock_path, os.O_RDWR)
    try:
        # flock, not lockf: two opens in one process conflict too.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (process {holder})" if holder else ""
        raise StateLockedError(
            f"the tidefs state at {path} is already open for writing{who}; "
            "only one fold may write a state directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
