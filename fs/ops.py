"""The FUSE edge: pyfuse3 request handlers that turn syscalls into commands and reads.

Each handler is short. Metadata reads come from the region's state; each
mutation is one command through the mount's committer (`OwnRequests`), whose
outcome (decided by the fold, identical in every region) becomes the
syscall's result; file data goes through `DataPath`. Everything that blocks
— the stores, data commits — runs in a worker thread, so that one slow call
never stalls the mount. A metadata mutation needs no worker thread: the
handler queues its command and awaits the outcome, and the committer appends
and folds whatever is queued as one batch, then wakes all its handlers with
one call into trio. Creating, stating and removing a file with eight
threads cost 3.2 ms of CPU with a worker thread per command, 2.3 with it.

Lookups and attributes are answered on the trio thread itself: they are a
RocksDB get or two (memtable, block cache or page cache, microseconds),
while a trip to a worker thread and back costs far more CPU than that —
creating, stating and removing a file made seven such trips, four of them
for reads. So do `flush` and `release` of a file with no buffered writes
(nothing to commit, nothing to wait for). Whatever writes, uploads or waits
still goes to a worker. `FUSEError(errno)` is the only exception that
leaves a handler: errors of the layers below are mapped to an errno here, once.

After a mutation the handler reads the attributes back from the state: the
submit returned only once this region had folded the command, so that is
read-your-writes, and the kernel caches exactly what the log says.

The kernel checks permissions itself (`default_permissions`), including the
sticky bit; the handlers set what only the file system can: owner and group
of new nodes (the caller's, or the directory's group under a setgid
directory), and the setgid bit that new subdirectories inherit.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from tidefs import telemetry
from tidefs.fs.coherence import OwnRequests
from tidefs.fs.data import DataError, DataPath
from tidefs.fs.mount import CACHE_TIMEOUT_S
from tidefs.journal.commands import (
    NAME_MAX,
    Command,
    Link,
    Mkdir,
    Mknod,
    Noop,
    Outcome,
    Reclaim,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Unlink,
)
from tidefs.journal.commands import (
    RENAME_EXCHANGE as CMD_RENAME_EXCHANGE,
)
from tidefs.journal.commands import (
    RENAME_NOREPLACE as CMD_RENAME_NOREPLACE,
)
from tidefs.replica.replica import RegionRemoved

if TYPE_CHECKING:
    from tidefs.replica.keys import Attr
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import State

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

READDIR_BATCH = 256
"""Directory entries read from the state per worker-thread trip."""

TIME_MIN_NS, TIME_MAX_NS = -(1 << 63), (1 << 63) - 1
"""The times a file can have: the log stores nanoseconds since the epoch as a signed 64-bit long."""

STAT_BLKSIZE = 1 << 20
"""st_blksize: stdio and most tools size their buffers from it; large writes are cheap here."""


def handler(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map every failure of a handler to FUSEError and record its latency.

    A bug must not take the mount down or leak a Python exception to pyfuse3
    (which would log and return EIO anyway): it is logged with its traceback
    and the syscall fails with EIO.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            _count_error(name, exc.errno)
            raise
        except DataError as exc:
            if exc.errno == errno.EIO:
                log.error("%s: %s", name, exc)
            _count_error(name, exc.errno)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed", name)
            _count_error(name, errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            telemetry.fuse_duration.record(time.perf_counter() - started, telemetry.attrs(op=name))

    return wrapper


def _count_error(op: str, code: int) -> None:
    telemetry.fuse_errors.add(1, telemetry.attrs(op=op, errno=errno.errorcode.get(code, str(code))))


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)


class TideOps(pyfuse3.Operations):
    """The request handlers of one mount of one volume in one region."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # close-to-open needs every write to reach us
    enable_acl = False

    def __init__(
        self,
        *,
        state: State,
        replica: Replica,
        own: OwnRequests,
        data: DataPath,
        attr_timeout: float = CACHE_TIMEOUT_S,
        entry_timeout: float = CACHE_TIMEOUT_S,
        max_staleness: float | None = None,
        threads: int = 64,
    ) -> None:
        super().__init__()
        self.state = state
        self.replica = replica
        self.own = own
        self.data = data
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.max_staleness = max_staleness
        self.lag_s = 0.0
        self._limiter = trio.CapacityLimiter(threads)
        self._dirs: dict[int, int] = {}
        self._dir_open: dict[int, int] = {}
        self._next_dir_fh = 1
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking `fn(*args)` on a worker thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _submit(self, command: Command) -> Outcome:
        """Submit a command (worker thread); raise FUSEError with the fold's errno."""
        try:
            outcome = self.own.submit(command)
        except Exception as exc:
            raise _unsubmitted(command, exc) from None
        return _accepted(outcome)

    async def _submit_async(self, command: Command) -> Outcome:
        """Submit a command from the trio thread through the committer; FUSEError on rejection."""
        try:
            outcome = await self.own.submit_async(command)
        except Exception as exc:
            raise _unsubmitted(command, exc) from None
        return _accepted(outcome)

    def _attr(self, ino: int) -> Attr:
        # Removed in another region while open here: its handles still stat it.
        attr = self.data.attr(ino)
        if attr is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """Build the kernel's view of an inode: the state's, plus writes still buffered here."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = attr.generation
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        size, mtime, ctime = attr.size, attr.mtime_ns, attr.ctime_ns
        regular = stat.S_ISREG(attr.mode)
        pending = self.data.pending(attr.ino) if regular else None
        if pending is not None:
            size = max(size, pending[0])
            mtime = max(mtime, pending[1])
            ctime = max(ctime, pending[1])
        e.st_size = size
        e.st_blksize = STAT_BLKSIZE
        # A regular file counts what its slices hold, holes excluded, as du expects.
        used = min(self.data.allocated(attr), size) if regular else size
        e.st_blocks = (used + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = mtime
        e.st_ctime_ns = ctime
        return e

    def _entry_of(self, ino: int) -> pyfuse3.EntryAttributes:
        return self._entry(self._attr(ino))

    async def _fresh(self) -> None:
        """With a staleness bound, wait while this region lags the log by more than it."""
        if self.max_staleness is not None and self.lag_s > self.max_staleness:
            await self._run(self.replica.barrier, 60.0)

    def _is_open(self, ino: int) -> bool:
        with self._lock:
            if self._dir_open.get(ino, 0) > 0:
                return True
        return self.data.is_open(ino)

    def _maybe_reclaim(self, ino: int | None) -> None:
        """Drop an inode with no name left that this mount does not hold open.

        The Reclaim goes out behind the call that made the orphan (unlink,
        rename over it, last close), in the committer's next batch: nothing
        can link an orphan back, so nothing waits for its removal. It is
        dropped if this mount opened the inode again meanwhile (through a
        handle the kernel still had); the last release queues it anew.
        """
        if ino is None or self._is_open(ino):
            return
        attr = self.state.getattr(ino)
        if attr is None or attr.nlink > 0:
            return

        def done(outcome: Outcome | None, error: BaseException | None) -> None:
            if error is not None:  # the orphan stays, with its blocks, until reclaimed
                log.warning("cannot reclaim inode %d: %s", ino, error)
            elif outcome is not None and not outcome.ok and outcome.errno != errno.ENOENT:
                log.warning("reclaim of inode %d rejected: errno %d", ino, outcome.errno)

        self.own.submit_later(Reclaim(inode=ino), done, ready=lambda: not self._is_open(ino))

    def close(self) -> None:
        """At shutdown, after the committer closed: drop the orphans still held open here."""
        for ino in self.data.open_inodes():
            attr = self.state.getattr(ino)
            if attr is not None and attr.nlink == 0:
                self._reclaim_now(ino)

    def _reclaim_now(self, ino: int) -> None:
        try:
            self.own.submit(Reclaim(inode=ino))
        except Exception as exc:
            log.warning("cannot reclaim inode %d: %s", ino, exc)

    async def _new_node(
        self, parent: int, uid: int, gid: int, make: Callable[[int, int, int], Command]
    ) -> pyfuse3.EntryAttributes:
        """Create a node with `make(uid, gid, parent_mode)`; return its entry (trio thread)."""
        p = self._attr(parent)
        if not p.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if p.mode & stat.S_ISGID:
            gid = p.gid  # BSD group semantics under a setgid directory
        outcome = await self._submit_async(make(uid, gid, p.mode))
        return self._entry_of(outcome.inode)

    # -- lookups and attributes ------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(name)
        await self._fresh()
        return self._lookup(parent_inode, name)  # a state read: on the loop (module doc)

    def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._entry_of(parent)
        if name == b"..":
            up = self.state.parent(parent)
            return self._entry_of(up if up is not None else parent)
        child = self.state.lookup(parent, name)
        if child is None:
            if self.state.getattr(parent) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            # A negative entry the kernel may cache: searches along a path
            # (imports, PATH lookups) then cost one round trip, not one per
            # try. A create elsewhere invalidates it (see coherence.py).
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = self.entry_timeout
            return miss
        return self._entry_of(child)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._fresh()
        return self._entry_of(inode)  # a state read: on the loop (module doc)

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if self.data.kept(inode) is not None:
            raise pyfuse3.FUSEError(errno.ESTALE)  # removed in another region: read-only here
        if fields.update_size:
            # Buffered writes precede the truncate: committing them first blocks.
            return await self._run(self._truncate, inode, attr, fields)
        command = self._setattr_command(self._attr(inode), inode, attr, fields, None)
        if command != SetAttr(inode=inode):
            if self.data.pending(inode) is not None:
                # Writes made before this call must precede it in the log too: their
                # commit stamps mtime, and a time set after a write (cp -p, tar, rsync
                # -t, touch) must win over it, as on Linux.
                await self._run(self.data.flush, inode)
            await self._submit_async(command)
        # else only ctime was asked for (the kernel's "touch ctime"): nothing to record.
        return self._entry_of(inode)

    def _truncate(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> pyfuse3.EntryAttributes:
        """Setattr with a new size (worker thread): commit buffered writes, then the truncate."""
        current = self._attr(inode)
        if current.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not current.is_reg:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self.data.flush(inode)
        self._submit(self._setattr_command(current, inode, attr, fields, attr.st_size))
        return self._entry_of(inode)

    @staticmethod
    def _setattr_command(
        current: Attr,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        size: int | None,
    ) -> SetAttr:
        for asked, ns in (
            (fields.update_atime, attr.st_atime_ns),
            (fields.update_mtime, attr.st_mtime_ns),
        ):
            if asked and not TIME_MIN_NS <= ns <= TIME_MAX_NS:
                # The log stores times as signed 64-bit nanoseconds (years 1677-2262):
                # like Linux for a time a file system cannot store, refuse it.
                raise pyfuse3.FUSEError(errno.EOVERFLOW)
        return SetAttr(
            inode=inode,
            mode=(stat.S_IFMT(current.mode) | (attr.st_mode & 0o7777))
            if fields.update_mode
            else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime=attr.st_atime_ns if fields.update_atime else None,
            mtime=attr.st_mtime_ns if fields.update_mtime else None,
        )

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = await self._run(self.state.readlink, inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return bytes(target)

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        attr = await self._run(self._attr, inode)
        return _may_access(attr, mode, ctx)

    # -- creating and removing names -------------------------------------------

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(name)
        return await self._new_node(
            parent_inode,
            ctx.uid,
            ctx.gid,
            lambda uid, gid, _pm: Mknod(parent_inode, name, mode, uid, gid, rdev, exclusive=True),
        )

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(name)

        def make(uid: int, gid: int, parent_mode: int) -> Command:
            m = stat.S_IFDIR | (mode & 0o7777)
            if parent_mode & stat.S_ISGID:
                m |= stat.S_ISGID  # subdirectories of a setgid directory stay setgid
            return Mkdir(parent_inode, name, m, uid, gid)

        return await self._new_node(parent_inode, ctx.uid, ctx.gid, make)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(name)
        return await self._new_node(
            parent_inode,
            ctx.uid,
            ctx.gid,
            lambda uid, gid, _pm: Symlink(parent_inode, name, target, uid, gid),
        )

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(new_name)
        await self._submit_async(Link(inode, new_parent_inode, new_name))
        return self._entry_of(inode)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        await self._remove(Unlink(parent_inode, name), parent_inode, name)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        await self._remove(Rmdir(parent_inode, name), parent_inode, name)

    async def _remove(self, command: Command, parent: int, name: bytes) -> None:
        victim = self.state.lookup(parent, name)
        await self._submit_async(command)
        self._maybe_reclaim(victim)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        _check_name(name_old)
        _check_name(name_new)
        cmd_flags = 0
        if flags & pyfuse3.RENAME_NOREPLACE:
            cmd_flags |= CMD_RENAME_NOREPLACE
        if flags & pyfuse3.RENAME_EXCHANGE:
            cmd_flags |= CMD_RENAME_EXCHANGE
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        command = Rename(parent_inode_old, name_old, parent_inode_new, name_new, cmd_flags)
        victim = None
        if not cmd_flags & CMD_RENAME_EXCHANGE:
            victim = self.state.lookup(parent_inode_new, name_new)
        await self._submit_async(command)
        if victim is not None and victim != self.state.lookup(parent_inode_new, name_new):
            self._maybe_reclaim(victim)

    # -- files -------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self._fresh()
        if flags & os.O_TRUNC:
            # libfuse asks for atomic O_TRUNC: the kernel sends no setattr, the
            # truncate is ours to do, with mtime/ctime set as open(2) does.
            await self._run(self._truncate_on_open, inode)
        fh = self.data.open(inode, flags)
        # Page cache survives reopen: remote changes invalidate it (see Invalidator).
        return self._file_info(fh, flags)

    def _file_info(self, fh: int, flags: int) -> pyfuse3.FileInfo:
        """The reply to an open: keep the page cache; an appending handle writes around it.

        The kernel would copy an O_APPEND write into its cache at the size it
        knows, but the fold may put the bytes further on (behind another
        region's appends): with direct I/O on that handle, cached pages only
        ever hold what this mount answered to reads.
        """
        appends = bool(flags & os.O_APPEND) and self.data.log_appends
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=appends)

    def _truncate_on_open(self, inode: int) -> None:
        if not self._attr(inode).is_reg:
            return
        self.data.flush(inode)
        self._submit(SetAttr(inode=inode, size=0, mtime_now=True))

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        _check_name(name)
        exclusive = bool(flags & os.O_EXCL)
        entry = await self._new_node(
            parent_inode,
            ctx.uid,
            ctx.gid,
            lambda uid, gid, _pm: Mknod(
                parent_inode, name, stat.S_IFREG | (mode & 0o7777), uid, gid, 0, exclusive
            ),
        )
        if flags & os.O_TRUNC and entry.st_size > 0:
            # Another region created the name first (O_CREAT without O_EXCL
            # then opens that file): O_TRUNC still applies to it.
            await self._run(self._truncate_on_open, entry.st_ino)
            entry = await self._run(self._entry_of, entry.st_ino)
        fh = self.data.open(entry.st_ino, flags)
        return self._file_info(fh, flags), entry

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self._fresh()
        # A block in memory is served here, on the loop; anything that may wait
        # for a store goes to a worker (a blocked store call must not hang the mount).
        data: bytes | bytearray | memoryview | None = self.data.read_cached(fh, off, size)
        if data is None:
            data = await self._run(self.data.read, fh, off, size)
        # pyfuse3 replies from any contiguous buffer; a view of a cached block saves a copy.
        return cast(bytes, data)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._run(self.data.write, fh, off, buf)

    @handler
    async def flush(self, fh: int) -> None:
        ino = self.data.inode_of(fh)
        if self.data.pending(ino) is None:
            return  # nothing buffered: flush would return at once (module doc)
        await self._run(self.data.flush, ino)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._run(self.data.flush, self.data.inode_of(fh))

    @handler
    async def release(self, fh: int) -> None:
        def run() -> None:
            ino, last = self.data.release(fh)
            if last:
                self._maybe_reclaim(ino)

        if self.data.pending(self.data.inode_of(fh)) is None:
            run()  # nothing to commit: bookkeeping and a state read (module doc)
        else:
            await self._run(run)

    # -- directories ---------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._fresh()
        with self._lock:
            fh = self._next_dir_fh
            self._next_dir_fh += 1
            self._dirs[fh] = inode
            self._dir_open[inode] = self._dir_open.get(inode, 0) + 1
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = self._dirs.get(fh)
        if ino is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        cookie = start_id
        while True:
            batch = await self._run(self._readdir_batch, ino, cookie)
            for next_cookie, name, entry in batch:
                if not pyfuse3.readdir_reply(token, name, entry, next_cookie):
                    return
                cookie = next_cookie
            if len(batch) < READDIR_BATCH:
                return

    def _readdir_batch(
        self, ino: int, after: int
    ) -> list[tuple[int, bytes, pyfuse3.EntryAttributes]]:
        out: list[tuple[int, bytes, pyfuse3.EntryAttributes]] = []
        if after < 1:
            out.append((1, b".", self._entry_of(ino)))
        if after < 2:
            up = self.state.parent(ino)
            out.append((2, b"..", self._entry_of(up if up is not None else ino)))
        for cookie, name, child in self.state.readdir(ino, max(after, 0)):
            attr = self.state.getattr(child)
            if attr is not None:  # removed under our feet: skip, never fail the listing
                out.append((cookie, name, self._entry(attr)))
            if len(out) >= READDIR_BATCH:
                break
        return out

    @handler
    async def releasedir(self, fh: int) -> None:
        with self._lock:
            ino = self._dirs.pop(fh, None)
            if ino is None:
                return
            left = self._dir_open.get(ino, 1) - 1
            if left > 0:
                self._dir_open[ino] = left
            else:
                self._dir_open.pop(ino, None)
        if left <= 0:
            self._maybe_reclaim(ino)  # a state read and a queued command

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Every metadata change was durable in the log before its call returned.
        return None

    # -- extended attributes ---------------------------------------------------------

    @handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._submit_async(SetXattr(inode, name, value, 0))

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(b"security."):
            # The kernel asks for security.capability before every write. An
            # absent key is answered from RocksDB's in-memory bloom filter, so
            # this lookup does not block, and skipping the worker-thread trip
            # takes a round trip off every write.
            value = self.state.getxattr(inode, name)
        else:
            value = await self._run(self.state.getxattr, inode, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return bytes(value)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [bytes(n) for n in await self._run(self.state.listxattr, inode)]

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._submit_async(RemoveXattr(inode, name))

    # -- the file system -------------------------------------------------------------

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # Capacity is the object store's, which is unbounded: report a large,
        # constant size so that tools which check free space proceed.
        s = pyfuse3.StatvfsData()
        s.f_bsize = STAT_BLKSIZE
        s.f_frsize = 4096
        s.f_blocks = 1 << 40  # 4 PiB in 4 KiB fragments
        s.f_bfree = s.f_blocks
        s.f_bavail = s.f_blocks
        s.f_files = 1 << 40
        s.f_ffree = s.f_files
        s.f_favail = s.f_files
        s.f_namemax = NAME_MAX
        return s

    def barrier(self) -> None:
        """Wait until this region has applied everything appended so far (worker thread)."""
        self.own.submit(Noop("barrier"))


def _may_access(attr: Attr, mode: int, ctx: pyfuse3.RequestContext) -> bool:
    """Decide access(2) as the kernel would under default_permissions."""
    if mode == os.F_OK:
        return True
    if ctx.uid == 0:
        # root may read and write anything, and execute what anyone may execute
        return not (mode & os.X_OK) or attr.is_dir or bool(attr.mode & 0o111)
    if ctx.uid == attr.uid:
        bits = (attr.mode >> 6) & 7
    elif ctx.gid == attr.gid or attr.gid in _groups(ctx.pid):
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    return (mode & bits) == mode


def _groups(pid: int) -> set[int]:
    try:
        return pyfuse3.get_sup_groups(pid)
    except Exception:  # the process may be gone already
        return set()


def _accepted(outcome: Outcome) -> Outcome:
    """`outcome` if the fold accepted the command, else FUSEError with its errno."""
    if not outcome.ok:
        raise pyfuse3.FUSEError(outcome.errno)
    return outcome


def _unsubmitted(command: Command, exc: Exception) -> pyfuse3.FUSEError:
    """The error of a command that never got an outcome: logged, and EIO to the caller."""
    if isinstance(exc, RegionRemoved):
        return pyfuse3.FUSEError(errno.EROFS)  # the mount said so once, when it happened
    log.error("cannot submit %s: %s", type(command).__name__, exc)
    return pyfuse3.FUSEError(errno.EIO)
