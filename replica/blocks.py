"""Blocks: the on-store format of file data, and the keys blocks live under.

A slice's bytes are cut into blocks of at most `MAX_BLOCK_SIZE` bytes; block
`i` of slice `s` is stored once, under `block_key(s, i)`, and never modified
(invariant 4). Because a block is immutable, every copy of it in every region
must hold the same bytes, so a reader can check a block on its own, without
any metadata: each stored block carries a header with its length and a CRC-32
that covers the header and the payload. `unseal` verifies both on every read
and raises `CorruptBlockError` rather than ever returning a wrong byte; the
caller then fetches the block from another region.

Header layout (big-endian, `HEADER_SIZE` bytes, then the payload):

    offset  size  field
    0       4     magic b"TDFB"
    4       1     format version (1)
    5       1     flags (0; reserved)
    6       2     reserved (0)
    8       4     payload length in bytes
    12      4     CRC-32 of bytes 0..11 followed by the payload

The CRC is zlib's CRC-32: it runs at several GB/s on one core, releases the GIL
on large buffers (so parallel fetches verify in parallel) and needs nothing
beyond the standard library. It guards against rot and truncation, not against
an adversary. Covering the header too means that a flipped bit anywhere in the
object is detected, including in fields that a reader does not otherwise use.

Keys spread blocks over 256 prefixes taken from the low byte of the slice id
(which is random), so that neither an S3 partition nor one directory carries
every write:

    blocks/{slice_id & 0xff:02x}/{slice_id:016x}/{index:05d}

All blocks of one slice share the prefix `slice_prefix(slice_id)`, so that gc
and fsck can list or delete a slice in one prefix scan. The index is zero-padded
so that lexicographic order is block order for the first 100000 blocks.
"""

from __future__ import annotations

import re
import secrets
import struct
import zlib

MAX_BLOCK_SIZE = 4 << 20
"""Largest payload of one block, in bytes (the volume's default block size)."""

MAGIC = b"TDFB"
"""First four bytes of every stored block."""

FORMAT_VERSION = 1
"""The only block format this code writes and reads."""

_HEADER = struct.Struct(">4sBBHII")
_PREFIX = struct.Struct(">4sBBHI")  # the header without its CRC: what the CRC covers first

HEADER_SIZE = _HEADER.size
"""Bytes of header in front of each block's payload."""

BLOCKS_PREFIX = "blocks/"
"""Every block key starts with this, so that other objects (snapshots) can share a store."""

_SLICE_ID_LIMIT = 1 << 64
_KEY_RE = re.compile(r"blocks/([0-9a-f]{2})/([0-9a-f]{16})/([0-9]{5,})")


class StoreError(Exception):
    """Base of every error raised by a block store or by the block format.

    It is defined here, beside `CorruptBlockError`, so that a corrupt block is a
    store error without an import cycle; import the hierarchy from
    `tidefs.replica.store`, which re-exports it with the other store errors.
    """


class CorruptBlockError(StoreError):
    """A stored block failed verification: its bytes must not be used.

    The copy is damaged (or was never a tidefs block); another region's copy of
    the same immutable block is as good as the original.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt block {key!r}: {reason}")
        self.key = key
        self.reason = reason


def block_header(payload: bytes | bytearray | memoryview) -> bytes:
    """Return the header that precedes `payload` in its stored form.

    A backend that can write two buffers (a file) stores the header and the
    payload without joining them; `seal` is the one-buffer form. Raises
    ValueError for a payload larger than `MAX_BLOCK_SIZE`, because a larger
    block would break every reader's assumption about block size.
    """
    length = len(payload)
    if length > MAX_BLOCK_SIZE:
        raise ValueError(f"block payload of {length} bytes exceeds {MAX_BLOCK_SIZE}")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, 0, length)
    return prefix + zlib.crc32(payload, zlib.crc32(prefix)).to_bytes(4, "big")


def seal(payload: bytes | bytearray | memoryview) -> bytes:
    """Return the stored form of a block: header then payload."""
    return b"".join((block_header(payload), payload))


def check_header(key: str, header: bytes | bytearray | memoryview, stored_size: int) -> int:
    """Validate the header of a stored object of `stored_size` bytes; return the payload length.

    Split from `unseal` so that a backend can read the header, then exactly the
    payload into its own buffer, and skip one copy of every block it serves.
    """
    if len(header) < HEADER_SIZE or stored_size < HEADER_SIZE:
        got = min(len(header), stored_size)
        raise CorruptBlockError(key, f"truncated header ({got} of {HEADER_SIZE} bytes)")
    magic, version, flags, reserved, length, _crc = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise CorruptBlockError(key, f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlockError(key, f"unsupported format version {version}")
    if flags or reserved:
        raise CorruptBlockError(key, f"unknown flags {flags:#x}/{reserved:#x}")
    stored = stored_size - HEADER_SIZE
    if stored != length:
        what = "truncated" if stored < length else "trailing bytes"
        raise CorruptBlockError(key, f"{what}: header says {length} bytes, object holds {stored}")
    return int(length)


def check_payload(
    key: str, header: bytes | bytearray | memoryview, payload: bytes | bytearray | memoryview
) -> None:
    """Verify `payload` against the checksum of a header that passed `check_header`."""
    stored = int.from_bytes(header[_PREFIX.size : HEADER_SIZE], "big")
    actual = zlib.crc32(payload, zlib.crc32(header[: _PREFIX.size]))
    if actual != stored:
        raise CorruptBlockError(
            key, f"checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        )


def unseal(key: str, data: bytes | bytearray | memoryview) -> bytes:
    """Verify a stored block and return its payload.

    `key` only names the block in the error. Raises `CorruptBlockError` for a
    short or long object, a foreign magic, an unknown version or flags, or a
    checksum mismatch: the one thing this function never does is return bytes
    that differ from what `seal` was given.
    """
    view = memoryview(data)
    header = view[:HEADER_SIZE]
    check_header(key, header, len(view))
    payload = view[HEADER_SIZE:]
    check_payload(key, header, payload)
    return payload.tobytes()


def new_slice_id() -> int:
    """Return a fresh random slice id in [1, 2**63).

    Slice ids come from the writer, not the log, because blocks are uploaded
    before the command that records them is appended (DESIGN: "region id +
    random 64-bit id"). The region half is carried by `SliceRef.home`, so the id
    itself is 63 random bits: positive and within an Avro `long`. Ids are not
    checked for collisions; by the birthday bound a volume that has written n
    slices has a chance of about n**2 / 2**64 of any two sharing an id (about
    one in 1800 at 10**8 slices, one in 18 at 10**9).
    """
    return 1 + secrets.randbelow((1 << 63) - 1)


def slice_prefix(slice_id: int) -> str:
    """Return the key prefix shared by all blocks of `slice_id` (ends with '/')."""
    if not 0 <= slice_id < _SLICE_ID_LIMIT:
        raise ValueError(f"slice id {slice_id} is not an unsigned 64-bit integer")
    return f"{BLOCKS_PREFIX}{slice_id & 0xFF:02x}/{slice_id:016x}/"


def block_key(slice_id: int, index: int) -> str:
    """Return the store key of block `index` of slice `slice_id`."""
    if index < 0:
        raise ValueError(f"block index {index} is negative")
    return f"{slice_prefix(slice_id)}{index:05d}"


def parse_block_key(key: str) -> tuple[int, int]:
    """Return (slice_id, index) of a key made by `block_key`.

    Raises ValueError for anything else, including keys that differ from the
    canonical form only in padding or fan-out, so that gc never mistakes a
    foreign object for a block.
    """
    match = _KEY_RE.fullmatch(key)
    if match is None:
        raise ValueError(f"not a block key: {key!r}")
    slice_id, index = int(match[2], 16), int(match[3])
    if block_key(slice_id, index) != key:
        raise ValueError(f"not a canonical block key: {key!r}")
    return slice_id, index
