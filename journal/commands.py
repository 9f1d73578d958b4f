"""Commands: every metadata mutation of a tidefs volume, as plain frozen values.

A command is what a writer asks for; the fold decides, against the state at the
command's log position, whether it applies or is rejected with an errno. Each
class here is one Avro record in `schemas/envelope.avsc` with the same name and
fields, and `Envelope` wraps one of them with the request id, the writing
region and the writer's clock. Nothing in this module does I/O.

Conventions shared by all commands:
- inode numbers are 64-bit; the root directory is `ROOT_INODE`; the inode of a
  new node is `inode_for_offset(offset)` of the command that created it;
- `mode` carries the file type bits (`stat.S_IFREG`, ...) and the permission bits;
- times are nanoseconds since the epoch; where a command says "now" it means
  the envelope's `timestamp_ns`, so that every region folds the same value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

ROOT_INODE = 1
"""The inode number of every volume's root directory."""

FIRST_INODE_OFFSET_BASE = 2
"""New inodes are `offset + FIRST_INODE_OFFSET_BASE`, so that none collides with the root."""

NAME_MAX = 255
"""Longest name of a directory entry, in bytes (ENAMETOOLONG beyond)."""

LINK_MAX = 65000
"""Most hard links one inode may have (EMLINK beyond)."""

PATH_MAX = 4096
"""Longest symlink target, in bytes."""

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

XATTR_CREATE = 1
XATTR_REPLACE = 2


def inode_for_offset(offset: int) -> int:
    """Return the inode number of the node created by the command at `offset`."""
    return offset + FIRST_INODE_OFFSET_BASE


@dataclass(frozen=True, slots=True)
class Region:
    """A region of a volume: its name and the URL of its block store."""

    name: str
    store_url: str


@dataclass(frozen=True, slots=True)
class CreateVolume:
    """Create the volume and its root directory; valid only as the first command."""

    name: str
    regions: tuple[Region, ...]
    primary: str
    chunk_size: int = 64 << 20
    block_size: int = 4 << 20
    retention_s: int = 7 * 24 * 3600
    root_mode: int = 0o40755
    root_uid: int = 0
    root_gid: int = 0


@dataclass(frozen=True, slots=True)
class AddRegion:
    """Add a region (name and store URL) to an existing volume."""

    region: Region


@dataclass(frozen=True, slots=True)
class Mknod:
    """Create a non-directory node: regular file, fifo, socket, char or block device.

    `exclusive` false means an existing regular file of that name is not an error
    (open with O_CREAT without O_EXCL): the outcome then names the existing inode.
    """

    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    exclusive: bool = True


@dataclass(frozen=True, slots=True)
class Mkdir:
    """Create a directory."""

    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Symlink:
    """Create a symbolic link to `target`."""

    parent: int
    name: bytes
    target: bytes
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Link:
    """Make a new hard link `new_parent/new_name` to `inode`."""

    inode: int
    new_parent: int
    new_name: bytes


@dataclass(frozen=True, slots=True)
class Unlink:
    """Remove a non-directory entry. The inode lives on while nlink > 0 or it is open."""

    parent: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rmdir:
    """Remove an empty directory."""

    parent: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    """Rename `parent/name` to `new_parent/new_name` (flags: RENAME_NOREPLACE, RENAME_EXCHANGE)."""

    parent: int
    name: bytes
    new_parent: int
    new_name: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class SetAttr:
    """Change attributes; a field left None stays as it is.

    `atime_now`/`mtime_now` set that time to the envelope's timestamp (UTIME_NOW).
    A size change truncates or extends the file (holes read as zeros).
    `ctime` is always set to the envelope's timestamp when anything changes.
    """

    inode: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | None = None
    mtime: int | None = None
    atime_now: bool = False
    mtime_now: bool = False


@dataclass(frozen=True, slots=True)
class SetXattr:
    """Set an extended attribute (flags: XATTR_CREATE, XATTR_REPLACE)."""

    inode: int
    name: bytes
    value: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    """Remove an extended attribute (ENODATA when absent)."""

    inode: int
    name: bytes


@dataclass(frozen=True, slots=True)
class SliceRef:
    """A run of bytes inside one chunk, stored as immutable blocks keyed by `slice_id`.

    The slice's bytes are blocks 0..n-1 of at most `block_size` bytes each;
    the slice shows its bytes [skip, skip + length) at [offset, offset + length)
    of its chunk. `skip` is nonzero only for the later parts of a slice that the
    fold split across chunks (an append that crossed a chunk boundary). `home`
    is the region whose store received the blocks first.
    """

    slice_id: int
    offset: int
    length: int
    block_size: int
    home: str
    skip: int = 0


@dataclass(frozen=True, slots=True)
class CommitSlice:
    """Record a written slice of a file; the file grows to cover it, mtime/ctime = now.

    `truncate_to`, when set, first truncates the file to that size (an O_TRUNC
    open followed by writes, folded as one command).

    `append` (an O_APPEND write): the slice goes at the end of the file as the
    fold finds it at the command's log position, not at `chunk_index` and
    `slice.offset` (both 0), and is split across chunks where it crosses a
    boundary. So appenders in any number of regions never overwrite each other.
    """

    inode: int
    chunk_index: int
    slice: SliceRef
    truncate_to: int | None = None
    append: bool = False


@dataclass(frozen=True, slots=True)
class CompactChunk:
    """Replace the slices of a chunk with one slice, only if they are unchanged.

    `expected` is the list of slice ids the compactor read; if the chunk's
    slices differ at this offset the command is rejected (ESTALE) and the new
    blocks become garbage.
    """

    inode: int
    chunk_index: int
    expected: tuple[int, ...]
    slice: SliceRef


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Drop an inode whose link count is zero, once no mount holds it open."""

    inode: int


@dataclass(frozen=True, slots=True)
class Noop:
    """Do nothing; used as a barrier and as a liveness probe."""

    note: str = ""


@dataclass(frozen=True, slots=True)
class RemoveRegion:
    """Remove a region from the volume (never the primary). Schema v2, feature region_remove.

    The fold only checks the volume's record; that no live block has its only
    copy in that region's store is checked by `tidefs region remove` first.
    """

    name: str


@dataclass(frozen=True, slots=True)
class EnableFeatures:
    """Let writers encode with `schema_version` and use `features` (schema v2).

    Appended by `tidefs upgrade` (and by `format`, for everything its tidefs
    knows) once every region runs a tidefs that knows them: a tidefs that does
    not stops its fold just before this record (tidefs.journal.features).
    """

    schema_version: int
    features: tuple[str, ...]


Command = (
    CreateVolume
    | AddRegion
    | Mknod
    | Mkdir
    | Symlink
    | Link
    | Unlink
    | Rmdir
    | Rename
    | SetAttr
    | SetXattr
    | RemoveXattr
    | CommitSlice
    | CompactChunk
    | Reclaim
    | Noop
    | RemoveRegion
    | EnableFeatures
)

COMMAND_TYPES: tuple[type, ...] = (
    CreateVolume,
    AddRegion,
    Mknod,
    Mkdir,
    Symlink,
    Link,
    Unlink,
    Rmdir,
    Rename,
    SetAttr,
    SetXattr,
    RemoveXattr,
    CommitSlice,
    CompactChunk,
    Reclaim,
    Noop,
    RemoveRegion,
    EnableFeatures,
)


def new_request_id() -> bytes:
    """Return a fresh 16-byte request id."""
    return uuid.uuid4().bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """One log record: a command with who sent it, when, and under which request id."""

    command: Command
    origin: str
    timestamp_ns: int
    request_id: bytes = field(default_factory=new_request_id)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the fold decided for one command: errno 0 on success, and the inode it made or named."""

    errno: int
    inode: int = 0
    offset: int = -1

    @property
    def ok(self) -> bool:
        return self.errno == 0
