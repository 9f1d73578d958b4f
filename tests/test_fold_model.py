"""The fold against a small, obviously-right model of POSIX namespace semantics.

A hypothesis state machine drives random command sequences — invalid ones on
purpose: missing parents and names, renames into their own subtree, exchanges,
non-empty rmdir, hard links, symlinks, xattr flags, setattr with sizes,
written and compacted slices, reclaims, retried requests, re-delivered records
— through `State.apply` and through `Model`, a plain-dict file system written
for this test. Every errno and created inode must match, and after every step
the whole tree must too: names, types, link counts, sizes, modes, owners,
times, xattrs, symlink targets, slices, and the file bytes those slices
reassemble to. The model derives link counts from its entries instead of
counting them, so a bookkeeping slip in the fold cannot be mirrored here.
"""

from __future__ import annotations

import errno as E
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.strategies import envelopes
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
    Envelope,
    Link,
    Mkdir,
    Mknod,
    Noop,
    Outcome,
    Reclaim,
    Region,
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
from tidefs.replica import keys as K
from tidefs.replica.fold import fold_record, merge_scan
from tidefs.replica.state import State

CHUNK = 16
BLOCK = 4
WINDOW = 12
T0 = 1_000_000_000_000
U32 = (1 << 32) - 1
HOME = "a"

NAMES = [b"a", b"b", b"c", b"d", b"e"]
ODD_NAMES = [b".", b"..", b"", b"x/y", b"z\0", b"n" * NAME_MAX, b"n" * (NAME_MAX + 1)]
XNAMES = [b"user.a", b"user.b", b"trusted.c"]
ODD_XNAMES = [b"", b"u" * XATTR_NAME_MAX, b"u" * (XATTR_NAME_MAX + 1), b"user.\0x"]
BOGUS_INO = 987_654


# -- the model ---------------------------------------------------------------------


@dataclass
class Node:
    """One inode of the model. Directories hold their entries; link counts are derived."""

    mode: int
    uid: int
    gid: int
    atime: int
    mtime: int
    ctime: int
    rdev: int = 0
    size: int = 0
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    entries: dict[bytes, int] | None = None
    parent: int = 0
    data: bytearray = field(default_factory=bytearray)
    chunks: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


class Fail(Exception):
    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_


def check(cond: bool, errno_: int) -> None:
    """Fail with `errno_` unless `cond` holds."""
    if not cond:
        raise Fail(errno_)


class Model:
    """POSIX namespace semantics over plain dicts, as tidefs documents them."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.regions: list[str] = []

    # derived facts

    def links(self, ino: int) -> int:
        node = self.nodes[ino]
        if node.is_dir:
            subdirs = sum(1 for c in (node.entries or {}).values() if self.nodes[c].is_dir)
            return 2 + subdirs
        return sum(
            1
            for n in self.nodes.values()
            if n.entries is not None
            for c in n.entries.values()
            if c == ino
        )

    def ancestors_or_self(self, ino: int) -> set[int]:
        out = {ino}
        while ino != ROOT_INODE:
            ino = self.nodes[ino].parent
            out.add(ino)
        return out

    def directory(self, ino: int) -> Node:
        check(ino in self.nodes, E.ENOENT)
        node = self.nodes[ino]
        check(node.is_dir, E.ENOTDIR)
        return node

    @staticmethod
    def name_ok(name: bytes, dot: int, dotdot: int | None = None) -> None:
        check(name != b"", E.ENOENT)
        check(name != b".", dot)
        check(name != b"..", dot if dotdot is None else dotdot)
        check(b"/" not in name and b"\0" not in name, E.EINVAL)
        check(len(name) <= NAME_MAX, E.ENAMETOOLONG)

    @staticmethod
    def u32(*values: int) -> None:
        for v in values:
            check(0 <= v <= U32, E.EINVAL)

    def new_node(self, off: int, t: int, parent: Node, name: bytes, node: Node) -> int:
        if parent.mode & stat.S_ISGID:
            node.gid = parent.gid
            if node.is_dir:
                node.mode |= stat.S_ISGID
        ino = inode_for_offset(off)
        self.nodes[ino] = node
        assert parent.entries is not None
        parent.entries[name] = ino
        parent.mtime = parent.ctime = t
        return ino

    def cut(self, node: Node, size: int) -> None:
        """Truncate file data and slices to `size`."""
        del node.data[size:]
        for index in list(node.chunks):
            start = index * CHUNK
            if start >= size:
                del node.chunks[index]
                continue
            end = size - start
            kept = [(sid, o, min(n, end - o)) for sid, o, n in node.chunks[index] if o < end]
            if kept:
                node.chunks[index] = kept
            else:
                del node.chunks[index]

    # commands

    def apply(self, off: int, t: int, c: Any) -> int:
        """Apply command `c` at offset `off` and time `t`; return the inode, or raise Fail."""
        if isinstance(c, CreateVolume):
            check(not self.regions, E.EEXIST)
            self.regions = [r.name for r in c.regions]
            self.nodes[ROOT_INODE] = Node(
                stat.S_IFDIR | (c.root_mode & 0o7777), c.root_uid, c.root_gid, t, t, t, entries={}
            )
            self.nodes[ROOT_INODE].parent = ROOT_INODE
            return ROOT_INODE
        check(bool(self.regions), E.ENOENT)
        method = getattr(self, "do_" + type(c).__name__.lower())
        result: int = method(off, t, c)
        return result

    def do_noop(self, off: int, t: int, c: Noop) -> int:
        return 0

    def do_addregion(self, off: int, t: int, c: AddRegion) -> int:
        check(c.region.name != "", E.EINVAL)
        check(c.region.name not in self.regions, E.EEXIST)
        self.regions.append(c.region.name)
        return 0

    def do_mknod(self, off: int, t: int, c: Mknod) -> int:
        check(0 <= c.mode <= 0xFFFF, E.EINVAL)
        kind = stat.S_IFMT(c.mode) or stat.S_IFREG
        check(kind != stat.S_IFDIR, E.EPERM)
        check(
            kind in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK),
            E.EINVAL,
        )
        self.u32(c.uid, c.gid)
        check(c.rdev >= 0, E.EINVAL)
        excl = c.exclusive or kind != stat.S_IFREG
        parent = self.directory(c.parent)
        self.name_ok(c.name, E.EEXIST if excl else E.EISDIR)
        assert parent.entries is not None
        if c.name in parent.entries:
            existing = parent.entries[c.name]
            check(not excl, E.EEXIST)
            check(not self.nodes[existing].is_dir, E.EISDIR)
            check(self.nodes[existing].kind == stat.S_IFREG, E.EEXIST)
            return existing
        rdev = c.rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        node = Node(kind | (c.mode & 0o7777), c.uid, c.gid, t, t, t, rdev=rdev)
        return self.new_node(off, t, parent, c.name, node)

    def do_mkdir(self, off: int, t: int, c: Mkdir) -> int:
        check(0 <= c.mode <= 0xFFFF, E.EINVAL)
        self.u32(c.uid, c.gid)
        parent = self.directory(c.parent)
        self.name_ok(c.name, E.EEXIST)
        assert parent.entries is not None
        check(c.name not in parent.entries, E.EEXIST)
        check(self.links(c.parent) < LINK_MAX, E.EMLINK)
        node = Node(stat.S_IFDIR | (c.mode & 0o1777), c.uid, c.gid, t, t, t, entries={})
        node.parent = c.parent
        return self.new_node(off, t, parent, c.name, node)

    def do_symlink(self, off: int, t: int, c: Symlink) -> int:
        self.u32(c.uid, c.gid)
        check(c.target != b"", E.ENOENT)
        check(len(c.target) < PATH_MAX, E.ENAMETOOLONG)
        check(b"\0" not in c.target, E.EINVAL)
        parent = self.directory(c.parent)
        self.name_ok(c.name, E.EEXIST)
        assert parent.entries is not None
        check(c.name not in parent.entries, E.EEXIST)
        node = Node(stat.S_IFLNK | 0o777, c.uid, c.gid, t, t, t, target=c.target)
        node.size = len(c.target)
        return self.new_node(off, t, parent, c.name, node)

    def do_link(self, off: int, t: int, c: Link) -> int:
        check(c.inode in self.nodes, E.ENOENT)
        node = self.nodes[c.inode]
        parent = self.directory(c.new_parent)
        self.name_ok(c.new_name, E.EEXIST)
        assert parent.entries is not None
        check(c.new_name not in parent.entries, E.EEXIST)
        check(not node.is_dir, E.EPERM)
        check(self.links(c.inode) > 0, E.ENOENT)
        check(self.links(c.inode) < LINK_MAX, E.EMLINK)
        parent.entries[c.new_name] = c.inode
        node.ctime = t
        parent.mtime = parent.ctime = t
        return c.inode

    def do_unlink(self, off: int, t: int, c: Unlink) -> int:
        parent = self.directory(c.parent)
        self.name_ok(c.name, E.EISDIR)
        assert parent.entries is not None
        check(c.name in parent.entries, E.ENOENT)
        child = self.nodes[parent.entries[c.name]]
        check(not child.is_dir, E.EISDIR)
        del parent.entries[c.name]
        child.ctime = t
        parent.mtime = parent.ctime = t
        return 0

    def do_rmdir(self, off: int, t: int, c: Rmdir) -> int:
        parent = self.directory(c.parent)
        self.name_ok(c.name, E.EINVAL, E.ENOTEMPTY)
        assert parent.entries is not None
        check(c.name in parent.entries, E.ENOENT)
        ino = parent.entries[c.name]
        child = self.nodes[ino]
        check(child.is_dir, E.ENOTDIR)
        check(not child.entries, E.ENOTEMPTY)
        del parent.entries[c.name]
        del self.nodes[ino]
        parent.mtime = parent.ctime = t
        return 0

    def do_rename(self, off: int, t: int, c: Rename) -> int:
        noreplace = c.flags & RENAME_NOREPLACE
        exchange = c.flags & RENAME_EXCHANGE
        check(c.flags & ~3 == 0 and not (noreplace and exchange), E.EINVAL)
        old = self.directory(c.parent)
        new = self.directory(c.new_parent)
        check(c.name not in (b".", b".."), E.EBUSY)
        check(c.new_name not in (b".", b".."), E.EEXIST if noreplace else E.EBUSY)
        self.name_ok(c.name, E.EBUSY)
        assert old.entries is not None and new.entries is not None
        check(c.name in old.entries, E.ENOENT)
        self.name_ok(c.new_name, E.EBUSY)
        src = old.entries[c.name]
        tgt = new.entries.get(c.new_name)
        check(not (noreplace and tgt is not None), E.EEXIST)
        check(not (exchange and tgt is None), E.ENOENT)
        src_dir = self.nodes[src].is_dir
        tgt_dir = tgt is not None and self.nodes[tgt].is_dir
        if c.parent != c.new_parent:
            check(not (src_dir and src in self.ancestors_or_self(c.new_parent)), E.EINVAL)
            if tgt_dir and tgt in self.ancestors_or_self(c.parent):
                raise Fail(E.EINVAL if exchange else E.ENOTEMPTY)
        if tgt == src:
            return 0
        if tgt is not None and not exchange:
            check(not (src_dir and not tgt_dir), E.ENOTDIR)
            check(not (tgt_dir and not src_dir), E.EISDIR)
            check(not (tgt_dir and self.nodes[tgt].entries), E.ENOTEMPTY)
        if exchange:
            assert tgt is not None
            old.entries[c.name], new.entries[c.new_name] = tgt, src
            if src_dir:
                self.nodes[src].parent = c.new_parent
            if tgt_dir:
                self.nodes[tgt].parent = c.parent
            self.nodes[tgt].ctime = t
        else:
            del old.entries[c.name]
            if tgt is not None:
                if tgt_dir:
                    del self.nodes[tgt]
                else:
                    self.nodes[tgt].ctime = t
            new.entries[c.new_name] = src
            if src_dir:
                self.nodes[src].parent = c.new_parent
        self.nodes[src].ctime = t
        old.mtime = old.ctime = new.mtime = new.ctime = t
        return 0

    def do_setattr(self, off: int, t: int, c: SetAttr) -> int:
        check(c.inode in self.nodes, E.ENOENT)
        node = self.nodes[c.inode]
        check(c.mode is None or 0 <= c.mode <= 0xFFFF, E.EINVAL)
        self.u32(*(v for v in (c.uid, c.gid) if v is not None))
        if c.size is not None:
            check(not node.is_dir, E.EISDIR)
            check(node.kind == stat.S_IFREG and c.size >= 0, E.EINVAL)
        fields = (c.mode, c.uid, c.gid, c.size, c.atime, c.mtime)
        if all(v is None for v in fields) and not (c.atime_now or c.mtime_now):
            return 0
        if c.mode is not None:
            node.mode = node.kind | (c.mode & 0o7777)
        elif not node.is_dir and (
            (c.uid is not None and c.uid != node.uid) or (c.gid is not None and c.gid != node.gid)
        ):
            node.mode &= ~stat.S_ISUID
            if node.mode & stat.S_IXGRP:
                node.mode &= ~stat.S_ISGID
        if c.uid is not None:
            node.uid = c.uid
        if c.gid is not None:
            node.gid = c.gid
        if c.atime is not None:
            node.atime = c.atime
        if c.atime_now:
            node.atime = t
        if c.mtime is not None:
            node.mtime = c.mtime
        if c.mtime_now:
            node.mtime = t
        if c.size is not None and c.size != node.size:
            if c.mtime is None and not c.mtime_now:
                node.mtime = t
            self.resize(node, c.size)
        node.ctime = t
        return 0

    def resize(self, node: Node, size: int) -> None:
        if size < node.size:
            self.cut(node, size)
        node.data.extend(bytes(size - len(node.data)))
        node.size = size

    def do_setxattr(self, off: int, t: int, c: SetXattr) -> int:
        check(c.flags & ~(XATTR_CREATE | XATTR_REPLACE) == 0, E.EINVAL)
        check(0 < len(c.name) <= XATTR_NAME_MAX, E.ERANGE)
        check(b"\0" not in c.name, E.EINVAL)
        check(len(c.value) <= XATTR_SIZE_MAX, E.E2BIG)
        check(c.inode in self.nodes, E.ENOENT)
        node = self.nodes[c.inode]
        check(not (c.flags & XATTR_CREATE and c.name in node.xattrs), E.EEXIST)
        check(not (c.flags & XATTR_REPLACE and c.name not in node.xattrs), E.ENODATA)
        node.xattrs[c.name] = c.value
        node.ctime = t
        return 0

    def do_removexattr(self, off: int, t: int, c: RemoveXattr) -> int:
        check(0 < len(c.name) <= XATTR_NAME_MAX, E.ERANGE)
        check(b"\0" not in c.name, E.EINVAL)
        check(c.inode in self.nodes, E.ENOENT)
        node = self.nodes[c.inode]
        check(c.name in node.xattrs, E.ENODATA)
        del node.xattrs[c.name]
        node.ctime = t
        return 0

    def data_node(self, ino: int) -> Node:
        check(ino in self.nodes, E.ENOENT)
        node = self.nodes[ino]
        check(not node.is_dir, E.EISDIR)
        check(node.kind == stat.S_IFREG, E.EINVAL)
        return node

    def slice_ok(self, index: int, s: SliceRef) -> None:
        check(index >= 0 and s.offset >= 0 and s.length > 0, E.EINVAL)
        check(s.offset + s.length <= CHUNK and 0 < s.block_size <= U32, E.EINVAL)
        check(s.home in self.regions, E.EINVAL)

    def do_commitslice(self, off: int, t: int, c: CommitSlice, blobs: dict[int, bytes]) -> int:
        node = self.data_node(c.inode)
        self.slice_ok(c.chunk_index, c.slice)
        check(c.truncate_to is None or c.truncate_to >= 0, E.EINVAL)
        if c.truncate_to is not None:
            self.resize(node, c.truncate_to)
        s = c.slice
        start = c.chunk_index * CHUNK + s.offset
        end = start + s.length
        if end > node.size:
            self.resize(node, end)
        node.data[start:end] = blobs[s.slice_id][: s.length]
        node.chunks.setdefault(c.chunk_index, []).append((s.slice_id, s.offset, s.length))
        node.mtime = node.ctime = t
        return 0

    def do_compactchunk(self, off: int, t: int, c: CompactChunk) -> int:
        node = self.data_node(c.inode)
        self.slice_ok(c.chunk_index, c.slice)
        current = node.chunks.get(c.chunk_index, [])
        check([sid for sid, _o, _n in current] == list(c.expected), E.ESTALE)
        if not current:
            return 0
        check(c.slice.offset <= min(o for _s, o, _n in current), E.EINVAL)
        # The visible bytes do not change; the new slice ends where the current ones do.
        end = max(o + n for _s, o, n in current)
        s = c.slice
        node.chunks[c.chunk_index] = [(s.slice_id, s.offset, min(s.length, end - s.offset))]
        return 0

    def do_reclaim(self, off: int, t: int, c: Reclaim) -> int:
        check(c.inode in self.nodes, E.ENOENT)
        if self.links(c.inode) == 0:
            del self.nodes[c.inode]
        return 0


# -- the state machine ----------------------------------------------------------------


def contents(state: State, ino: int, size: int, blobs: dict[int, bytes]) -> bytes:
    """Reassemble a file's bytes from its slices, as a reader would."""
    buf = bytearray(size)
    for index in state.chunks(ino):
        for s in state.slices(ino, index):
            start = index * CHUNK + s.offset
            assert start + s.length <= size, f"slice {s} of inode {ino} reaches past size {size}"
            buf[start : start + s.length] = blobs[s.slice_id][: s.length]
    return bytes(buf)


class FoldVersusModel(RuleBasedStateMachine):
    """Every command goes to the fold (one record per batch) and to the model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tidefs-model-")
        self.state = State.open(self.dir, outcome_window=WINDOW)
        self.model = Model()
        self.offset = -1
        self.sent: list[tuple[int, Envelope, Outcome]] = []
        self.blobs: dict[int, bytes] = {}
        self.next_slice = 1
        self.reads: list[tuple[int, int, tuple[int, ...], SliceRef]] = []

    def teardown(self) -> None:
        self.state.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # plumbing

    def send(self, cmd: Any, request_id: bytes | None = None) -> Outcome:
        self.offset += 1
        off, t = self.offset, T0 + self.offset * 1000
        rid = request_id if request_id is not None else off.to_bytes(16, "big")
        env = Envelope(cmd, "a", t, rid)
        [got] = self.state.apply([(off, env)]).outcomes
        # A retry is recognised while the outcome stored for its request id
        # (under the offset that outcome names) is in this generation of
        # WINDOW offsets or the one before.
        gen = off // WINDOW
        stored = [
            o for _o, e, o in self.sent if e.request_id == rid and o.offset // WINDOW >= gen - 1
        ]
        if stored:
            assert got == stored[-1], f"retry of {cmd} gave {got}, first {stored[-1]}"
        else:
            try:
                if isinstance(cmd, CommitSlice):
                    ino = self.model.do_commitslice(off, t, cmd, self.blobs)
                else:
                    ino = self.model.apply(off, t, cmd)
                want = Outcome(0, ino, off)
            except Fail as f:
                want = Outcome(f.errno, 0, off)
            assert got == want, (
                f"{cmd}: fold gave {E.errorcode.get(got.errno, got.errno)} {got}, "
                f"model {E.errorcode.get(want.errno, want.errno)} {want}"
            )
        event(f"{type(cmd).__name__} -> {E.errorcode.get(got.errno, 'ok')}")
        self.sent.append((off, env, got))
        return got

    def dirs(self) -> list[int]:
        return [i for i, n in self.model.nodes.items() if n.is_dir]

    def pick_dir(self, data: st.DataObject) -> int:
        choice = data.draw(st.integers(0, 9))
        if choice == 0:
            return BOGUS_INO
        if choice == 1:
            return data.draw(st.sampled_from(sorted(self.model.nodes)))
        return data.draw(st.sampled_from(sorted(self.dirs())))

    def pick_ino(self, data: st.DataObject) -> int:
        if data.draw(st.integers(0, 14)) == 0:
            return BOGUS_INO
        return data.draw(st.sampled_from(sorted(self.model.nodes)))

    def pick_name(self, data: st.DataObject) -> bytes:
        if data.draw(st.integers(0, 12)) == 0:
            return data.draw(st.sampled_from(ODD_NAMES))
        return data.draw(st.sampled_from(NAMES))

    def pick_entry(self, data: st.DataObject) -> tuple[int, bytes]:
        """An existing (parent, name) most of the time, anything otherwise."""
        entries = [
            (p, name)
            for p, n in self.model.nodes.items()
            if n.entries is not None
            for name in n.entries
        ]
        if entries and data.draw(st.integers(0, 4)) > 0:
            return data.draw(st.sampled_from(sorted(entries)))
        return self.pick_dir(data), self.pick_name(data)

    def pick_file(self, data: st.DataObject) -> int:
        files = sorted(i for i, n in self.model.nodes.items() if n.kind == stat.S_IFREG)
        if files and data.draw(st.integers(0, 9)) > 0:
            return data.draw(st.sampled_from(files))
        return self.pick_ino(data)

    def perm(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from([0o644, 0o755, 0o2755, 0o4755, 0o6775, 0o1777, 0]))

    def owner(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from([0, 1000, 1000, 1001, -1, U32 + 1]))

    # rules

    @initialize()
    def create_volume(self) -> None:
        assert self.send(Noop("before the volume")).errno == E.ENOENT
        cmd = CreateVolume(
            "vol",
            (Region(HOME, "file:///a"), Region("b", "file:///b")),
            HOME,
            chunk_size=CHUNK,
            block_size=BLOCK,
            root_mode=0o40755,
            root_uid=0,
            root_gid=100,
        )
        assert self.send(cmd).ok
        # A small tree to start from, so that most steps act on something.
        a = self.send(Mkdir(ROOT_INODE, b"a", 0o755, 1000, 1000)).inode
        b = self.send(Mkdir(a, b"b", 0o775, 1000, 1001)).inode
        self.send(SetAttr(b, mode=0o2775))  # a set-group-ID directory
        f = self.send(Mknod(ROOT_INODE, b"c", stat.S_IFREG | 0o644, 1000, 1000)).inode
        g = self.send(Mknod(b, b"d", stat.S_IFREG | 0o4755, 1000, 1000)).inode
        self.send(Symlink(a, b"e", b"../c", 1000, 1000))
        self.send(Link(f, a, b"c"))
        self.send(SetXattr(f, b"user.a", b"1"))
        for ino, index, offset, length in (
            (f, 0, 2, 9),
            (f, 1, 0, 16),
            (f, 0, 6, 10),
            (g, 2, 5, 3),
        ):
            sid = self.new_blob(b"%d" % ino)
            self.send(CommitSlice(ino, index, SliceRef(sid, offset, length, BLOCK, HOME)))

    def new_blob(self, seed: bytes) -> int:
        sid = self.next_slice
        self.next_slice += 1
        self.blobs[sid] = (seed * CHUNK)[: CHUNK - 1] + bytes([sid % 256]) + b"!!"
        return sid

    @rule(data=st.data())
    def mknod(self, data: st.DataObject) -> None:
        kind = data.draw(
            st.sampled_from(
                [stat.S_IFREG] * 4
                + [0, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFDIR, stat.S_IFLNK, 0xF000]
            )
        )
        mode = kind | self.perm(data)
        if data.draw(st.integers(0, 20)) == 0:
            mode = 0x10000
        cmd = Mknod(
            self.pick_dir(data),
            self.pick_name(data),
            mode,
            self.owner(data),
            self.owner(data),
            rdev=data.draw(st.sampled_from([0, 0x0801, -1])),
            exclusive=data.draw(st.booleans()),
        )
        self.send(cmd)

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        self.send(
            Mkdir(
                self.pick_dir(data),
                self.pick_name(data),
                self.perm(data) | data.draw(st.sampled_from([0, stat.S_IFDIR])),
                self.owner(data),
                self.owner(data),
            )
        )

    @rule(data=st.data())
    def symlink(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from([b"a", b"../b/c", b"", b"t\0", b"x" * PATH_MAX]))
        self.send(
            Symlink(self.pick_dir(data), self.pick_name(data), target, self.owner(data), 1000)
        )

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        self.send(Link(self.pick_ino(data), self.pick_dir(data), self.pick_name(data)))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        self.send(Unlink(*self.pick_entry(data)))

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        self.send(Rmdir(*self.pick_entry(data)))

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        parent, name = self.pick_entry(data)
        if data.draw(st.booleans()):
            new_parent, new_name = self.pick_entry(data)
        else:
            new_parent, new_name = self.pick_dir(data), self.pick_name(data)
        flags = data.draw(
            st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_EXCHANGE, 3, 4, -1])
        )
        self.send(Rename(parent, name, new_parent, new_name, flags))

    @rule(data=st.data())
    def setattr(self, data: st.DataObject) -> None:
        maybe = st.none() | st.none()
        cmd = SetAttr(
            self.pick_file(data) if data.draw(st.booleans()) else self.pick_ino(data),
            mode=data.draw(maybe | st.sampled_from([0o600, 0o4755, 0o2775, 0o100644, 0x10000])),
            uid=data.draw(maybe | st.sampled_from([0, 1000, 1001, -5])),
            gid=data.draw(maybe | st.sampled_from([0, 1000, 1002])),
            size=data.draw(maybe | st.sampled_from([0, 1, 5, 15, 16, 17, 33, 50, -1])),
            atime=data.draw(maybe | st.sampled_from([0, -(10**9), T0 - 7])),
            mtime=data.draw(maybe | st.sampled_from([0, T0 + 3])),
            atime_now=data.draw(st.booleans()),
            mtime_now=data.draw(st.booleans()),
        )
        self.send(cmd)

    @rule(data=st.data())
    def setxattr(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(XNAMES * 3 + ODD_XNAMES))
        value = data.draw(st.sampled_from([b"", b"v1", b"v2" * 10, b"x" * (XATTR_SIZE_MAX + 1)]))
        flags = data.draw(st.sampled_from([0, 0, XATTR_CREATE, XATTR_REPLACE, 3, 4]))
        self.send(SetXattr(self.pick_ino(data), name, value, flags))

    @rule(data=st.data())
    def removexattr(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(XNAMES * 3 + ODD_XNAMES))
        self.send(RemoveXattr(self.pick_ino(data), name))

    @rule(data=st.data())
    def commit_slice(self, data: st.DataObject) -> None:
        ino = self.pick_file(data)
        index = data.draw(st.sampled_from([0, 0, 1, 2, 3, -1]))
        offset = data.draw(st.integers(0, CHUNK - 1))
        length = data.draw(st.integers(1, CHUNK - offset))
        if data.draw(st.integers(0, 9)) == 0:
            offset, length = data.draw(st.sampled_from([(0, 0), (CHUNK, 1), (3, CHUNK), (-1, 2)]))
        sid = self.new_blob(data.draw(st.binary(min_size=1, max_size=3)))
        home = data.draw(st.sampled_from([HOME, HOME, HOME, "b", "nowhere"]))
        truncate_to = data.draw(st.none() | st.none() | st.sampled_from([0, 3, 20, -1]))
        s = SliceRef(sid, offset, length, BLOCK, home)
        self.send(CommitSlice(ino, index, s, truncate_to))

    @rule(data=st.data())
    def compactor_reads(self, data: st.DataObject) -> None:
        """A compactor reads a chunk now and commits its compaction later (or never)."""
        ino = self.pick_file(data)
        node = self.model.nodes.get(ino)
        if node is None or not node.chunks:
            return
        index = data.draw(st.sampled_from(sorted(node.chunks)))
        current = node.chunks[index]
        first = min(o for _s, o, _n in current)
        end = max(o + n for _s, o, n in current)
        start = index * CHUNK
        sid = self.next_slice
        self.next_slice += 1
        self.blobs[sid] = bytes(node.data[start + first : start + end]).ljust(CHUNK, b"\0")
        s = SliceRef(sid, first, end - first, BLOCK, HOME)
        read = (ino, index, tuple(sid for sid, _o, _n in current), s)
        if data.draw(st.booleans()):
            self.send(CompactChunk(*read))
        else:
            self.reads.append(read)

    @rule(data=st.data())
    def compactor_commits(self, data: st.DataObject) -> None:
        if not self.reads:
            return
        ino, index, expected, s = self.reads.pop(data.draw(st.integers(0, len(self.reads) - 1)))
        if data.draw(st.integers(0, 5)) == 0:
            expected = (*expected, 999)
        self.send(CompactChunk(ino, index, expected, s))

    @rule(data=st.data())
    def reclaim(self, data: st.DataObject) -> None:
        orphans = sorted(i for i in self.model.nodes if self.model.links(i) == 0)
        pick_orphan: bool = data.draw(st.booleans())
        if orphans and pick_orphan:
            self.send(Reclaim(data.draw(st.sampled_from(orphans))))
        else:
            self.send(Reclaim(self.pick_ino(data)))

    @rule(data=st.data())
    def add_region(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(["b", "c", "d", ""]))
        self.send(AddRegion(Region(name, f"file:///{name}")))

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A writer retries an earlier command under its request id."""
        _off, env, _o = data.draw(st.sampled_from(self.sent))
        self.send(env.command, env.request_id)

    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The log delivers an applied record again: nothing changes."""
        off, env, _outcome = data.draw(st.sampled_from(self.sent))
        before = self.state.digest()
        result = self.state.apply([(off, env)])
        assert result.skipped == 1 and not result.changed_inodes
        assert result.outcomes == [self.state.outcome(env.request_id) or Outcome(0, 0, -1)]
        assert self.state.digest() == before
        assert self.state.applied_offset() == self.offset

    # the comparison

    @invariant()
    def same_tree(self) -> None:
        if not self.model.nodes:
            return
        state, model = self.state, self.model
        assert state.applied_offset() == self.offset
        live = {K.key_inode(k) for k, _v in state.dump() if k[:1] == K.TAG_INODE}
        assert live == set(model.nodes), "inodes differ"
        assert sorted(state.orphans()) == sorted(i for i in model.nodes if model.links(i) == 0)
        for ino, node in model.nodes.items():
            a = state.getattr(ino)
            assert a is not None
            want = (node.mode, node.uid, node.gid, model.links(ino), node.size, node.rdev)
            assert (a.mode, a.uid, a.gid, a.nlink, a.size, a.rdev) == want, f"inode {ino}"
            assert (a.atime_ns, a.mtime_ns, a.ctime_ns) == (node.atime, node.mtime, node.ctime)
            assert state.readlink(ino) == node.target
            assert state.listxattr(ino) == sorted(node.xattrs)
            for name, value in node.xattrs.items():
                assert state.getxattr(ino, name) == value
            if node.entries is not None:
                listed = {name: child for _c, name, child in state.readdir(ino)}
                assert listed == node.entries, f"directory {ino}"
                for name, child in node.entries.items():
                    assert state.lookup(ino, name) == child
                assert state.parent(ino) == node.parent
            if node.kind == stat.S_IFREG:
                slices = {
                    i: [(s.slice_id, s.offset, s.length) for s in state.slices(ino, i)]
                    for i in state.chunks(ino)
                }
                assert slices == node.chunks, f"slices of {ino}"
                assert contents(state, ino, node.size, self.blobs) == bytes(node.data)
        assert state.digest() == state.recompute_digest()


FoldVersusModel.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFoldVersusModel = FoldVersusModel.TestCase


# -- the fold never raises ----------------------------------------------------------------


class DictReader:
    """The state as a plain dict, for folding without RocksDB."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(self, lo: bytes, hi: bytes) -> Any:
        return iter(sorted((k, v) for k, v in self.data.items() if lo <= k < hi))

    def commit(self, writes: dict[bytes, bytes | None]) -> None:
        for k, v in writes.items():
            if v is None:
                self.data.pop(k, None)
            else:
                self.data[k] = v


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_decodable_record_folds_without_raising(data: st.DataObject) -> None:
    """Whatever the codec can carry, the fold answers with an outcome, never an exception."""
    view = DictReader()
    create = CreateVolume("v", (Region("r", "u"),), "r", chunk_size=CHUNK, block_size=BLOCK)
    view.commit(fold_record(view, -1, 0, Envelope(create, "r", T0, bytes(16))).writes)
    view.commit(fold_record(view, 0, 1, Envelope(Mkdir(1, b"d", 0o755, 0, 0), "r", T0)).writes)
    view.commit(fold_record(view, 1, 2, Envelope(Mknod(1, b"f", 0o644, 0, 0), "r", T0)).writes)
    envs = data.draw(st.lists(envelopes(), min_size=1, max_size=8))
    for i, env in enumerate(envs):
        folded = fold_record(view, 2 + i, 3 + i, env)
        assert 0 <= folded.outcome.offset <= 3 + i
        view.commit(folded.writes)


def test_merge_scan_lets_writes_win_and_hide() -> None:
    base = iter([(b"a", b"1"), (b"c", b"3"), (b"e", b"5")])
    overlay: list[tuple[bytes, bytes | None]] = [
        (b"b", b"2"),
        (b"c", None),
        (b"e", b"6"),
        (b"f", b"7"),
    ]
    assert list(merge_scan(base, overlay)) == [
        (b"a", b"1"),
        (b"b", b"2"),
        (b"e", b"6"),
        (b"f", b"7"),
    ]


def test_readdir_resumes_after_a_cookie_while_the_directory_changes(tmp_path: Any) -> None:
    with State.open(tmp_path / "s") as state:
        create = CreateVolume("v", (Region("r", "u"),), "r")
        batch = [(0, Envelope(create, "r", T0))]
        batch += [(i, Envelope(Mknod(1, b"f%d" % i, 0o644, 0, 0), "r", T0)) for i in range(1, 40)]
        state.apply(batch)
        listing = list(state.readdir(ROOT_INODE))
        assert len(listing) == 39
        assert [c for c, _n, _i in listing] == sorted(c for c, _n, _i in listing)
        assert all(c >= K.COOKIE_MIN for c, _n, _i in listing)
        cookie = listing[10][0]
        # Remove an entry before the cookie and add some: the rest is listed exactly once.
        gone = listing[3][1]
        state.apply([(40, Envelope(Unlink(1, gone), "r", T0))])
        state.apply([(41, Envelope(Mknod(1, b"new", 0o644, 0, 0), "r", T0))])
        rest = list(state.readdir(ROOT_INODE, cookie))
        names_after = {n for c, n, _i in listing if c > cookie}
        new_cookie = K.name_cookie(b"new")
        assert {n for _c, n, _i in rest} == names_after | (
            {b"new"} if new_cookie > cookie else set()
        )


# -- single cases, spelled out ------------------------------------------------------------


class Folder:
    """Fold commands one by one into a fresh state; offsets count from 0."""

    def __init__(self, path: Any) -> None:
        self.state = State.open(path)
        self.offset = -1

    def __call__(self, cmd: Any) -> Outcome:
        self.offset += 1
        env = Envelope(cmd, "r", T0 + self.offset)
        [outcome] = self.state.apply([(self.offset, env)]).outcomes
        return outcome

    def volume(self) -> None:
        create = CreateVolume("v", (Region("r", "u"),), "r", chunk_size=CHUNK, block_size=BLOCK)
        assert self(create).inode == ROOT_INODE


def test_compaction_read_before_truncate_and_extend_keeps_the_zeros(tmp_path: Any) -> None:
    """A compactor's slice ids stay equal across a truncate+extend; its stale bytes must not show."""
    fold = Folder(tmp_path / "s")
    fold.volume()
    f = fold(Mknod(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)).inode
    assert fold(CommitSlice(f, 0, SliceRef(11, 0, 12, BLOCK, "r"))).ok
    assert fold(CommitSlice(f, 0, SliceRef(12, 4, 4, BLOCK, "r"))).ok
    # The compactor reads slices [11, 12] covering [0, 12) and writes slice 13 for them.
    assert fold(SetAttr(f, size=5)).ok  # cuts 11 to [0, 5), 12 to [4, 5)
    assert fold(SetAttr(f, size=12)).ok  # [5, 12) must read as zeros
    assert fold(CompactChunk(f, 0, (11, 12), SliceRef(13, 0, 12, BLOCK, "r"))).ok
    assert fold.state.slices(f, 0) == [SliceRef(13, 0, 5, BLOCK, "r")]
    assert fold(CompactChunk(f, 0, (11, 12), SliceRef(14, 0, 12, BLOCK, "r"))).errno == E.ESTALE


def test_exchange_of_a_directory_and_a_file_across_parents_moves_a_link(tmp_path: Any) -> None:
    fold = Folder(tmp_path / "s")
    fold.volume()
    a = fold(Mkdir(ROOT_INODE, b"a", 0o755, 0, 0)).inode
    b = fold(Mkdir(ROOT_INODE, b"b", 0o755, 0, 0)).inode
    d = fold(Mkdir(a, b"d", 0o755, 0, 0)).inode
    f = fold(Mknod(b, b"f", stat.S_IFREG | 0o644, 0, 0)).inode
    assert fold(Rename(a, b"d", b, b"f", RENAME_EXCHANGE)).ok
    st_ = fold.state
    assert (st_.lookup(a, b"d"), st_.lookup(b, b"f")) == (f, d)
    assert (st_.getattr(a).nlink, st_.getattr(b).nlink) == (2, 3)  # type: ignore[union-attr]
    assert st_.parent(d) == b
    # Renaming a directory into its own subtree, or over its ancestor, is refused.
    assert fold(Rename(ROOT_INODE, b"b", d, b"x")).errno == E.EINVAL
    assert fold(Rename(b, b"f", ROOT_INODE, b"b")).errno == E.ENOTEMPTY
    assert fold(Rename(b, b"f", ROOT_INODE, b"b", RENAME_EXCHANGE)).errno == E.EINVAL


def test_set_group_id_directories_pass_on_their_group(tmp_path: Any) -> None:
    fold = Folder(tmp_path / "s")
    fold.volume()
    g = fold(Mkdir(ROOT_INODE, b"g", 0o2775, 0, 50)).inode
    assert fold.state.getattr(g).mode == stat.S_IFDIR | 0o775  # type: ignore[union-attr]
    assert fold(SetAttr(g, mode=0o2775)).ok
    sub = fold(Mkdir(g, b"s", 0o755, 7, 7)).inode
    f = fold(Mknod(g, b"f", stat.S_IFREG | 0o644, 7, 7)).inode
    assert fold.state.getattr(sub).gid == 50  # type: ignore[union-attr]
    assert fold.state.getattr(sub).mode == stat.S_IFDIR | 0o2755  # type: ignore[union-attr]
    assert fold.state.getattr(f).gid == 50  # type: ignore[union-attr]
    assert fold.state.getattr(f).mode == stat.S_IFREG | 0o644  # type: ignore[union-attr]


def test_an_unlinked_file_lives_until_reclaim(tmp_path: Any) -> None:
    fold = Folder(tmp_path / "s")
    fold.volume()
    f = fold(Mknod(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)).inode
    assert fold(SetXattr(f, b"user.k", b"v")).ok
    assert fold(Unlink(ROOT_INODE, b"f")).ok
    assert fold.state.orphans() == [f]
    assert fold(CommitSlice(f, 0, SliceRef(1, 0, 4, BLOCK, "r"))).ok  # still writable while open
    assert fold(Link(f, ROOT_INODE, b"back")).errno == E.ENOENT
    assert fold(Reclaim(f)).ok
    assert fold.state.getattr(f) is None and fold.state.orphans() == []
    assert list(fold.state.iter_live_slices()) == [] and fold.state.listxattr(f) == []
    assert fold(Reclaim(f)).errno == E.ENOENT
    assert fold(Reclaim(ROOT_INODE)).ok  # linked: nothing to do


def test_open_with_o_creat_names_the_existing_file(tmp_path: Any) -> None:
    fold = Folder(tmp_path / "s")
    fold.volume()
    f = fold(Mknod(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)).inode
    before = fold.state.getattr(f)
    assert fold(Mknod(ROOT_INODE, b"f", stat.S_IFREG | 0o600, 0, 0, exclusive=False)).inode == f
    assert fold.state.getattr(f) == before
    assert fold(Mknod(ROOT_INODE, b"f", stat.S_IFREG | 0o600, 0, 0)).errno == E.EEXIST
    fold(Mkdir(ROOT_INODE, b"d", 0o755, 0, 0))
    assert fold(Mknod(ROOT_INODE, b"d", 0o644, 0, 0, exclusive=False)).errno == E.EISDIR


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fold_versus_model_soak() -> None:
    """The state machine above, longer and more often (the slow tier)."""
    run_state_machine_as_test(
        FoldVersusModel,
        settings=settings(
            max_examples=1500,
            stateful_step_count=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
