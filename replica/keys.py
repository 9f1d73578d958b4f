"""Key layout and value encodings of a region's RocksDB state.

Every key starts with a one-byte tag naming the kind of record, followed by
big-endian fixed-width integers, so that RocksDB's bytewise order is the
numeric order and every "all X of inode N" question is one prefix scan:

    tag  key                                         value
    \\0   \\0 + name                                    meta (not digested): applied offset,
                                                     digest, format, outcome window, and
                                                     each outcome generation's digest share
    V    V                                           the volume record
    F    F                                           the schema version and features the
                                                     volume enabled (absent: legacy level)
    I    I + ino                                     inode attributes (Attr)
    S    S + ino                                     symlink target
    P    P + ino                                     parent of a directory (for `..` and
                                                     the rename-into-own-subtree check)
    D    D + parent + cookie + name                  directory entry -> child ino, type
    C    C + ino + chunk index + sequence            one slice of the chunk; the sequence
                                                     (the log offset of the command that
                                                     placed it) orders slices oldest first
    X    X + ino + name                              extended attribute value
    O    O + ino                                     orphan: nlink 0, awaiting Reclaim
    R    R + generation + request id                 the Outcome of that request

A directory entry's middle field is its readdir cookie: a 63-bit hash of the
name, never below `COOKIE_MIN`. Listing a directory walks its prefix in cookie
order, so a cookie handed to the kernel stays a valid resume point however the
directory changes meanwhile (the ext4 htree answer to telldir/seekdir); lookup
is a direct get because the name is in the key. Two names of one directory
sharing a 63-bit hash (probability about n**2 / 2**64) both exist and are both
listed, but a listing resumed between them skips the second.

A chunk's slices are one key each, not one list per chunk: recording a write
puts one small key instead of rewriting a value that grows with every write
(quadratic for a log written line by line), and a chunk's slice list is a
prefix scan of `chunk_key(ino, index)`.

Values are compact struct-packed records, never JSON: the fold writes several
per command and the state of a large volume holds hundreds of millions.

Outcomes are grouped in generations of `window` offsets (generation =
offset // window), so that forgetting old ones is one range deletion per
generation instead of a delete per record. The digest's share of each
generation is kept in meta (`\\0gen` + generation) so the range can leave the
digest in O(1) too.

The state digest is order-independent: the sum modulo 2**256 of
`entry_hash(key, value)` over every live (non-meta) key. Adding on put and
subtracting on delete keeps it current in O(1) per change, and two states with
the same digest hold the same keys and values with overwhelming probability.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from tidefs.journal.commands import Outcome, Region, SliceRef

FORMAT_VERSION = 3
"""Version of this key layout; stored in meta so an old binary never misreads a newer state.

3: one key per slice (C + ino + chunk + sequence) and a slice's `skip`."""

TAG_META = b"\x00"
TAG_VOLUME = b"V"
TAG_INODE = b"I"
TAG_SYMLINK = b"S"
TAG_PARENT = b"P"
TAG_DIRENT = b"D"
TAG_CHUNK = b"C"
TAG_XATTR = b"X"
TAG_ORPHAN = b"O"
TAG_OUTCOME = b"R"
TAG_FEATURES = b"F"

META_APPLIED = TAG_META + b"applied"
META_DIGEST = TAG_META + b"digest"
META_FORMAT = TAG_META + b"format"
META_WINDOW = TAG_META + b"window"
META_GENSUM = TAG_META + b"gen"

VOLUME_KEY = TAG_VOLUME
FEATURES_KEY = TAG_FEATURES
LIVE_START = b"\x01"
"""Every live (digested) key sorts at or after this; every meta key before it."""

COOKIE_MIN = 3
"""Smallest readdir cookie of an entry: 0 means "from the start", 1 and 2 are left for `.` and `..`."""

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

DIGEST_SIZE = 32
DIGEST_MOD = 1 << (8 * DIGEST_SIZE)
EMPTY_DIGEST = bytes(DIGEST_SIZE)

_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64X2 = struct.Struct(">QQ")
_U64X3 = struct.Struct(">QQQ")
_DIRENT = struct.Struct(">QB")
_ATTR = struct.Struct(">IIIIQqqqQQ")
_SLICE = struct.Struct(">qQQQIH")
_OUTCOME = struct.Struct(">IQq")
_VOLUME = struct.Struct(">QQQH")


# -- keys ----------------------------------------------------------------------


def u64(n: int) -> bytes:
    """Return `n` as 8 big-endian bytes (the integer field of every key)."""
    return _U64.pack(n)


def read_u64(data: bytes, at: int = 0) -> int:
    """Return the big-endian u64 at byte `at` of `data`."""
    return int(_U64.unpack_from(data, at)[0])


def prefix_end(prefix: bytes) -> bytes:
    """Return the smallest key greater than every key that starts with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("a prefix of only 0xff bytes has no end")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def name_cookie(name: bytes) -> int:
    """Return the readdir cookie of a directory entry name: a 63-bit hash, >= COOKIE_MIN.

    63 bits because FUSE and telldir carry the cookie in a signed 64-bit offset.
    """
    h = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big") >> 1
    return h if h >= COOKIE_MIN else h + COOKIE_MIN


def inode_key(ino: int) -> bytes:
    """Key of an inode's attributes."""
    return TAG_INODE + _U64.pack(ino)


def symlink_key(ino: int) -> bytes:
    """Key of a symlink's target."""
    return TAG_SYMLINK + _U64.pack(ino)


def parent_key(ino: int) -> bytes:
    """Key of a directory's parent inode."""
    return TAG_PARENT + _U64.pack(ino)


def orphan_key(ino: int) -> bytes:
    """Key marking an inode with no links left, until Reclaim."""
    return TAG_ORPHAN + _U64.pack(ino)


def dirent_prefix(parent: int) -> bytes:
    """Prefix of every entry of directory `parent`."""
    return TAG_DIRENT + _U64.pack(parent)


def dirent_key(parent: int, name: bytes) -> bytes:
    """Key of the entry `name` of directory `parent`."""
    return TAG_DIRENT + _U64X2.pack(parent, name_cookie(name)) + name


def dirent_cookie_key(parent: int, cookie: int) -> bytes:
    """Return the first possible key of the entries of `parent` with this cookie."""
    return TAG_DIRENT + _U64X2.pack(parent, cookie)


def split_dirent_key(key: bytes) -> tuple[int, int, bytes]:
    """Return (parent, cookie, name) of a directory entry key."""
    parent, cookie = _U64X2.unpack_from(key, 1)
    return parent, cookie, key[17:]


def chunk_prefix(ino: int) -> bytes:
    """Prefix of every chunk of a file."""
    return TAG_CHUNK + _U64.pack(ino)


def chunk_key(ino: int, index: int) -> bytes:
    """Prefix of the slice keys of chunk `index` of a file."""
    return TAG_CHUNK + _U64X2.pack(ino, index)


def slice_key(ino: int, index: int, sequence: int) -> bytes:
    """Key of one slice of chunk `index`: `sequence` (a log offset) orders a chunk's slices."""
    return TAG_CHUNK + _U64X3.pack(ino, index, sequence)


def split_chunk_key(key: bytes) -> tuple[int, int]:
    """Return (ino, chunk index) of a slice key (or of a chunk prefix)."""
    ino, index = _U64X2.unpack_from(key, 1)
    return ino, index


def slice_sequence(key: bytes) -> int:
    """Return the sequence (log offset of the placing command) of a slice key."""
    return int(_U64.unpack_from(key, 17)[0])


def xattr_prefix(ino: int) -> bytes:
    """Prefix of every extended attribute of an inode."""
    return TAG_XATTR + _U64.pack(ino)


def xattr_key(ino: int, name: bytes) -> bytes:
    """Key of the extended attribute `name` of an inode."""
    return TAG_XATTR + _U64.pack(ino) + name


def outcome_key(generation: int, request_id: bytes) -> bytes:
    """Key of the outcome of a request folded in outcome generation `generation`."""
    return TAG_OUTCOME + _U64.pack(generation) + request_id


def outcome_prefix(generation: int) -> bytes:
    """Return the prefix of every outcome key of one generation."""
    return TAG_OUTCOME + _U64.pack(generation)


def gensum_key(generation: int) -> bytes:
    """Return the meta key holding one outcome generation's share of the digest."""
    return META_GENSUM + _U64.pack(generation)


def key_inode(key: bytes) -> int:
    """Return the inode a key of tag I, S, P, C, X, O or D (the parent) belongs to."""
    return int(_U64.unpack_from(key, 1)[0])


# -- attributes ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode, as `stat` reports them (times in ns since the epoch)."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    generation: int = 0

    @property
    def kind(self) -> int:
        """The file type bits (`stat.S_IFREG`, `stat.S_IFDIR`, ...)."""
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """Whether this is a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """Whether this is a symbolic link."""
        return stat.S_ISLNK(self.mode)


def encode_attr(a: Attr) -> bytes:
    """Pack attributes; the inode number lives in the key."""
    return _ATTR.pack(
        a.mode,
        a.uid,
        a.gid,
        a.nlink,
        a.size,
        a.atime_ns,
        a.mtime_ns,
        a.ctime_ns,
        a.rdev,
        a.generation,
    )


def decode_attr(ino: int, data: bytes) -> Attr:
    """Unpack the attributes of inode `ino`."""
    return Attr(ino, *_ATTR.unpack(data))


# -- directory entries ---------------------------------------------------------


def encode_dirent(child: int, mode: int) -> bytes:
    """Pack a directory entry: the child inode and its type nibble (mode >> 12), for d_type."""
    return _DIRENT.pack(child, stat.S_IFMT(mode) >> 12)


def decode_dirent(data: bytes) -> tuple[int, int]:
    """Return (child inode, file type bits) of an entry value."""
    child, nibble = _DIRENT.unpack(data)
    return child, nibble << 12


# -- slices --------------------------------------------------------------------


def encode_slice(s: SliceRef) -> bytes:
    """Pack one slice (the value of a slice key)."""
    home = s.home.encode()
    return _SLICE.pack(s.slice_id, s.offset, s.length, s.skip, s.block_size, len(home)) + home


def encode_slices(slices: list[SliceRef]) -> bytes:
    """Pack a list of slices, oldest first (decode_slices reads it back)."""
    return b"".join(encode_slice(s) for s in slices)


def decode_slices(data: bytes) -> list[SliceRef]:
    """Unpack packed slices (one slice key's value, or encode_slices' output), oldest first."""
    out: list[SliceRef] = []
    at = 0
    size = _SLICE.size
    while at < len(data):
        slice_id, offset, length, skip, block_size, home_len = _SLICE.unpack_from(data, at)
        at += size
        home = data[at : at + home_len].decode()
        at += home_len
        out.append(SliceRef(slice_id, offset, length, block_size, home, skip))
    return out


def decode_slice(data: bytes) -> SliceRef:
    """Unpack the one slice of a slice key's value."""
    slice_id, offset, length, skip, block_size, home_len = _SLICE.unpack_from(data, 0)
    home = data[_SLICE.size : _SLICE.size + home_len].decode()
    return SliceRef(slice_id, offset, length, block_size, home, skip)


def slice_id_of(data: bytes) -> int:
    """Return the slice id of a slice key's value without building a SliceRef."""
    return int(_I64.unpack_from(data, 0)[0])


# -- outcomes ------------------------------------------------------------------


def encode_outcome(o: Outcome) -> bytes:
    """Pack an outcome: errno, inode, offset."""
    return _OUTCOME.pack(o.errno, o.inode, o.offset)


def decode_outcome(data: bytes) -> Outcome:
    """Unpack an outcome."""
    errno_, inode, offset = _OUTCOME.unpack(data)
    return Outcome(errno_, inode, offset)


# -- the volume ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """The volume record: what CreateVolume and AddRegion established."""

    name: str
    regions: tuple[Region, ...]
    primary: str
    chunk_size: int
    block_size: int
    retention_s: int

    def region(self, name: str) -> Region | None:
        """Return the region called `name`, or None."""
        for r in self.regions:
            if r.name == name:
                return r
        return None


def _pack_str(s: str) -> bytes:
    raw = s.encode()
    return _U16.pack(len(raw)) + raw


def _unpack_str(data: bytes, at: int) -> tuple[str, int]:
    (n,) = _U16.unpack_from(data, at)
    at += 2
    return data[at : at + n].decode(), at + n


def encode_volume(v: VolumeInfo) -> bytes:
    """Pack the volume record: sizes, then length-prefixed UTF-8 strings."""
    parts = [_VOLUME.pack(v.chunk_size, v.block_size, v.retention_s, len(v.regions))]
    parts.append(_pack_str(v.name))
    parts.append(_pack_str(v.primary))
    for r in v.regions:
        parts.append(_pack_str(r.name))
        parts.append(_pack_str(r.store_url))
    return b"".join(parts)


@lru_cache(maxsize=16)
def decode_volume(data: bytes) -> VolumeInfo:
    """Decode the volume record; cached because the fold reads it for every write."""
    chunk_size, block_size, retention_s, n = _VOLUME.unpack_from(data, 0)
    at = _VOLUME.size
    name, at = _unpack_str(data, at)
    primary, at = _unpack_str(data, at)
    regions = []
    for _ in range(n):
        rname, at = _unpack_str(data, at)
        url, at = _unpack_str(data, at)
        regions.append(Region(rname, url))
    return VolumeInfo(name, tuple(regions), primary, chunk_size, block_size, retention_s)


def encode_features(schema_version: int, names: Iterable[str]) -> bytes:
    """Pack what a volume enabled: the schema version, then its feature names, sorted."""
    ordered = sorted(set(names))
    return _U32.pack(schema_version) + _U16.pack(len(ordered)) + b"".join(map(_pack_str, ordered))


def decode_features(data: bytes) -> tuple[int, frozenset[str]]:
    """Return (schema version, feature names) of an `encode_features` value."""
    (schema_version,) = _U32.unpack_from(data, 0)
    (n,) = _U16.unpack_from(data, _U32.size)
    at = _U32.size + _U16.size
    names = []
    for _ in range(n):
        name, at = _unpack_str(data, at)
        names.append(name)
    return schema_version, frozenset(names)


def fits_str16(s: str) -> bool:
    """Whether `s` encodes as UTF-8 in at most 65535 bytes (the length prefix of a string field)."""
    try:
        return len(s.encode()) <= 0xFFFF
    except UnicodeEncodeError:
        return False


# -- meta ----------------------------------------------------------------------


def encode_offset(offset: int) -> bytes:
    """Pack a signed 64-bit offset (meta values)."""
    return _I64.pack(offset)


def decode_offset(data: bytes) -> int:
    """Unpack a signed 64-bit offset."""
    return int(_I64.unpack(data)[0])


def encode_u32(n: int) -> bytes:
    """Pack an unsigned 32-bit integer (meta values)."""
    return _U32.pack(n)


def decode_u32(data: bytes) -> int:
    """Unpack an unsigned 32-bit integer."""
    return int(_U32.unpack(data)[0])


# -- digest --------------------------------------------------------------------


def entry_hash(key: bytes, value: bytes) -> int:
    """Return the digest contribution of one live key and its value.

    The key's length is hashed first so that no (key, value) split of the same
    bytes collides with another.
    """
    h = hashlib.blake2b(_U32.pack(len(key)), digest_size=DIGEST_SIZE)
    h.update(key)
    h.update(value)
    return int.from_bytes(h.digest(), "big")


def digest_bytes(total: int) -> bytes:
    """Return the 32-byte form of a digest sum."""
    return (total % DIGEST_MOD).to_bytes(DIGEST_SIZE, "big")


def digest_of(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Recompute a digest from scratch over (key, value) pairs of live keys."""
    total = 0
    for key, value in items:
        total += entry_hash(key, value)
    return digest_bytes(total)
