"""Restore: bring a tree back as it was at a past offset, by appending new commands.

History is never rewritten. The log says what the volume was at every offset,
so the tree as it was at offset N is read from a private state folded to N
(from the newest snapshot at or below N, or from offset 0), and re-created
under a new path of the live volume by ordinary commands: Mkdir, Mknod,
Symlink, Link (hard links within the tree stay hard links), SetXattr and a
final SetAttr per node for mode, owner, size and times. Every region folds
those commands like any others, so the restore reaches all of them.

File contents cost no copy: blocks are immutable (invariant 4), so a restored
file gets `CommitSlice` commands that name the very slices it had at offset N,
oldest first, reproducing the same overlay. That only works while the blocks
exist, which is what the volume's retention period promises: gc keeps every
block that a slice referenced at any offset inside the window (see gc.py),
and a restore refuses a point older than the window, because its blocks may be
gone. Before it commits a file's slices the restore checks that each block is
in some region's store, so a block lost anyway fails the restore with its name
instead of producing a file that reads EIO.

Interrupted at any point, a rerun completes the job. The tree is built under a
hidden name in the destination's parent (`.tidefs-restore-<token>`, the token
derived from the volume, the source path, the offset and the destination), so
a rerun finds it; each node is checked before anything is submitted: a complete
node (type, attributes, xattrs and slices all equal to the past) is kept, a
partial file is unlinked and made again. The last command renames the hidden
directory to its final name, with a request id derived from the token and the
hidden directory's inode: a rerun that finds the destination in place asks the
state for that request's outcome, and reports the restore as done if it
succeeded rather than refusing an existing destination. Any other existing
destination is refused: a restore never merges into, or replaces, a live tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tidefs.journal.commands import (
    RENAME_NOREPLACE,
    ROOT_INODE,
    Command,
    CommitSlice,
    Link,
    Mkdir,
    Mknod,
    Outcome,
    Reclaim,
    RemoveXattr,
    Rename,
    SetAttr,
    SetXattr,
    SliceRef,
    Symlink,
    Unlink,
)
from tidefs.journal.log import Log
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import blocks_needed
from tidefs.replica.keys import Attr
from tidefs.replica.replica import Replica
from tidefs.replica.state import State
from tidefs.replica.store import BlockStore, StoreError

RESTORE_PREFIX = b".tidefs-restore-"
"""Name prefix of the hidden directory a restore builds its tree in, beside the destination."""

CHECK_THREADS = 8
"""Parallel store calls when checking that a file's blocks exist."""

Report = Callable[[str, int, int], None]


class RestoreError(Exception):
    """A restore was refused or could not finish; the message says which and why."""


@dataclass
class RestoreResult:
    """What a restore did."""

    offset: int
    """The past offset whose tree was restored."""
    source: str
    dest: str
    inode: int = 0
    """The restored root's inode in the live volume."""
    entries: int = 0
    """Nodes of the past tree (hard links counted once per name)."""
    commands: int = 0
    """Commands this run appended (0 when a previous run had done everything)."""
    already: bool = False
    """True when a previous run had completed the restore."""
    stats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs restore --json`."""
        return {
            "offset": self.offset,
            "source": self.source,
            "dest": self.dest,
            "inode": self.inode,
            "entries": self.entries,
            "commands": self.commands,
            "already": self.already,
            **self.stats,
        }


# -- paths and the retention window -------------------------------------------


def split_path(path: str | bytes) -> list[bytes]:
    """Return the components of an absolute path inside the volume ('/' is [])."""
    raw = os.fsencode(path)
    if not raw.startswith(b"/"):
        raise RestoreError(f"{os.fsdecode(raw)!r} is not an absolute path inside the volume")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise RestoreError(f"{os.fsdecode(raw)!r} contains '..'")
    return parts


def resolve(state: State, parts: list[bytes]) -> int | None:
    """Return the inode at path `parts` in `state`, None when some component is missing."""
    ino = ROOT_INODE
    for name in parts:
        attr = state.getattr(ino)
        if attr is None or not attr.is_dir:
            return None
        child = state.lookup(ino, name)
        if child is None:
            return None
        ino = child
    return ino if state.getattr(ino) is not None else None


def window_start(log_: Log, retention_s: int, now_ns: int) -> int:
    """Return the first offset appended inside the retention window ending at `now_ns`.

    The state at offset o lasted until record o + 1 was appended, so the states
    still inside the window are those at offsets >= window_start - 1. gc keeps
    their blocks; restore accepts them.
    """
    start_ns = now_ns - retention_s * 1_000_000_000
    return log_.offset_for_time(min(max(start_ns, 0), (1 << 63) - 1))


def check_retention(log_: Log, target: int, retention_s: int, now_ns: int) -> None:
    """Refuse a target whose state left the retention window: its blocks may be collected."""
    first = window_start(log_, retention_s, now_ns)
    if target < first - 1:
        raise RestoreError(
            f"offset {target} is older than the volume's retention of {_duration(retention_s)}: "
            f"gc may have deleted its blocks; the oldest offset that can be restored now is "
            f"{max(first - 1, 0)}"
        )


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def restore_token(volume: str, source: str, offset: int, dest: str) -> str:
    """Return the token that names one restore's hidden directory (16 hex digits)."""
    text = "\0".join((volume, source, str(offset), dest)).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def final_request_id(token: str, inode: int) -> bytes:
    """Return the request id of the rename that completes a restore into inode `inode`."""
    return hashlib.blake2b(f"restore-rename\0{token}\0{inode}".encode(), digest_size=16).digest()


# -- the tree copy ---------------------------------------------------------------


class TreeRestorer:
    """Re-create a subtree of a past state in the live volume through a Replica; see the module doc."""

    def __init__(
        self,
        past: State,
        replica: Replica,
        *,
        stores: Mapping[str, BlockStore] | None = None,
        progress: Report | None = None,
    ) -> None:
        self.past = past
        self.replica = replica
        self.live = replica.state
        self.stores = dict(stores or {})
        self.progress = progress
        self.links: dict[int, int] = {}
        self.commands = 0
        self.done = 0
        self.total = 0
        self.stats: dict[str, int] = {
            "dirs": 0,
            "files": 0,
            "symlinks": 0,
            "special": 0,
            "hardlinks": 0,
            "slices": 0,
            "kept": 0,
        }

    # -- driving -----------------------------------------------------------------

    def run(self, src: int, dest_parts: list[bytes], token: str) -> RestoreResult:
        """Restore past inode `src` to the live path `dest_parts`; return what happened."""
        if not dest_parts:
            raise RestoreError("the destination cannot be the volume's root")
        parent = resolve(self.live, dest_parts[:-1])
        parent_attr = None if parent is None else self.live.getattr(parent)
        dest = "/" + os.fsdecode(b"/".join(dest_parts))
        if parent is None or parent_attr is None or not parent_attr.is_dir:
            raise RestoreError(f"the parent directory of {dest} does not exist in the live volume")
        name = dest_parts[-1]
        hidden = RESTORE_PREFIX + token.encode()
        result = RestoreResult(offset=self.past.applied_offset(), source="", dest=dest)
        existing = self.live.lookup(parent, name)
        if existing is not None:
            done = self.live.outcome(final_request_id(token, existing))
            if done is not None and done.ok and self.live.lookup(parent, hidden) is None:
                result.inode, result.already = existing, True
                return result
            raise RestoreError(f"{dest} exists in the live volume: restore into a new path")
        self.total = sum(1 for _ in self._walk(src))
        root = self._restore(src, parent, hidden)
        out = self._submit(
            Rename(parent, hidden, parent, name, RENAME_NOREPLACE),
            request_id=final_request_id(token, root),
        )
        if out.errno == errno.EEXIST:
            raise RestoreError(
                f"{dest} appeared in the live volume while restoring; the tree is in "
                f"{os.fsdecode(hidden)} beside it"
            )
        self._check(out, f"rename into {dest}")
        result.inode, result.entries, result.commands = root, self.total, self.commands
        result.stats = dict(self.stats)
        return result

    def _walk(self, src: int) -> Iterator[int]:
        """Yield every inode of the past subtree at `src`, once per name."""
        stack = [src]
        while stack:
            ino = stack.pop()
            yield ino
            attr = self.past.getattr(ino)
            if attr is not None and attr.is_dir:
                stack.extend(child for _c, _n, child in self.past.readdir(ino))

    def _restore(self, src: int, parent: int, name: bytes) -> int:
        """Restore the subtree at `src` as `parent/name`; directories are finished after their children."""
        root = self._node(src, parent, name)
        src_attr = self.past.getattr(src)
        assert src_attr is not None
        if not src_attr.is_dir:
            return root
        stack: list[tuple[int, int, Attr, Iterator[tuple[int, bytes, int]]]] = [
            (src, root, src_attr, self.past.readdir(src))
        ]
        while stack:
            s, live, attr, children = stack[-1]
            entry = next(children, None)
            if entry is None:
                stack.pop()
                self._finish(live, attr, s)
                continue
            _cookie, child_name, child = entry
            child_live = self._node(child, live, child_name)
            child_attr = self.past.getattr(child)
            assert child_attr is not None
            if child_attr.is_dir:
                stack.append((child, child_live, child_attr, self.past.readdir(child)))
        return root

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress("entries restored", self.done, self.total)

    # -- one node ------------------------------------------------------------------

    def _node(self, src: int, parent: int, name: bytes) -> int:
        """Make `parent/name` a copy of past inode `src` (a directory's children come later)."""
        a = self.past.getattr(src)
        if a is None:  # pragma: no cover - the past state is not changing
            raise RestoreError(f"inode {src} vanished from the past state")
        self._tick()
        cur = self.live.lookup(parent, name)
        cur_attr = None if cur is None else self.live.getattr(cur)
        if a.is_dir:
            self.stats["dirs"] += 1
            if cur is not None and cur_attr is not None and cur_attr.is_dir:
                return cur
            if cur is not None:
                self._remove(parent, name, cur_attr)
            return self._check(
                self._submit(Mkdir(parent, name, a.mode & 0o7777, a.uid, a.gid)), "mkdir"
            ).inode
        if a.is_reg and src in self.links:
            want = self.links[src]
            self.stats["hardlinks"] += 1
            if cur == want:
                return want
            if cur is not None:
                self._remove(parent, name, cur_attr)
            self._check(self._submit(Link(want, parent, name)), "link")
            return want
        if cur is not None and cur_attr is not None and self._same(src, a, cur_attr):
            self.stats["kept"] += 1
            self._count(a)
            if a.is_reg:
                self.links[src] = cur
            return cur
        if cur is not None:
            self._remove(parent, name, cur_attr)
        self._count(a)
        if a.is_symlink:
            target = self.past.readlink(src) or b""
            ino = self._check(
                self._submit(Symlink(parent, name, target, a.uid, a.gid)), "symlink"
            ).inode
        else:
            ino = self._check(
                self._submit(Mknod(parent, name, a.mode, a.uid, a.gid, rdev=a.rdev)), "mknod"
            ).inode
        if a.is_reg:
            self._commit_slices(src, ino)
            self.links[src] = ino
        self._finish(ino, a, src)
        return ino

    def _count(self, a: Attr) -> None:
        if a.is_reg:
            self.stats["files"] += 1
        elif a.is_symlink:
            self.stats["symlinks"] += 1
        else:
            self.stats["special"] += 1

    def _past_slices(self, src: int) -> list[tuple[int, list[SliceRef]]]:
        return [(chunk, self.past.slices(src, chunk)) for chunk in self.past.chunks(src)]

    def _commit_slices(self, src: int, ino: int) -> None:
        chunks = self._past_slices(src)
        refs = [s for _chunk, slices in chunks for s in slices]
        if self.stores:
            self._check_blocks(refs)
        for chunk, slices in chunks:
            for s in slices:
                self._check(self._submit(CommitSlice(ino, chunk, s)), "commit a slice")
                self.stats["slices"] += 1

    def _check_blocks(self, refs: list[SliceRef]) -> None:
        """Raise RestoreError unless every block the slices show is in some region's store."""
        wanted = sorted({(s.slice_id, i, s.home) for s in refs for i in range(blocks_needed(s))})
        if not wanted:
            return

        def present(item: tuple[int, int, str]) -> tuple[str, bool]:
            slice_id, index, home = item
            key = block_key(slice_id, index)
            order = [home, *sorted(r for r in self.stores if r != home)]
            for region in order:
                store = self.stores.get(region)
                if store is None:
                    continue
                try:
                    if store.exists(key):
                        return key, True
                except StoreError:
                    continue
            return key, False

        with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="tidefs-restore") as pool:
            for key, ok in pool.map(present, wanted):
                if not ok:
                    raise RestoreError(
                        f"block {key} is in no region's store (collected by gc, or lost): "
                        "the file cannot be restored"
                    )

    def _same(self, src: int, a: Attr, b: Attr) -> bool:
        """Whether live inode `b` is already a complete copy of past inode `src`."""
        if a.kind != b.kind or (a.uid, a.gid, a.atime_ns, a.mtime_ns) != (
            b.uid,
            b.gid,
            b.atime_ns,
            b.mtime_ns,
        ):
            return False
        if not a.is_symlink and a.mode != b.mode:
            return False
        if a.is_reg and a.size != b.size:
            return False
        if a.kind in (stat.S_IFCHR, stat.S_IFBLK) and a.rdev != b.rdev:
            return False
        if a.is_symlink and self.past.readlink(src) != self.live.readlink(b.ino):
            return False
        if self._xattrs(self.past, src) != self._xattrs(self.live, b.ino):
            return False
        if a.is_reg:
            mine = [(c, self.live.slices(b.ino, c)) for c in self.live.chunks(b.ino)]
            if mine != self._past_slices(src):
                return False
        return True

    @staticmethod
    def _xattrs(state: State, ino: int) -> dict[bytes, bytes | None]:
        return {n: state.getxattr(ino, n) for n in state.listxattr(ino)}

    def _finish(self, ino: int, a: Attr, src: int) -> None:
        """Set xattrs, then mode, owner, size and times: last, since the steps before touch times."""
        want = self._xattrs(self.past, src)
        have = self._xattrs(self.live, ino)
        for xname, value in want.items():
            if value is not None and have.get(xname) != value:
                self._check(self._submit(SetXattr(ino, xname, value)), "setxattr")
        for xname in have:
            if xname not in want:
                self._check(self._submit(RemoveXattr(ino, xname)), "removexattr")
        b = self.live.getattr(ino)
        assert b is not None
        mode = None if a.is_symlink or a.mode == b.mode else a.mode & 0o7777
        size = a.size if a.is_reg and a.size != b.size else None
        if (
            mode is not None
            or size is not None
            or (a.uid, a.gid, a.atime_ns, a.mtime_ns) != (b.uid, b.gid, b.atime_ns, b.mtime_ns)
        ):
            # uid and gid go with an explicit mode, so that a chown never clears set-id bits.
            if mode is None and not a.is_symlink:
                mode = a.mode & 0o7777
            command = SetAttr(
                ino, mode=mode, uid=a.uid, gid=a.gid, size=size, atime=a.atime_ns, mtime=a.mtime_ns
            )
            self._check(self._submit(command), "setattr")

    def _remove(self, parent: int, name: bytes, attr: Attr | None) -> None:
        """Remove a partial node left by an interrupted run (never a directory)."""
        if attr is not None and attr.is_dir:
            raise RestoreError(
                f"the partial restore holds an unexpected directory {os.fsdecode(name)!r}: "
                "remove the hidden .tidefs-restore-* directory and run the restore again"
            )
        self._check(self._submit(Unlink(parent, name)), "unlink a partial file")
        if attr is not None:
            after = self.live.getattr(attr.ino)
            if after is not None and after.nlink == 0:
                # Nobody opens a half-restored file in a hidden directory: drop it now
                # rather than leave an orphan whose slices gc must keep.
                self._submit(Reclaim(attr.ino))

    # -- submitting ----------------------------------------------------------------

    def _submit(self, command: Command, *, request_id: bytes | None = None) -> Outcome:
        self.commands += 1
        return self.replica.submit(command, request_id=request_id)

    @staticmethod
    def _check(out: Outcome, what: str) -> Outcome:
        if not out.ok:
            raise RestoreError(f"{what} was rejected: {errno.errorcode.get(out.errno, out.errno)}")
        return out


# -- the whole operation -----------------------------------------------------------


def restore(
    log_: Log,
    stores: Mapping[str, BlockStore],
    *,
    volume: str,
    source: str,
    dest: str,
    target: int,
    work_dir: str | os.PathLike[str],
    region: str | None = None,
    now_ns: int | None = None,
    check_blocks: bool = True,
    progress: Report | None = None,
) -> RestoreResult:
    """Restore `source` as it was at offset `target` to the new path `dest` of the live volume.

    `stores` are the regions' block stores (for snapshots and the block
    check); `work_dir` is an empty directory for the two private states (the
    past one, and a live one folded to the head that the commands go
    through). `region` is the region the commands are sent from (default: the
    primary). Raises RestoreError when refused; see the module doc.
    """
    from pathlib import Path

    from tidefs.replica.fetch import open_region_stores
    from tidefs.replica.replica import fold_range
    from tidefs.replica.snapshot import rebuild_state, volume_from_log

    now = time.time_ns() if now_ns is None else now_ns
    head = log_.head()
    if not 0 <= target < head:
        raise RestoreError(f"offset {target} is not in the log of {volume} (head {head})")
    src_parts, dest_parts = split_path(source), split_path(dest)
    info = volume_from_log(log_, stores.values())
    check_retention(log_, target, info.retention_s, now)
    work = Path(work_dir)
    past = rebuild_state(
        log_,
        work / "past",
        stores=stores,
        volume=volume,
        to_offset=target,
        prefer=region,
        progress=progress,
    )
    extra: dict[str, BlockStore] = {}
    try:
        vol = past.volume()
        assert vol is not None  # rebuild_state checked it
        src = resolve(past, src_parts)
        if src is None:
            raise RestoreError(f"{source} did not exist at offset {target}")
        past.checkpoint(work / "live")
        live = State.open(work / "live")
        try:
            start = live.applied_offset()

            def folded(now_at: int, goal: int) -> None:
                if progress is not None:
                    progress("records folded to the head", now_at - start, goal - start)

            fold_range(log_, live, progress=folded)
            live_vol = live.volume()
            assert live_vol is not None
            sender = region or live_vol.primary
            if live_vol.region(sender) is None:
                raise RestoreError(f"volume {volume} has no region {sender!r}")
            missing = [r for r in live_vol.regions if r.name not in stores]
            extra = open_region_stores(missing) if check_blocks and missing else {}
            token = restore_token(
                volume,
                "/" + os.fsdecode(b"/".join(src_parts)),
                target,
                "/" + os.fsdecode(b"/".join(dest_parts)),
            )
            restorer = TreeRestorer(
                past,
                Replica(log_, live, sender),
                stores={**stores, **extra} if check_blocks else None,
                progress=progress,
            )
            result = restorer.run(src, dest_parts, token)
            result.source = "/" + os.fsdecode(b"/".join(src_parts))
            result.offset = target
            return result
        finally:
            live.close()
    finally:
        past.close()
        for store in extra.values():
            store.close()
