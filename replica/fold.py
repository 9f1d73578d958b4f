"""The fold: one log record and the state at its position -> the state's changes and an outcome.

This module is the whole of tidefs' metadata semantics. `fold_record` is a pure
function: it reads the state through a `Reader` (whatever the state was after
the previous offset, including earlier records of the same write batch),
looks only at the record's command, offset, request id and timestamp, and
returns the keys to put or delete together with the `Outcome`. No clock, no
randomness, nothing about the region that runs it (invariant 2): every region
that folds the same log computes the same writes, byte for byte, and so the
same digest.

A command either applies completely or is rejected with an errno and changes
nothing but the bookkeeping of its outcome. Validation follows Linux's order of
checks, so the errno a writer sees is the one a local file system would give in
the same situation: the parent is resolved first (ENOENT, ENOTDIR), then the
last name (`.`/`..`, ENAMETOOLONG), then existence, then the operation's own
rules. Permission checks are not here: the mount runs with
`default_permissions`, so the kernel has already checked them against the
attributes the writer saw.

Bookkeeping that makes apply exactly-once (invariant 3):
- every request id's outcome is stored and a record whose request id already
  has one is not applied again: it gets the stored outcome;
- outcomes live in generations of `window` offsets (generation = offset //
  window). At offset o the outcomes of generations o // window and the one
  before are kept, so an outcome is remembered for at least `window` and less
  than 2 * `window` offsets; the first record of a new generation drops the
  generations before those two, as a whole, deterministically. A writer that
  retries a command later than that re-applies it; the window (about a
  million records) is far longer than any retry loop.

Where tidefs departs from Linux, on purpose:
- `Mknod(exclusive=False)` (open with O_CREAT) on an existing name that is not
  a regular file returns EISDIR for a directory, EEXIST for anything else: a
  mount cannot open a fifo or follow a symlink it raced with on another region;
  and it is exclusive for every type but regular files.
- chown (SetAttr with a different uid or gid and no mode) of a non-directory
  clears S_ISUID, and S_ISGID when group-execute is set, whoever the caller is.
- `RENAME_WHITEOUT` and unknown flag bits are EINVAL.
- atime changes only through SetAttr (reads append nothing to the log).
- a directory's size is 0; rmdir drops the inode at once (no open-directory
  orphans); a regular file's data lives on while the mount holds it open, until
  `Reclaim`.
"""

from __future__ import annotations

import errno as E
import stat
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, Protocol

from tidefs.journal.commands import (
    LINK_MAX,
    NAME_MAX,
    PATH_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    XATTR_CREATE,
    XATTR_NAME_MAX,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    AddRegion,
    CommitSlice,
    CompactChunk,
    CreateVolume,
    EnableFeatures,
    Envelope,
    Link,
    Mkdir,
    Mknod,
    Noop,
    Outcome,
    Reclaim,
    Region,
    RemoveRegion,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    SliceRef,
    Symlink,
    Unlink,
    inode_for_offset,
)
from tidefs.journal.features import BY_NAME as FEATURES_BY_NAME
from tidefs.journal.features import LEGACY, LEGACY_SCHEMA, Enabled, missing, used
from tidefs.replica.keys import (
    FEATURES_KEY,
    I64_MAX,
    I64_MIN,
    U32_MAX,
    U64_MAX,
    VOLUME_KEY,
    Attr,
    VolumeInfo,
    chunk_key,
    chunk_prefix,
    decode_attr,
    decode_dirent,
    decode_features,
    decode_outcome,
    decode_slice,
    decode_volume,
    dirent_key,
    dirent_prefix,
    encode_attr,
    encode_dirent,
    encode_features,
    encode_outcome,
    encode_slice,
    encode_volume,
    fits_str16,
    inode_key,
    orphan_key,
    outcome_key,
    parent_key,
    prefix_end,
    read_u64,
    slice_id_of,
    slice_key,
    split_chunk_key,
    symlink_key,
    u64,
    xattr_key,
    xattr_prefix,
)

OUTCOME_WINDOW = 1 << 20
"""Offsets an outcome is kept for retries. Part of the fold's semantics: every
region of a volume must fold with the same value, or their digests differ."""

MAX_FILE_SIZE = I64_MAX
"""Largest file size (EFBIG beyond): offsets travel as signed 64-bit integers."""

_MODE_MAX = 0xFFFF
_PERM_BITS = 0o7777
_NODE_KINDS = (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
_DOTS = (b".", b"..")
_MAX_DEPTH = 1 << 20
_MISSING: Any = object()


class Reader(Protocol):
    """Read access to the state as of the previous offset."""

    def get(self, key: bytes) -> bytes | None:
        """Return the value of `key`, or None when absent."""

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Yield the live keys in [lo, hi) and their values, in key order.

        Callers never write while iterating; a fold that deletes what it scans
        takes a list first.
        """


@dataclass(frozen=True, slots=True)
class Folded:
    """What folding one record decided: its outcome and the state's changes (None = delete).

    `fresh` names written keys that cannot exist before this offset (the keys
    of the inode it creates, its outcome): the state updates the digest for
    those without reading the database first. `drops` are the outcome
    generations whose keys (all under `keys.outcome_prefix(generation)`) are
    deleted as a whole.
    """

    outcome: Outcome
    writes: dict[bytes, bytes | None]
    fresh: AbstractSet[bytes] = frozenset()
    drops: tuple[int, ...] = ()


class Reject(Exception):
    """A command is refused with `errno`; raised inside the fold, never out of it."""

    def __init__(self, errno_: int) -> None:
        super().__init__(E.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


def merge_scan(
    base: Iterator[tuple[bytes, bytes]], overlay: list[tuple[bytes, bytes | None]]
) -> Iterator[tuple[bytes, bytes]]:
    """Merge a sorted scan with sorted pending writes; a write wins, a None hides the key."""
    i = 0
    n = len(overlay)
    for key, value in base:
        while i < n and overlay[i][0] < key:
            okey, ovalue = overlay[i]
            i += 1
            if ovalue is not None:
                yield okey, ovalue
        if i < n and overlay[i][0] == key:
            ovalue = overlay[i][1]
            i += 1
            if ovalue is not None:
                yield key, ovalue
            continue
        yield key, value
    while i < n:
        okey, ovalue = overlay[i]
        i += 1
        if ovalue is not None:
            yield okey, ovalue


def _changed(
    a: Attr, now: int, nlink: int, *, size: int | None = None, mtime: bool = False
) -> Attr:
    """Return `a` with ctime = now, the given link count, and optionally size and mtime = now.

    The fold's hot path: a direct constructor call, several times cheaper than
    dataclasses.replace.
    """
    return Attr(
        a.ino,
        a.mode,
        a.uid,
        a.gid,
        nlink,
        a.size if size is None else size,
        a.atime_ns,
        now if mtime else a.mtime_ns,
        now,
        a.rdev,
        a.generation,
    )


class _Tx:
    """The pending writes of one record, read through to the state behind them."""

    __slots__ = ("base", "fresh", "now", "offset", "writes")

    def __init__(self, base: Reader, offset: int, now: int) -> None:
        self.base = base
        self.offset = offset
        self.now = now
        self.writes: dict[bytes, bytes | None] = {}
        self.fresh: set[bytes] = set()

    # raw access

    def get(self, key: bytes) -> bytes | None:
        """Return the value of `key` as this record has left it so far."""
        value = self.writes.get(key, _MISSING)
        if value is _MISSING:
            return self.base.get(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        """Set `key` to `value`."""
        self.writes[key] = value

    def delete(self, key: bytes) -> None:
        """Delete `key`."""
        self.writes[key] = None

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Yield the live keys in [lo, hi), this record's writes included."""
        mine = sorted((k, v) for k, v in self.writes.items() if lo <= k < hi)
        return merge_scan(self.base.scan(lo, hi), mine)

    def first(self, prefix: bytes) -> tuple[bytes, bytes] | None:
        """Return the first live key with `prefix` and its value, or None."""
        return next(self.scan(prefix, prefix_end(prefix)), None)

    # typed access

    def volume(self) -> VolumeInfo:
        """Return the volume record."""
        raw = self.get(VOLUME_KEY)
        if raw is None:  # pragma: no cover - every command but CreateVolume checks first
            raise Reject(E.ENOENT)
        return decode_volume(raw)

    def features(self) -> Enabled:
        """Return what the volume has enabled (the legacy level before any EnableFeatures)."""
        raw = self.get(FEATURES_KEY)
        if raw is None:
            return LEGACY
        schema_version, names = decode_features(raw)
        return Enabled(schema_version, names)

    def attr(self, ino: int) -> Attr | None:
        """Return the attributes of `ino`, None when it does not exist."""
        if not 0 < ino <= U64_MAX:
            return None
        raw = self.get(inode_key(ino))
        return None if raw is None else decode_attr(ino, raw)

    def put_attr(self, a: Attr) -> None:
        """Write an inode's attributes."""
        self.writes[inode_key(a.ino)] = encode_attr(a)

    def entry(self, parent: int, name: bytes) -> tuple[int, int] | None:
        """Return (child inode, file type bits) of `parent/name`, or None."""
        raw = self.get(dirent_key(parent, name))
        return None if raw is None else decode_dirent(raw)

    def dir_is_empty(self, ino: int) -> bool:
        """Whether directory `ino` has no entries."""
        return self.first(dirent_prefix(ino)) is None

    def touch_dir(self, ino: int, nlink_delta: int = 0) -> None:
        """Set a directory's mtime and ctime to now, after an entry in it changed."""
        a = self.attr(ino)
        if a is None:  # pragma: no cover - callers resolved the directory first
            raise AssertionError(f"directory {ino} vanished inside one command")
        self.put_attr(_changed(a, self.now, a.nlink + nlink_delta, mtime=True))


def fold_record(
    view: Reader, prev_offset: int, offset: int, env: Envelope, *, window: int = OUTCOME_WINDOW
) -> Folded:
    """Fold the record at `offset` (the previous folded offset being `prev_offset`) over `view`.

    Never raises for a bad command: every refusal is an Outcome with an errno.
    """
    if window < 1:
        raise ValueError("the outcome window must be at least one offset")
    tx = _Tx(view, offset, env.timestamp_ns)
    gen = offset // window
    rid = env.request_id
    stored = tx.get(outcome_key(gen, rid))
    if stored is None and gen > 0:
        stored = tx.get(outcome_key(gen - 1, rid))
    if stored is not None:
        outcome = decode_outcome(stored)  # a retry: it took effect once, at its first offset
    else:
        try:
            outcome = Outcome(0, _apply(tx, env), offset)
        except Reject as rej:
            tx.writes.clear()
            tx.fresh.clear()
            outcome = Outcome(rej.errno, 0, offset)
        rkey = outcome_key(gen, rid)
        tx.put(rkey, encode_outcome(outcome))
        tx.fresh.add(rkey)  # looked up above: absent
    drops: tuple[int, ...] = ()
    if prev_offset >= 0 and gen > prev_offset // window:
        # Entering a new generation: only this one and the one before stay.
        drops = tuple(range(max(0, prev_offset // window - 1), gen - 1))
    return Folded(outcome, tx.writes, tx.fresh, drops)


def _apply(tx: _Tx, env: Envelope) -> int:
    """Apply one command; return the inode it made or named (0 for none)."""
    if not I64_MIN <= env.timestamp_ns <= I64_MAX:
        raise Reject(E.EINVAL)
    cmd = env.command
    handler = _HANDLERS.get(type(cmd))
    if handler is None:
        raise Reject(E.ENOSYS)
    if handler is not _create_volume and tx.get(VOLUME_KEY) is None:
        raise Reject(E.ENOENT)
    if type(cmd) in _USES_FEATURES and used(cmd) and missing(cmd, tx.features()) is not None:
        raise Reject(E.EOPNOTSUPP)  # the volume has not enabled what this command uses
    return handler(tx, cmd)


# -- validation helpers --------------------------------------------------------


def _u32(n: int) -> int:
    if not 0 <= n <= U32_MAX:
        raise Reject(E.EINVAL)
    return n


def _mode(n: int) -> int:
    if not 0 <= n <= _MODE_MAX:
        raise Reject(E.EINVAL)
    return n


def _check_name(name: bytes, dot: int, dotdot: int | None = None) -> None:
    """Validate the last component of a path, as Linux's lookup of it would.

    `dot`/`dotdot` are the errnos the operation gives for `.` and `..` (EEXIST
    for creates, EISDIR for unlink, EBUSY for rename, ...).
    """
    if not name:
        raise Reject(E.ENOENT)
    if name == b".":
        raise Reject(dot)
    if name == b"..":
        raise Reject(dot if dotdot is None else dotdot)
    if b"/" in name or b"\0" in name:
        raise Reject(E.EINVAL)
    if len(name) > NAME_MAX:
        raise Reject(E.ENAMETOOLONG)


def _dir(tx: _Tx, ino: int) -> Attr:
    """Resolve a parent directory: ENOENT when missing, ENOTDIR when not a directory."""
    a = tx.attr(ino)
    if a is None:
        raise Reject(E.ENOENT)
    if not a.is_dir:
        raise Reject(E.ENOTDIR)
    return a


def _inherit(parent: Attr, gid: int, mode: int) -> tuple[int, int]:
    """Apply a set-group-ID directory's rules: the child takes its group, a subdirectory its bit."""
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    return gid, mode


def _is_ancestor(tx: _Tx, anc: int, ino: int) -> bool:
    """Whether directory `anc` is `ino` or one of its ancestors."""
    cur = ino
    for _ in range(_MAX_DEPTH):
        if cur == anc:
            return True
        if cur == ROOT_INODE:
            return False
        raw = tx.get(parent_key(cur))
        if raw is None:  # pragma: no cover - every directory but the root has a parent
            raise AssertionError(f"directory {cur} has no parent: the state is corrupt")
        cur = read_u64(raw)
    raise AssertionError(
        f"directory {ino} is {_MAX_DEPTH} deep or in a cycle: the state is corrupt"
    )


def _validate_slice(vol: VolumeInfo, chunk_index: int, s: SliceRef) -> int:
    """Check a slice against the volume; return the file offset just past its end."""
    if not (
        chunk_index >= 0
        and s.offset >= 0
        and s.length > 0
        and s.skip >= 0
        and s.offset + s.length <= vol.chunk_size
        and 0 < s.block_size <= U32_MAX
        and fits_str16(s.home)
        and vol.region(s.home) is not None
    ):
        raise Reject(E.EINVAL)
    end = chunk_index * vol.chunk_size + s.offset + s.length
    if end > MAX_FILE_SIZE:
        raise Reject(E.EFBIG)
    return end


def _regular(tx: _Tx, ino: int) -> Attr:
    """Resolve an inode that must hold data: ENOENT, EISDIR, or EINVAL for other types."""
    a = tx.attr(ino)
    if a is None:
        raise Reject(E.ENOENT)
    if a.is_dir:
        raise Reject(E.EISDIR)
    if not a.is_reg:
        raise Reject(E.EINVAL)
    return a


# -- state changes shared by several commands ----------------------------------


def _create(
    tx: _Tx, parent: Attr, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0, size: int = 0
) -> int:
    """Make a new inode named `parent/name`; its number comes from the command's offset."""
    # Offsets are unique and only ever name one inode, so its keys are all new.
    ino = inode_for_offset(tx.offset)
    is_dir = stat.S_ISDIR(mode)
    now = tx.now
    tx.put_attr(Attr(ino, mode, uid, gid, 2 if is_dir else 1, size, now, now, now, rdev, 0))
    tx.fresh.add(inode_key(ino))
    tx.put(dirent_key(parent.ino, name), encode_dirent(ino, mode))
    if is_dir:
        tx.put(parent_key(ino), u64(parent.ino))
        tx.fresh.add(parent_key(ino))
    tx.put_attr(_changed(parent, now, parent.nlink + (1 if is_dir else 0), mtime=True))
    return ino


def _drop_inode(tx: _Tx, ino: int) -> None:
    """Delete an inode and everything hanging off it (data, xattrs, target, parent link)."""
    for key in (inode_key(ino), symlink_key(ino), parent_key(ino), orphan_key(ino)):
        if tx.get(key) is not None:
            tx.delete(key)
    for prefix in (chunk_prefix(ino), xattr_prefix(ino)):
        for key, _value in list(tx.scan(prefix, prefix_end(prefix))):
            tx.delete(key)


def _unlink_inode(tx: _Tx, ino: int) -> None:
    """Drop one link of a non-directory; at zero links it becomes an orphan awaiting Reclaim."""
    a = tx.attr(ino)
    if a is None:  # pragma: no cover - an entry always names a live inode
        raise AssertionError(f"an entry names inode {ino}, which does not exist")
    nlink = max(0, a.nlink - 1)
    tx.put_attr(_changed(a, tx.now, nlink))
    if nlink == 0:
        tx.put(orphan_key(ino), b"")


def _truncate(tx: _Tx, ino: int, size: int, chunk_size: int) -> None:
    """Make every byte at or beyond `size` invisible, so that a later extension reads zeros.

    Chunks wholly past the end go; in the chunk holding the new end, slices that
    start past it go and a slice straddling it is cut to end there (its blocks
    stay as they are: a slice may cover fewer bytes than its blocks hold).
    """
    prefix = chunk_prefix(ino)
    for key, value in list(tx.scan(chunk_key(ino, size // chunk_size), prefix_end(prefix))):
        _ino, index = split_chunk_key(key)
        start = index * chunk_size
        end = size - start
        s = decode_slice(value)
        if start >= size or s.offset >= end:
            tx.delete(key)
        elif s.offset + s.length > end:
            tx.put(key, encode_slice(replace(s, length=end - s.offset)))


# -- the commands ----------------------------------------------------------------


def _create_volume(tx: _Tx, c: CreateVolume) -> int:
    if tx.get(VOLUME_KEY) is not None:
        raise Reject(E.EEXIST)
    names = [r.name for r in c.regions]
    if not (
        c.name
        and fits_str16(c.name)
        and c.regions
        and len(c.regions) <= 0xFFFF
        and all(r.name and fits_str16(r.name) and fits_str16(r.store_url) for r in c.regions)
        and len(set(names)) == len(names)
        and c.primary in names
        and 0 < c.block_size <= U32_MAX
        and c.block_size <= c.chunk_size
        and c.retention_s >= 0
    ):
        raise Reject(E.EINVAL)
    mode = _mode(c.root_mode)
    if stat.S_IFMT(mode) not in (0, stat.S_IFDIR):
        raise Reject(E.EINVAL)
    uid, gid = _u32(c.root_uid), _u32(c.root_gid)
    vol = VolumeInfo(c.name, tuple(c.regions), c.primary, c.chunk_size, c.block_size, c.retention_s)
    tx.put(VOLUME_KEY, encode_volume(vol))
    now = tx.now
    tx.put_attr(Attr(ROOT_INODE, stat.S_IFDIR | (mode & _PERM_BITS), uid, gid, 2, 0, now, now, now))
    tx.put(parent_key(ROOT_INODE), u64(ROOT_INODE))  # the root is its own `..`
    return ROOT_INODE


def change_volume(
    vol: VolumeInfo, enabled: Enabled, c: AddRegion | RemoveRegion | EnableFeatures
) -> tuple[VolumeInfo, Enabled]:
    """Return the volume record and enabled level after `c`, or raise Reject.

    The fold's own rules for the commands that change the volume record, as a
    pure function so that gc and status can follow the regions through the
    log's tail exactly as the fold would, without folding it.
    """
    if missing(c, enabled) is not None:
        raise Reject(E.EOPNOTSUPP)
    if isinstance(c, AddRegion):
        r = c.region
        if not (r.name and fits_str16(r.name) and fits_str16(r.store_url)):
            raise Reject(E.EINVAL)
        if vol.region(r.name) is not None:
            raise Reject(E.EEXIST)
        if len(vol.regions) >= 0xFFFF:
            raise Reject(E.ENOSPC)
        return replace(vol, regions=(*vol.regions, Region(r.name, r.store_url))), enabled
    if isinstance(c, RemoveRegion):
        if vol.region(c.name) is None:
            raise Reject(E.ENOENT)
        if c.name == vol.primary:
            raise Reject(E.EBUSY)
        return replace(vol, regions=tuple(r for r in vol.regions if r.name != c.name)), enabled
    level = max(enabled.schema_version, c.schema_version)
    names = enabled.features | frozenset(c.features)
    if not (
        LEGACY_SCHEMA <= c.schema_version <= U32_MAX
        and len(names) <= 0xFFFF
        and all(n and fits_str16(n) for n in c.features)
        # A feature needs its schema version (a tidefs that does not know it stopped before).
        and all(f.schema_version <= level for n in names if (f := FEATURES_BY_NAME.get(n)))
    ):
        raise Reject(E.EINVAL)
    return vol, Enabled(level, names)


def _volume_command(tx: _Tx, c: AddRegion | RemoveRegion | EnableFeatures) -> int:
    vol, enabled = tx.volume(), tx.features()
    new_vol, new_enabled = change_volume(vol, enabled, c)
    if new_vol != vol:
        tx.put(VOLUME_KEY, encode_volume(new_vol))
    if new_enabled != enabled:
        tx.put(FEATURES_KEY, encode_features(new_enabled.schema_version, new_enabled.features))
    return 0


def _mknod(tx: _Tx, c: Mknod) -> int:
    kind = stat.S_IFMT(_mode(c.mode))
    if kind == 0:  # as mknod(2): no type means a regular file
        kind = stat.S_IFREG
    elif kind == stat.S_IFDIR:
        raise Reject(E.EPERM)
    elif kind not in _NODE_KINDS:
        raise Reject(E.EINVAL)
    uid, gid = _u32(c.uid), _u32(c.gid)
    if not 0 <= c.rdev <= U64_MAX:
        raise Reject(E.EINVAL)
    exclusive = c.exclusive or kind != stat.S_IFREG
    parent = _dir(tx, c.parent)
    _check_name(c.name, E.EEXIST if exclusive else E.EISDIR)
    existing = tx.entry(c.parent, c.name)
    if existing is not None:
        child, child_kind = existing
        if exclusive:
            raise Reject(E.EEXIST)
        if child_kind == stat.S_IFDIR:
            raise Reject(E.EISDIR)
        if child_kind != stat.S_IFREG:
            raise Reject(E.EEXIST)
        return child  # open(O_CREAT) of an existing file: nothing changes
    mode = kind | (c.mode & _PERM_BITS)
    gid, mode = _inherit(parent, gid, mode)
    rdev = c.rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return _create(tx, parent, c.name, mode, uid, gid, rdev)


def _mkdir(tx: _Tx, c: Mkdir) -> int:
    mode = _mode(c.mode)
    uid, gid = _u32(c.uid), _u32(c.gid)
    parent = _dir(tx, c.parent)
    _check_name(c.name, E.EEXIST)
    if tx.entry(c.parent, c.name) is not None:
        raise Reject(E.EEXIST)
    if parent.nlink >= LINK_MAX:
        raise Reject(E.EMLINK)
    # As vfs_mkdir: only permission and sticky bits are taken from the caller.
    mode = stat.S_IFDIR | (mode & 0o1777)
    gid, mode = _inherit(parent, gid, mode)
    return _create(tx, parent, c.name, mode, uid, gid)


def _symlink(tx: _Tx, c: Symlink) -> int:
    uid, gid = _u32(c.uid), _u32(c.gid)
    target = c.target
    if not target:
        raise Reject(E.ENOENT)
    if len(target) >= PATH_MAX:
        raise Reject(E.ENAMETOOLONG)
    if b"\0" in target:
        raise Reject(E.EINVAL)
    parent = _dir(tx, c.parent)
    _check_name(c.name, E.EEXIST)
    if tx.entry(c.parent, c.name) is not None:
        raise Reject(E.EEXIST)
    mode = stat.S_IFLNK | 0o777
    gid, mode = _inherit(parent, gid, mode)
    ino = _create(tx, parent, c.name, mode, uid, gid, size=len(target))
    tx.put(symlink_key(ino), target)
    tx.fresh.add(symlink_key(ino))
    return ino


def _link(tx: _Tx, c: Link) -> int:
    a = tx.attr(c.inode)
    if a is None:
        raise Reject(E.ENOENT)
    parent = _dir(tx, c.new_parent)
    _check_name(c.new_name, E.EEXIST)
    if tx.entry(c.new_parent, c.new_name) is not None:
        raise Reject(E.EEXIST)
    if a.is_dir:
        raise Reject(E.EPERM)
    if a.nlink == 0:  # an open, unlinked file cannot be linked back (no O_TMPFILE here)
        raise Reject(E.ENOENT)
    if a.nlink >= LINK_MAX:
        raise Reject(E.EMLINK)
    now = tx.now
    tx.put_attr(_changed(a, now, a.nlink + 1))
    tx.put(dirent_key(parent.ino, c.new_name), encode_dirent(a.ino, a.mode))
    tx.touch_dir(parent.ino)
    return a.ino


def _unlink(tx: _Tx, c: Unlink) -> int:
    _dir(tx, c.parent)
    _check_name(c.name, E.EISDIR)
    found = tx.entry(c.parent, c.name)
    if found is None:
        raise Reject(E.ENOENT)
    child, kind = found
    if kind == stat.S_IFDIR:
        raise Reject(E.EISDIR)
    tx.delete(dirent_key(c.parent, c.name))
    _unlink_inode(tx, child)
    tx.touch_dir(c.parent)
    return 0


def _rmdir(tx: _Tx, c: Rmdir) -> int:
    _dir(tx, c.parent)
    _check_name(c.name, E.EINVAL, E.ENOTEMPTY)
    found = tx.entry(c.parent, c.name)
    if found is None:
        raise Reject(E.ENOENT)
    child, kind = found
    if kind != stat.S_IFDIR:
        raise Reject(E.ENOTDIR)
    if not tx.dir_is_empty(child):
        raise Reject(E.ENOTEMPTY)
    tx.delete(dirent_key(c.parent, c.name))
    _drop_inode(tx, child)
    tx.touch_dir(c.parent, nlink_delta=-1)
    return 0


def _rename(tx: _Tx, c: Rename) -> int:
    """Rename, in the order of Linux's do_renameat2 and vfs_rename checks."""
    flags = c.flags
    noreplace = bool(flags & RENAME_NOREPLACE)
    exchange = bool(flags & RENAME_EXCHANGE)
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (noreplace and exchange):
        raise Reject(E.EINVAL)
    old_dir = _dir(tx, c.parent)
    new_dir = _dir(tx, c.new_parent)
    if c.name in _DOTS:
        raise Reject(E.EBUSY)
    if c.new_name in _DOTS:
        raise Reject(E.EEXIST if noreplace else E.EBUSY)
    _check_name(c.name, E.EBUSY)
    src = tx.entry(c.parent, c.name)
    if src is None:
        raise Reject(E.ENOENT)
    _check_name(c.new_name, E.EBUSY)
    tgt = tx.entry(c.new_parent, c.new_name)
    if noreplace and tgt is not None:
        raise Reject(E.EEXIST)
    if exchange and tgt is None:
        raise Reject(E.ENOENT)
    src_ino, src_kind = src
    src_is_dir = src_kind == stat.S_IFDIR
    tgt_ino, tgt_kind = tgt if tgt is not None else (0, 0)
    tgt_is_dir = tgt_kind == stat.S_IFDIR
    moves = c.parent != c.new_parent
    # Neither may become its own ancestor (the lock_rename "trap" checks).
    if moves and src_is_dir and _is_ancestor(tx, src_ino, c.new_parent):
        raise Reject(E.EINVAL)
    if moves and tgt_is_dir and _is_ancestor(tx, tgt_ino, c.parent):
        raise Reject(E.EINVAL if exchange else E.ENOTEMPTY)
    if tgt is not None and tgt_ino == src_ino:
        return 0  # two names of one inode: POSIX says succeed and do nothing
    if tgt is not None and not exchange:
        if src_is_dir and not tgt_is_dir:
            raise Reject(E.ENOTDIR)
        if not src_is_dir and tgt_is_dir:
            raise Reject(E.EISDIR)
    if moves:
        if src_is_dir and not tgt_is_dir and new_dir.nlink >= LINK_MAX:
            raise Reject(E.EMLINK)
        if exchange and tgt_is_dir and not src_is_dir and old_dir.nlink >= LINK_MAX:
            raise Reject(E.EMLINK)
    if tgt is not None and not exchange and tgt_is_dir and not tx.dir_is_empty(tgt_ino):
        raise Reject(E.ENOTEMPTY)

    now = tx.now
    src_attr = tx.attr(src_ino)
    assert src_attr is not None, f"an entry names inode {src_ino}, which does not exist"
    if exchange:
        tgt_attr = tx.attr(tgt_ino)
        assert tgt_attr is not None, f"an entry names inode {tgt_ino}, which does not exist"
        tx.put(dirent_key(c.parent, c.name), encode_dirent(tgt_ino, tgt_attr.mode))
        tx.put(dirent_key(c.new_parent, c.new_name), encode_dirent(src_ino, src_attr.mode))
        tx.put_attr(_changed(src_attr, now, src_attr.nlink))
        tx.put_attr(_changed(tgt_attr, now, tgt_attr.nlink))
        old_delta = new_delta = 0
        if moves:
            if src_is_dir:
                tx.put(parent_key(src_ino), u64(c.new_parent))
            if tgt_is_dir:
                tx.put(parent_key(tgt_ino), u64(c.parent))
            if src_is_dir != tgt_is_dir:
                old_delta = -1 if src_is_dir else 1
                new_delta = -old_delta
        tx.touch_dir(c.parent, old_delta)
        if moves:
            tx.touch_dir(c.new_parent, new_delta)
        return 0

    tx.delete(dirent_key(c.parent, c.name))
    tx.put(dirent_key(c.new_parent, c.new_name), encode_dirent(src_ino, src_attr.mode))
    tx.put_attr(_changed(src_attr, now, src_attr.nlink))
    new_delta = 0
    if tgt is not None:
        if tgt_is_dir:
            _drop_inode(tx, tgt_ino)
            new_delta -= 1
        else:
            _unlink_inode(tx, tgt_ino)
    if src_is_dir and moves:
        tx.put(parent_key(src_ino), u64(c.new_parent))
        new_delta += 1
        tx.touch_dir(c.parent, -1)
    else:
        tx.touch_dir(c.parent)
    if moves:
        tx.touch_dir(c.new_parent, new_delta)
    elif new_delta:
        tx.touch_dir(c.parent, new_delta)
    return 0


def _setattr(tx: _Tx, c: SetAttr) -> int:
    a = tx.attr(c.inode)
    if a is None:
        raise Reject(E.ENOENT)
    if c.mode is not None:
        _mode(c.mode)
    if c.uid is not None:
        _u32(c.uid)
    if c.gid is not None:
        _u32(c.gid)
    if c.size is not None:
        if a.is_dir:
            raise Reject(E.EISDIR)
        if not a.is_reg or c.size < 0:
            raise Reject(E.EINVAL)
    requested = (
        c.mode is not None
        or c.uid is not None
        or c.gid is not None
        or c.size is not None
        or c.atime is not None
        or c.mtime is not None
        or c.atime_now
        or c.mtime_now
    )
    if not requested:
        return 0
    now = tx.now
    mode = a.mode if c.mode is None else a.kind | (c.mode & _PERM_BITS)
    uid = a.uid if c.uid is None else c.uid
    gid = a.gid if c.gid is None else c.gid
    if c.mode is None and not a.is_dir and (uid != a.uid or gid != a.gid):
        mode &= ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
    atime = now if c.atime_now else (a.atime_ns if c.atime is None else c.atime)
    mtime = now if c.mtime_now else (a.mtime_ns if c.mtime is None else c.mtime)
    size = a.size
    if c.size is not None and c.size != a.size:
        if c.size < a.size:
            _truncate(tx, a.ino, c.size, tx.volume().chunk_size)
        size = c.size
        if c.mtime is None and not c.mtime_now:
            mtime = now  # POSIX: a size change marks mtime and ctime
    tx.put_attr(
        replace(
            a, mode=mode, uid=uid, gid=gid, size=size, atime_ns=atime, mtime_ns=mtime, ctime_ns=now
        )
    )
    return 0


def _check_xattr_name(name: bytes) -> None:
    if not name or len(name) > XATTR_NAME_MAX:
        raise Reject(E.ERANGE)
    if b"\0" in name:
        raise Reject(E.EINVAL)


def _setxattr(tx: _Tx, c: SetXattr) -> int:
    if c.flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise Reject(E.EINVAL)
    _check_xattr_name(c.name)
    if len(c.value) > XATTR_SIZE_MAX:
        raise Reject(E.E2BIG)
    a = tx.attr(c.inode)
    if a is None:
        raise Reject(E.ENOENT)
    key = xattr_key(a.ino, c.name)
    exists = tx.get(key) is not None
    if c.flags & XATTR_CREATE and exists:
        raise Reject(E.EEXIST)
    if c.flags & XATTR_REPLACE and not exists:
        raise Reject(E.ENODATA)
    tx.put(key, c.value)
    tx.put_attr(_changed(a, tx.now, a.nlink))
    return 0


def _removexattr(tx: _Tx, c: RemoveXattr) -> int:
    _check_xattr_name(c.name)
    a = tx.attr(c.inode)
    if a is None:
        raise Reject(E.ENOENT)
    key = xattr_key(a.ino, c.name)
    if tx.get(key) is None:
        raise Reject(E.ENODATA)
    tx.delete(key)
    tx.put_attr(_changed(a, tx.now, a.nlink))
    return 0


def _commit_slice(tx: _Tx, c: CommitSlice) -> int:
    a = _regular(tx, c.inode)
    vol = tx.volume()
    if c.append and (c.chunk_index != 0 or c.slice.offset != 0):
        raise Reject(E.EINVAL)  # an append's place is the fold's to decide
    end = _validate_slice(vol, c.chunk_index, c.slice)
    size = a.size
    if c.truncate_to is not None:
        if c.truncate_to < 0:
            raise Reject(E.EINVAL)
        if c.truncate_to < size:
            _truncate(tx, a.ino, c.truncate_to, vol.chunk_size)
        size = c.truncate_to
    if c.append:
        end = _place_append(tx, a.ino, size, c.slice, vol.chunk_size)
    else:
        key = slice_key(a.ino, c.chunk_index, tx.offset)
        tx.put(key, encode_slice(c.slice))
        tx.fresh.add(key)
    now = tx.now
    tx.put_attr(_changed(a, now, a.nlink, size=max(size, end), mtime=True))
    return 0


def _place_append(tx: _Tx, ino: int, size: int, s: SliceRef, chunk_size: int) -> int:
    """Put an appended slice at file offset `size`; return the new end of the file.

    Where the bytes cross a chunk boundary the slice is recorded once per
    chunk, each part showing the next run of the same blocks (its `skip`), so
    no byte is copied and every chunk keeps only slices that lie inside it.
    """
    end = size + s.length
    if end > MAX_FILE_SIZE:
        raise Reject(E.EFBIG)
    pos, done = size, 0
    while done < s.length:
        index, within = divmod(pos, chunk_size)
        n = min(chunk_size - within, s.length - done)
        key = slice_key(ino, index, tx.offset)
        tx.put(key, encode_slice(replace(s, offset=within, length=n, skip=s.skip + done)))
        tx.fresh.add(key)
        pos += n
        done += n
    return end


def _compact_chunk(tx: _Tx, c: CompactChunk) -> int:
    """Replace a chunk's slices by one, if they are still the ones the compactor read.

    Equal slice ids do not prove equal bytes: a truncation cuts slices short
    without changing their ids, and a later extension leaves zeros behind the
    cut. Since every cut of a chunk lies at or after the end of its slices, the
    compacted slice is cut at the end of the current slices: what lies beyond
    was either zeros when the compactor read it or has been truncated away since.
    """
    a = _regular(tx, c.inode)
    vol = tx.volume()
    _validate_slice(vol, c.chunk_index, c.slice)
    prefix = chunk_key(a.ino, c.chunk_index)
    entries = list(tx.scan(prefix, prefix_end(prefix)))
    if [slice_id_of(value) for _key, value in entries] != list(c.expected):
        raise Reject(E.ESTALE)
    if not entries:
        return 0  # nothing to compact
    current = [decode_slice(value) for _key, value in entries]
    if c.slice.offset > min(s.offset for s in current):
        raise Reject(E.EINVAL)  # the new slice would drop data it claims to replace
    current_end = max(s.offset + s.length for s in current)
    s = c.slice
    if s.offset + s.length > current_end:
        s = replace(s, length=current_end - s.offset)
    for key, _value in entries:
        tx.delete(key)
    key = slice_key(a.ino, c.chunk_index, tx.offset)
    tx.put(key, encode_slice(s))
    tx.fresh.add(key)
    return 0


def _reclaim(tx: _Tx, c: Reclaim) -> int:
    a = tx.attr(c.inode)
    if a is None:
        raise Reject(E.ENOENT)
    if a.nlink > 0:
        return 0  # linked again or never unlinked: nothing to reclaim
    _drop_inode(tx, a.ino)
    return 0


def _noop(tx: _Tx, c: Noop) -> int:
    return 0


_HANDLERS: dict[type, Callable[[_Tx, Any], int]] = {
    CreateVolume: _create_volume,
    AddRegion: _volume_command,
    Mknod: _mknod,
    Mkdir: _mkdir,
    Symlink: _symlink,
    Link: _link,
    Unlink: _unlink,
    Rmdir: _rmdir,
    Rename: _rename,
    SetAttr: _setattr,
    SetXattr: _setxattr,
    RemoveXattr: _removexattr,
    CommitSlice: _commit_slice,
    CompactChunk: _compact_chunk,
    Reclaim: _reclaim,
    Noop: _noop,
    RemoveRegion: _volume_command,
    EnableFeatures: _volume_command,
}

_USES_FEATURES: frozenset[type] = frozenset(f.command for f in FEATURES_BY_NAME.values())
"""The commands some feature uses: only those look the volume's features up."""
