"""Mount lifecycle: open, catch up, mount, serve, flush, unmount.

A mount serves nothing before its region has folded the log up to the head
it saw at start, so the first `ls` already shows what every region agreed on.
Everything that can be wrong with the configuration — the journal, the state
directory (one mount per state directory: RocksDB's lock), the volume, the
region, the stores, the mount point, /dev/fuse — is checked before the kernel
mount, and reported as one line; nothing is left half-mounted.

Without `foreground` the process forks first, before anything is opened (no
threads, locks or connections cross a fork), and the parent waits on a pipe
until the child reports "ready" — the kernel mount exists and the loop is
about to serve — or an error line, and exits 0 or 1 accordingly. So a script
that runs `tidefs mount` can use the mount point on the next line. The child
execs a fresh `python -m tidefs.fs.mount` that reads its configuration from
an inherited memory file: its command line, which `ps` shows to every user
for as long as the mount lives, carries the journal URL with its secrets
redacted; the secrets reach it through that file and the environment.

A mount that fails leaves nothing behind that it made: the state and cache
directories it created (with their parents) are removed again, and it never
creates a journal (`create=false`: a volume must be formatted first).

Shutdown (SIGINT, SIGTERM, `umount`, or `fusermount3 -u`) flushes every write
buffer to the store and the log before the kernel mount goes away, which is
what makes `umount` a durability point like close.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from tidefs import private, telemetry
from tidefs.journal.log import KAFKA_CONFIG_ENV, redact_url

if TYPE_CHECKING:
    from tidefs.fs.coherence import Invalidator, ObservedState, OwnRequests
    from tidefs.fs.data import DataPath
    from tidefs.fs.ops import TideOps
    from tidefs.journal.log import Log
    from tidefs.replica.fetch import BlockFetcher
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import ApplyResult, State
    from tidefs.replica.store import BlockStore

log = logging.getLogger(__name__)

READY = b"ready\n"
"""What a mount writes to its ready fd (or the daemon pipe) once it serves."""

FLUSH_TICK = 0.5
"""Seconds between checks for write buffers older than the flush interval."""

SWITCH_INTERVAL_S = 0.0005
"""How long a thread that wants the GIL waits before asking its holder to let go.

The committer gives up the GIL at every SQLite step, RocksDB write and
wake-up of trio, while the trio thread runs request after request. With
Python's default of 5 ms, each of those returns waited ~0.2-0.5 ms behind
trio; at 0.5 ms, 8 threads creating and removing files get ~10% more done
and the mount spends less CPU per file (A/B in one session, same machine)."""


class MountError(Exception):
    """A mount could not start; the message is the one line the user sees."""


CACHE_TIMEOUT_S = 60.0
"""How long the kernel may keep a name (found or absent) and attributes without asking.

Every change reaches the kernel's caches before that: this mount's own
through its replies and the kernel's own invalidation after each call it
makes, everyone else's through the invalidation of what their fold changed
(fs/coherence.py). The timeout only bounds the damage of a missed
invalidation; at 1 s, a `stat` or path walk over files nobody changes asked
the mount again every second."""


FUSE_READERS = 16
"""Request-reading tasks pyfuse3 keeps even when idle.

pyfuse3 starts a task whenever none is left reading, and ends one as soon
as two are idle; with its default of one, eight threads creating files made
one and a half task starts and ends per file, each with a fresh request
buffer."""


@dataclass(frozen=True)
class MountConfig:
    """Everything a mount needs, resolved (default directories filled in by `resolve_dirs`).

    An empty `state_dir` or `cache_dir` asks for the default, which depends on
    the volume's identity and so is known only once its log is read.
    """

    volume: str
    mountpoint: str
    journal_url: str
    region: str
    state_dir: str
    cache_dir: str
    cache_size: int = 1 << 30
    replicate: bool = True
    max_staleness: float | None = None
    metrics_port: int | None = None
    flush_interval: float = 2.0
    compact_threshold: int = 16
    compact_delay: float = 5.0
    attr_timeout: float = CACHE_TIMEOUT_S
    write_through: str | None = None
    store_timeout: float = 5.0
    metrics_host: str = telemetry.DEFAULT_METRICS_HOST
    private: bool = False
    nonempty: bool = False
    strict: bool = False


WRITE_THROUGH_CHOICES = ("primary",)
"""Values of `--write-through`: the regions whose stores get every block before its command."""


def _xdg(var: str, fallback: str) -> str:
    base = os.environ.get(var)
    return base if base else os.path.join(os.path.expanduser("~"), fallback)


def _volume_part(volume: str, identity: str | None) -> str:
    return volume if identity is None else f"{volume}@{identity}"


def default_state_dir(volume: str, region: str, identity: str | None = None) -> str:
    """Where a region's state of a volume lives unless told: $XDG_DATA_HOME/tidefs/VOL@ID/REGION.

    ID is the volume's identity (`volume_identity`), so that two volumes of
    one name never share a state. Without it, the name-only path that older
    versions used (`default_dirs` still uses one that holds this volume).
    """
    base = _xdg("XDG_DATA_HOME", ".local/share")
    return os.path.join(base, "tidefs", _volume_part(volume, identity), region)


def default_cache_dir(volume: str, region: str, identity: str | None = None) -> str:
    """Where the block cache lives unless told: $XDG_CACHE_HOME/tidefs/VOL@ID/REGION."""
    base = _xdg("XDG_CACHE_HOME", ".cache")
    return os.path.join(base, "tidefs", _volume_part(volume, identity), region)


def holds_volume_state(path: str, log_: Log, volume: str) -> bool:
    """Whether the state directory `path` holds a state of the very volume whose log is `log_`.

    The state must name the volume, and the record the log holds at the
    state's applied offset must be one the state folded (its request id has
    an outcome there): a state of another volume of the same name, folded
    from another log, fails that test (request ids are random 122-bit values).
    """
    from tidefs.journal import codec
    from tidefs.journal.log import JournalError
    from tidefs.replica.state import State, StateError

    if not os.path.isfile(os.path.join(path, "CURRENT")):
        return False
    try:
        state = State.open(path, read_only=True)
    except StateError:
        return False
    try:
        vol = state.volume()
        applied = state.applied_offset()
        if vol is None or vol.name != volume or applied < log_.start():
            return False
        records = log_.read(applied, max_records=1)
        if not records or records[0].offset != applied:
            return False
        return state.outcome(codec.decode(records[0].payload).request_id) is not None
    except (JournalError, StateError):
        return False
    finally:
        state.close()


def default_dirs(log_: Log, volume: str, region: str, *, suffix: str = "") -> tuple[str, str]:
    """Return the default (state, cache) directories of `region` of the volume of `log_`.

    They are keyed by the volume's identity. A directory of the name-only
    layout of older versions stays in use when it holds this volume's state
    (`holds_volume_state`); one that holds another volume's is left alone.
    `suffix` names the state of another process than a mount (`.replicate`).
    Raises MountError when the log was trimmed and so no longer tells the
    volume's identity.
    """
    from tidefs.fs.volume import volume_identity

    legacy = default_state_dir(volume, region) + suffix
    if holds_volume_state(legacy, log_, volume):
        return legacy, default_cache_dir(volume, region)
    identity = volume_identity(log_)
    if identity is None:
        # Trimmed: a state made before the trim is still found by what it holds.
        home = os.path.dirname(os.path.dirname(legacy))
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(home)):
                found = name.removeprefix(f"{volume}@")
                path = default_state_dir(volume, region, found) + suffix
                if found != name and holds_volume_state(path, log_, volume):
                    return path, default_cache_dir(volume, region, found)
        raise MountError(
            f"the log of volume {volume!r} no longer starts with its CreateVolume record, "
            "which names the default directories: give --state-dir and --cache-dir"
        )
    return (
        default_state_dir(volume, region, identity) + suffix,
        default_cache_dir(volume, region, identity),
    )


def resolve_dirs(cfg: MountConfig) -> MountConfig:
    """Fill in the default state and cache directories (which need the volume's log)."""
    from tidefs.journal.log import JournalError, LogMissing, open_log

    if cfg.state_dir and cfg.cache_dir:
        return cfg
    shown = redact_url(cfg.journal_url)
    try:
        with open_log(cfg.journal_url, cfg.volume, create=False) as lg:
            state_dir, cache_dir = default_dirs(lg, cfg.volume, cfg.region)
    except LogMissing as exc:
        raise MountError(f"volume {cfg.volume!r} does not exist in {shown}") from exc
    except JournalError as exc:
        raise MountError(f"journal {shown} is not usable: {redact_url(str(exc))}") from exc
    return dataclasses.replace(
        cfg, state_dir=cfg.state_dir or state_dir, cache_dir=cfg.cache_dir or cache_dir
    )


def check_dirs(cfg: MountConfig) -> None:
    """Refuse a state or cache directory that is a file or cannot be created, in one line."""
    for what, path in (("state directory", cfg.state_dir), ("cache directory", cfg.cache_dir)):
        if os.path.lexists(path) and not os.path.isdir(path):
            raise MountError(f"{what} {path} exists and is not a directory")
        parent = path
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise MountError(f"{what} {path} cannot be created: {parent} is not a directory")
        if parent != path and not os.access(parent, os.W_OK | os.X_OK):
            raise MountError(f"{what} {path} cannot be created: {parent} is not writable")


def _empty_out(path: str) -> None:
    """Remove what is in the directory `path` (which was empty before this mount)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def canonical_mountpoint(path: str) -> str:
    """Resolve `path` without touching the mount point itself.

    Only the parent is resolved: a stat of a FUSE mount point from the process
    that serves it, before or after its loop runs, waits for that process.
    """
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


# -- configuration checks ------------------------------------------------------


def check_config(cfg: MountConfig) -> None:
    """Fail fast on what can be checked without opening anything."""
    if not os.path.isdir(cfg.mountpoint):
        raise MountError(f"mount point {cfg.mountpoint} does not exist or is not a directory")
    if os.path.ismount(cfg.mountpoint):
        raise MountError(f"{cfg.mountpoint} is already a mount point")
    if not cfg.nonempty and _has_entries(cfg.mountpoint):
        raise MountError(
            f"mount point {cfg.mountpoint} is not empty: the mount would hide its contents "
            "(use --nonempty to mount over them anyway)"
        )
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the fuse module or run with --device /dev/fuse"
        )
    if cfg.cache_size < 0:
        raise MountError(f"cache size must not be negative, not {cfg.cache_size}")
    if cfg.max_staleness is not None and cfg.max_staleness < 0:
        raise MountError(f"max staleness must not be negative, not {cfg.max_staleness}")
    if cfg.write_through is not None and cfg.write_through not in WRITE_THROUGH_CHOICES:
        raise MountError(f"write-through must be one of {WRITE_THROUGH_CHOICES}")
    if cfg.store_timeout <= 0:
        raise MountError(f"store timeout must be positive, not {cfg.store_timeout}")


def _has_entries(path: str) -> bool:
    """Whether directory `path` holds anything (an unreadable one counts as empty)."""
    try:
        with os.scandir(path) as it:
            return next(it, None) is not None
    except OSError:
        return False


# -- the mounted file system ---------------------------------------------------


class Mount:
    """The open resources of one mount, from the log to the FUSE operations."""

    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        self.log: Log | None = None
        self.state: State | None = None
        self.replica: Replica | None = None
        self.stores: dict[str, BlockStore] = {}
        self.fetcher: BlockFetcher | None = None
        self.data: DataPath | None = None
        self.ops: TideOps | None = None
        self.invalidator: Invalidator | None = None
        self.own: OwnRequests | None = None
        self.replicator: Any = None
        self.publisher: Any = None
        self.mounted = False
        self.warnings: list[str] = []
        self._stop = threading.Event()

    # -- opening -----------------------------------------------------------

    def open(self) -> None:
        """Open everything and catch up with the log; raise MountError with one line."""
        from tidefs.fs.cache import DiskBlockCache
        from tidefs.fs.coherence import Invalidator, ObservedState, OwnRequests
        from tidefs.fs.data import DataPath
        from tidefs.fs.ops import TideOps
        from tidefs.journal.log import JournalError, LogMissing, open_log
        from tidefs.replica.fetch import BlockFetcher, open_region_stores
        from tidefs.replica.replica import Replica, fold_range
        from tidefs.replica.state import State, StateError, StateLockedError

        cfg = self.cfg
        shown = redact_url(cfg.journal_url)
        try:
            # Never create a log: a volume is formatted first, and a typo must leave no file.
            self.log = open_log(cfg.journal_url, cfg.volume, create=False)
            self.log.head()
        except LogMissing as exc:
            raise MountError(f"volume {cfg.volume!r} does not exist in {shown}") from exc
        except JournalError as exc:
            raise MountError(f"journal {shown} is not usable: {exc}") from exc
        from tidefs.replica.snapshot import SnapshotError, bootstrap_state

        try:
            # An empty state directory starts from the newest usable snapshot.
            bootstrap_state(self.log, cfg.state_dir, volume=cfg.volume, prefer=cfg.region)
        except (JournalError, SnapshotError) as exc:
            raise MountError(f"cannot start the state of {cfg.volume!r}: {exc}") from exc
        try:
            private.makedirs(cfg.state_dir)
            self.state = State.open(cfg.state_dir)
        except StateLockedError as exc:
            raise MountError(
                f"state directory {cfg.state_dir} is in use by another tidefs mount"
            ) from exc
        except (OSError, StateError) as exc:
            raise MountError(f"cannot open state directory {cfg.state_dir}: {exc}") from exc
        vol = self.state.volume()
        if vol is not None and vol.name != cfg.volume:
            raise MountError(f"{cfg.state_dir} holds volume {vol.name!r}, not {cfg.volume!r}")
        try:
            fold_range(self.log, self.state)
        except JournalError as exc:
            raise MountError(f"cannot read the log of {cfg.volume!r}: {exc}") from exc
        vol = self.state.volume()
        if vol is None:
            raise MountError(f"volume {cfg.volume!r} does not exist in {shown}")
        local = vol.region(cfg.region)
        if local is None:
            names = ", ".join(r.name for r in vol.regions)
            raise MountError(
                f"region {cfg.region!r} is not a region of volume {cfg.volume!r} ({names})"
            )
        local_url = local.store_url
        try:
            # Another region's store may be down now: it opens lazily, reads skip it.
            self.stores = open_region_stores(vol, timeout=cfg.store_timeout)
            self.stores[cfg.region].exists("blocks/00/0000000000000000/00000")
        except Exception as exc:
            raise MountError(f"block store {redact_url(local_url)} is not usable: {exc}") from exc
        self.fetcher = BlockFetcher(cfg.region, self.stores, timeout=cfg.store_timeout)

        # The replica folds through ObservedState so that the invalidator can
        # tell this mount's own commands from everyone else's.
        observed = ObservedState(self.state)
        self.replica = Replica(self.log, cast("State", observed), cfg.region)
        own = self.own = OwnRequests(self.replica)
        try:
            cache = DiskBlockCache(cfg.cache_dir, cfg.cache_size)
        except OSError as exc:
            raise MountError(f"cannot use cache directory {cfg.cache_dir}: {exc}") from exc
        self._check_private()
        self.data = DataPath(
            state=self.state,
            submit=own.submit,
            region=cfg.region,
            chunk_size=vol.chunk_size,
            block_size=vol.block_size,
            fetcher=self.fetcher,
            disk_cache=cache,
            flush_interval=cfg.flush_interval,
            compact_threshold=cfg.compact_threshold,
            compact_delay=cfg.compact_delay,
            write_through=vol.primary if cfg.write_through == "primary" else None,
        )
        observed.keeper = self.data  # files removed elsewhere stay readable here (data.py)
        self.ops = TideOps(
            state=self.state,
            replica=self.replica,
            own=own,
            data=self.data,
            attr_timeout=cfg.attr_timeout,
            entry_timeout=cfg.attr_timeout,
            max_staleness=cfg.max_staleness,
        )
        self.invalidator = Invalidator(observed, own)
        self.replica.add_listener(self.invalidator.on_apply)
        self.replica.add_listener(self._removal_watch(observed))
        self.replica.start()
        if cfg.replicate:
            self.replicator = _start_replicator(self)
        from tidefs.replica.status import StatusPublisher

        self.publisher = StatusPublisher(
            cfg.journal_url, cfg.volume, cfg.region, self._status_fields
        ).start()
        telemetry.configure(cfg.volume, cfg.region)
        replica = self.replica
        telemetry.observe_region(
            telemetry.RegionSources(
                log=self.log,
                applied=lambda: replica.applied,
                fetch_stats=self.fetcher.stats,
                replicator=self.replicator,
            )
        )
        try:
            telemetry.start_exporters(cfg.metrics_port, host=cfg.metrics_host)
        except OSError as exc:
            raise MountError(
                f"cannot serve metrics on {cfg.metrics_host} port {cfg.metrics_port}: {exc}"
            ) from exc

    def _removal_watch(self, observed: ObservedState) -> Callable[[ApplyResult], None]:
        """A listener that stops this mount's changes once the fold removes its region.

        Its writes could no longer be committed (a slice's home must be a region
        of the volume), and no other region would read this region's store.
        """
        from tidefs.journal.commands import RemoveRegion
        from tidefs.replica.replica import RegionRemoved

        cfg, own, state = self.cfg, self.own, self.state
        assert own is not None and state is not None

        def watch(_result: ApplyResult) -> None:
            if own.removed is not None:
                return
            for offset, env in observed.last_batch:
                cmd = env.command
                if not (isinstance(cmd, RemoveRegion) and cmd.name == cfg.region):
                    continue
                vol = state.volume()
                if vol is not None and vol.region(cfg.region) is None:
                    own.removed = RegionRemoved(
                        f"region {cfg.region} was removed from volume {cfg.volume} at offset "
                        f"{offset}: this mount refuses every change from now on (EROFS) and "
                        "still serves reads; unmount it"
                    )
                    log.error("%s", own.removed)
                    return

        return watch

    def _check_private(self) -> None:
        """Warn about local files other users can reach (refuse them with `strict`).

        What tidefs creates is owner-only; this finds what was made before,
        or by hand: the state and cache directories, an SQLite log with its
        -wal and -shm, and this region's directory store.
        """
        from tidefs.journal.sqlite import SqliteLog
        from tidefs.replica.store import FileStore

        cfg = self.cfg
        paths = [cfg.state_dir, cfg.cache_dir]
        if isinstance(self.log, SqliteLog):
            db = str(self.log.path)
            paths += [db, f"{db}-wal", f"{db}-shm"]
        store = self.stores.get(cfg.region)
        if isinstance(store, FileStore):
            paths.append(str(store.root))
        for path in paths:
            why = private.exposure(path)
            if why is None:
                continue
            fix = f"chmod {'-R ' if os.path.isdir(path) else ''}go-rwx {path}"
            if cfg.strict:
                raise MountError(f"{path} {why} (--strict): run {fix}")
            self.warnings.append(f"warning: {path} {why}; run {fix}")

    # -- mounting and serving ----------------------------------------------

    def mount(self) -> None:
        """Make the kernel mount (pyfuse3.init); raise MountError on failure."""
        import pyfuse3

        cfg = self.cfg
        options = {
            "default_permissions",
            f"fsname=tidefs:{cfg.volume}",
            "subtype=tidefs",
            "noatime",
        }
        # Root's mounts serve every user (the kernel checks permissions:
        # default_permissions); --private keeps any mount to its owner alone.
        if os.geteuid() == 0 and not cfg.private:
            options.add("allow_other")
        assert self.ops is not None
        try:
            pyfuse3.init(self.ops, cfg.mountpoint, options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount at {cfg.mountpoint}: {exc}") from exc
        self.mounted = True

    async def serve(self, on_ready: Callable[[], None]) -> None:
        """Serve requests until unmounted or signalled, then flush while still mounted."""
        import pyfuse3
        import trio

        assert self.invalidator is not None
        self.invalidator.start()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_timer)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._fold_control)
            if self.cfg.max_staleness is not None:
                nursery.start_soon(self._lag_monitor)
            # Ready only once the readahead is raised: the kernel copies it into
            # each file when it is opened, so a file opened before would read
            # ahead only 128 KiB for as long as it stays open.
            nursery.start_soon(self._tune_readahead, on_ready)
            await pyfuse3.main(min_tasks=FUSE_READERS)
            nursery.cancel_scope.cancel()

    async def _tune_readahead(self, on_ready: Callable[[], None]) -> None:
        import trio

        try:
            await trio.to_thread.run_sync(_raise_readahead, self.cfg.mountpoint)
        finally:
            on_ready()

    async def _signals(self) -> None:
        import pyfuse3
        import trio

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %d: flushing and unmounting", signum)
                assert self.data is not None
                await trio.to_thread.run_sync(self._flush_all)
                if self.invalidator is not None:
                    await trio.to_thread.run_sync(self.invalidator.stop)
                pyfuse3.terminate()
                return

    async def _fold_control(self) -> None:
        """SIGUSR1 pauses this region's fold, SIGUSR2 resumes it (operators and tests make lag).

        While paused, writes through this mount block (each waits for its own
        command to be applied), reads see the state at the paused offset, and
        the metrics and status reports show the lag growing.
        """
        import trio

        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
            async for signum in signals:
                assert self.replica is not None
                if signum == signal.SIGUSR1:
                    await trio.to_thread.run_sync(self.replica.pause)
                    # After pause returned: nothing appended from now on is applied.
                    log.warning("SIGUSR1: fold paused at offset %d", self.replica.applied)
                else:
                    log.warning("SIGUSR2: fold resumed from offset %d", self.replica.applied)
                    self.replica.resume()

    async def _flush_timer(self) -> None:
        import trio

        assert self.data is not None
        data = self.data
        while True:
            await trio.sleep(FLUSH_TICK)
            data.compact_due()
            for ino in data.due():
                try:
                    await trio.to_thread.run_sync(data.flush, ino)
                except Exception as exc:  # kept buffered; retried next tick, reported on close
                    log.warning("timed flush of inode %d failed: %s", ino, exc)

    async def _lag_monitor(self) -> None:
        import trio

        while True:
            try:
                lag = await trio.to_thread.run_sync(self._measure_lag)
            except Exception as exc:
                log.debug("cannot measure lag: %s", exc)
            else:
                assert self.ops is not None
                self.ops.lag_s = lag
            await trio.sleep(0.25)

    def _measure_lag(self) -> float:
        assert self.log is not None and self.replica is not None
        head = self.log.head()
        applied = self.replica.applied
        if applied >= head - 1:
            return 0.0
        records = self.log.read(applied + 1, max_records=1, timeout=0.0)
        if not records:
            return 0.0
        return max(0.0, (time.time_ns() - records[0].timestamp_ns) / 1e9)

    def _flush_all(self) -> None:
        assert self.data is not None
        for ino, exc in self.data.flush_all():
            log.error("cannot flush inode %d: %s", ino, exc)

    # -- closing -------------------------------------------------------------

    def _status_fields(self) -> dict[str, Any]:
        """The figures this region publishes for `tidefs status` and `tidefs verify`."""
        from tidefs.replica.status import region_fields

        assert self.replica is not None
        return region_fields(
            self.replica,
            fetch_stats=self.fetcher.stats if self.fetcher is not None else None,
            replicator=self.replicator,
        )

    def close(self) -> None:
        """Flush, unmount, and release everything; safe after a partial open."""
        telemetry.shutdown()  # first: its last collection still reads the log and replica
        if self.publisher is not None:
            self.publisher.stop(final=True)  # gc and the trim point stop counting this mount
        if self.invalidator is not None:
            self.invalidator.stop()
        if self.data is not None:
            for ino, exc in self.data.close():
                log.error("writes to inode %d could not be flushed: %s", ino, exc)
        if self.own is not None:
            # Commits the queued reclaims and waits for the committer's last batch
            # (each is bounded): nothing may fold into the state once it is closed
            # below. Later commands (the orphans ops.close drops) go straight to
            # the replica.
            self.own.close()
        if self.ops is not None:
            self.ops.close()
        if self.mounted:
            import pyfuse3

            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            self.mounted = False
        if self.replicator is not None:
            with contextlib.suppress(Exception):
                self.replicator.close()
        if self.replica is not None:
            self.replica.stop()
        if self.fetcher is not None:
            self.fetcher.close()
        for store in self.stores.values():
            with contextlib.suppress(Exception):
                store.close()
        if self.state is not None:
            self.state.close()
        if self.log is not None:
            self.log.close()


def _start_replicator(m: Mount) -> Any:
    """Start this region's block replicator, sharing the mount's fetcher (and region health)."""
    from tidefs.replica.replicator import start_for_mount

    assert m.log is not None and m.state is not None
    try:
        return start_for_mount(m.log, m.state, m.cfg.region, m.stores, fetcher=m.fetcher)
    except Exception as exc:  # reads still fall back to the home region
        log.warning("block replicator did not start: %s", exc)
        return None


def _raise_readahead(mountpoint: str, kib: int = 16384) -> None:
    """Best effort: let the kernel read ahead further than FUSE's 128 KiB default.

    Runs on a worker thread once the loop serves: the statvfs waits for the
    kernel's INIT handshake, which would otherwise reset the value, and the
    device comes from /proc/self/mountinfo because only root may write it.
    """
    try:
        os.statvfs(mountpoint)
        dev = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == mountpoint:
                    dev = fields[2]
        if dev is None:
            return
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.debug("cannot raise readahead: %s", exc)


# -- run_mount -----------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


def _serve(
    cfg: MountConfig,
    notify_fds: Sequence[int],
    *,
    echo_errors: bool,
    warn_fd: int | None = None,
    detach: bool = False,
) -> int:
    """Open, mount and serve in this process; return the exit code.

    Warnings go to the log, and to stderr (`echo_errors`) or as "warning ..."
    lines to `warn_fd` (the daemon's pipe, whose reader prints them).
    `detach` (the daemon) points stdio at /dev/null and logging at the state
    directory's mount.log once that directory is known.
    """
    import trio

    from tidefs.replica.state import StateLockedError

    def report_error(message: str) -> None:
        message = redact_url(message)
        if echo_errors:
            print(f"tidefs mount: {message}", file=sys.stderr)
        else:
            log.error("%s", message)
        for fd in notify_fds:
            _write_all(fd, f"error {message}\n".encode())

    def stop_early(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # Until the loop's own signal receiver takes over: leave through `finally`.
    signal.signal(signal.SIGTERM, stop_early)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        cfg = resolve_dirs(cfg)
        check_dirs(cfg)
    except MountError as exc:
        report_error(str(exc))
        return 1
    # What this mount creates, a failed start removes again (never what existed).
    made = (cfg.state_dir, cfg.state_dir + ".replicator", cfg.cache_dir)
    created = [top for d in made for top in private.missing_dirs(d)[-1:]]
    emptied = [d for d in made if os.path.isdir(d) and not os.listdir(d)]
    m = Mount(cfg)
    failed = False
    try:
        try:
            if detach:
                _detach_stdio(cfg)
            m.open()
            for message in m.warnings:
                log.warning("%s", message)
                if echo_errors:
                    print(f"tidefs mount: {message}", file=sys.stderr)
                if warn_fd is not None:
                    _write_all(warn_fd, f"warning {message}\n".encode())
            m.mount()
        except MountError as exc:
            # A state locked by another mount is that mount's: never remove it.
            failed = not isinstance(exc.__cause__, StateLockedError)
            report_error(str(exc))
            return 1
        except Exception as exc:  # an unexpected failure still gets its one line
            failed = True
            log.exception("mount failed")
            report_error(f"{type(exc).__name__}: {exc}")
            return 1
        _write_record(cfg)

        def ready() -> None:
            for fd in notify_fds:
                _write_all(fd, READY)
                with contextlib.suppress(OSError):
                    os.close(fd)

        trio.run(m.serve, ready)
        return 0
    finally:
        m.close()
        _remove_record(cfg)
        if failed:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
            for path in emptied:
                _empty_out(path)


def run_mount(
    volume: str,
    mountpoint: str,
    *,
    journal_url: str,
    region: str,
    state_dir: str | None = None,
    cache_dir: str | None = None,
    cache_size: int = 1 << 30,
    foreground: bool = False,
    replicate: bool = True,
    max_staleness: float | None = None,
    metrics_port: int | None = None,
    ready_fd: int | None = None,
    flush_interval: float = 2.0,
    compact_threshold: int = 16,
    compact_delay: float = 5.0,
    attr_timeout: float = CACHE_TIMEOUT_S,
    write_through: str | None = None,
    store_timeout: float = 5.0,
    metrics_host: str = telemetry.DEFAULT_METRICS_HOST,
    private: bool = False,
    nonempty: bool = False,
    strict: bool = False,
) -> int:
    """Mount `volume` at `mountpoint` for `region`; return the process exit code.

    In the foreground, serve until unmounted or signalled. Otherwise return 0
    once a daemon serves the mount, or 1 with its error line on stderr.
    `ready_fd`, when given, receives b"ready\\n" once the mount serves (or an
    "error ..." line) and is closed.

    Tuning, with defaults for production: `flush_interval` (seconds a write
    may stay buffered), `compact_threshold` (slices that make a chunk worth
    compacting; 0 disables compaction) and `compact_delay` (quiet seconds
    before it is compacted), `attr_timeout` (how long the kernel may cache
    attributes and names; changes from other writers are invalidated at once
    regardless, this only bounds the damage of a missed invalidation).
    `write_through="primary"` also puts every block into the primary region's
    store before its command is appended; `store_timeout` bounds each call to
    a store (a read that needs an unreachable store fails with EIO after it).
    Metrics are served on `metrics_host` (loopback unless told) port
    `metrics_port`. `private` leaves out allow_other (only the mounting user
    may enter); `nonempty` allows mounting over a directory that holds files;
    `strict` refuses local files that other users can read instead of warning.
    """
    cfg = MountConfig(
        volume=volume,
        mountpoint=canonical_mountpoint(mountpoint),
        journal_url=journal_url,
        region=region,
        state_dir=os.path.abspath(state_dir) if state_dir else "",
        cache_dir=os.path.abspath(cache_dir) if cache_dir else "",
        cache_size=cache_size,
        replicate=replicate,
        max_staleness=max_staleness,
        metrics_port=metrics_port,
        flush_interval=flush_interval,
        compact_threshold=compact_threshold,
        compact_delay=compact_delay,
        attr_timeout=attr_timeout,
        write_through=write_through,
        store_timeout=store_timeout,
        metrics_host=metrics_host,
        private=private,
        nonempty=nonempty,
        strict=strict,
    )
    try:
        note = detach_dead_mount(cfg.mountpoint)
        if note is not None:
            print(f"tidefs mount: {note}", file=sys.stderr)
        check_config(cfg)
    except MountError as exc:
        print(f"tidefs mount: {exc}", file=sys.stderr)
        if ready_fd is not None:
            _write_all(ready_fd, f"error {exc}\n".encode())
        return 1
    notify = [ready_fd] if ready_fd is not None else []
    if foreground:
        return _serve(cfg, notify, echo_errors=True)
    return _daemonize(cfg, notify)


def _daemonize(cfg: MountConfig, notify: list[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: become a session leader, fork again, and exec the daemon
        try:
            os.close(r)
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            _exec_daemon(cfg, [w, *notify])
        except BaseException as exc:
            _write_all(w, f"error cannot start the mount daemon: {exc}\n".encode())
        finally:
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    line = _await_ready(r)
    os.close(r)
    if line == READY:
        return 0
    message = line.decode(errors="replace").strip().removeprefix("error ").strip()
    print(
        f"tidefs mount: {message or 'the mount process exited before it was ready'}",
        file=sys.stderr,
    )
    return 1


def _exec_daemon(cfg: MountConfig, notify: list[int]) -> None:
    """Replace this process by `python -m tidefs.fs.mount` serving `cfg`; never returns.

    The configuration travels in a memory file the new process inherits, not
    on its command line: `ps` shows a command line to every local user, so
    it carries only what identifies the mount, the journal URL redacted.
    """
    payload = {
        "config": dataclasses.asdict(cfg),
        "notify": notify,
        "log_level": logging.getLogger().level,
    }
    fd = os.memfd_create("tidefs-mount-config", 0)
    _write_all(fd, json.dumps(payload).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    for inherited in (fd, *notify):
        os.set_inheritable(inherited, True)
    argv = [sys.executable, "-m", "tidefs.fs.mount", f"--journal={redact_url(cfg.journal_url)}"]
    argv += [f"--region={cfg.region}", f"--config-fd={fd}", "--", cfg.volume, cfg.mountpoint]
    os.execv(sys.executable, argv)


def _serve_daemon(fd: int) -> int:
    """Serve the mount whose configuration `_exec_daemon` left in `fd` (the daemon's main)."""
    # Nothing of the daemon's reaches the terminal of `tidefs mount`: its errors go
    # through the notify pipe (one line), its log to mount.log once the state is known.
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    with os.fdopen(fd, "rb") as f:
        payload = json.load(f)
    logging.getLogger().setLevel(int(payload.get("log_level") or logging.NOTSET))
    cfg = MountConfig(**payload["config"])
    notify = [int(n) for n in payload["notify"]]
    return _serve(cfg, notify, echo_errors=False, warn_fd=notify[0], detach=True)


def _await_ready(fd: int) -> bytes:
    """Print the daemon's "warning ..." lines; return its first other line (ready or error)."""
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.startswith(b"warning "):
                return line + b"\n"
            print(f"tidefs mount: {line[8:].decode(errors='replace')}", file=sys.stderr)
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf
        buf += chunk


def _detach_stdio(cfg: MountConfig) -> None:
    """Point stdio at /dev/null and the log at the state directory's mount.log."""
    private.makedirs(cfg.state_dir)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    log_path = os.path.join(cfg.state_dir, "mount.log")
    os.close(private.create_file(log_path))  # owner-only before the handler appends to it
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


# -- the record that lets umount find the daemon --------------------------------
#
# A record names the process serving a mount point. Anyone who can write where
# records live could make `umount` signal any process, so records live only in
# a directory the user owns and nobody else may write, and a record is
# believed only after the process it names is proven to serve that mount.


def _private_dir_ok(path: str) -> bool:
    """Whether `path` is a real directory of this user that nobody else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _primary_record_dir() -> str:
    """$XDG_RUNTIME_DIR/tidefs; else /run/tidefs for root, /tmp/tidefs-UID for others."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "tidefs")
    uid = os.geteuid()
    return "/run/tidefs" if uid == 0 else os.path.join("/tmp", f"tidefs-{uid}")


def _fallback_record_dirs() -> list[str]:
    """Private directories used when the primary one is squatted (the first is written)."""
    pattern = os.path.join(tempfile.gettempdir(), f"tidefs-{os.geteuid()}-*")
    return sorted(p for p in glob.glob(pattern) if _private_dir_ok(p))


def _record_dirs() -> list[str]:
    """Every directory whose records may be believed (owned by this user, private)."""
    primary = _primary_record_dir()
    return ([primary] if _private_dir_ok(primary) else []) + _fallback_record_dirs()


def _record_dir() -> str:
    """The directory to write records into, created private if missing.

    A primary directory that another user made (or may write) is not used:
    a private one under the temporary directory takes its place.
    """
    primary = _primary_record_dir()
    try:
        os.mkdir(primary, private.DIR_MODE)
        os.chmod(primary, private.DIR_MODE)
    except OSError:  # there already (checked next), or not ours to create
        pass
    if _private_dir_ok(primary):
        return primary
    fallbacks = _fallback_record_dirs()
    if fallbacks:
        return fallbacks[0]
    made = tempfile.mkdtemp(prefix=f"tidefs-{os.geteuid()}-")
    log.warning(
        "%s belongs to another user or is writable by others: mount records go to %s",
        primary,
        made,
    )
    return made


def _record_name(mountpoint: str) -> str:
    """The file name of the record of the mount at `mountpoint` (already canonical)."""
    return hashlib.sha256(mountpoint.encode()).hexdigest()[:24] + ".json"


def _record_path(mountpoint: str) -> str:
    """Where the mount at `mountpoint` (already canonical) writes its record."""
    return os.path.join(_record_dir(), _record_name(mountpoint))


@dataclass(frozen=True)
class _KernelMount:
    """One line of /proc/self/mountinfo: a mount as the kernel sees it."""

    dev: str  # MAJOR:MINOR; for FUSE, the minor is the connection's number
    fstype: str
    super_options: str

    @property
    def owner(self) -> int | None:
        """The uid of a FUSE mount's owner (its user_id option)."""
        for opt in self.super_options.split(","):
            if opt.startswith("user_id="):
                with contextlib.suppress(ValueError):
                    return int(opt.removeprefix("user_id="))
        return None

    @property
    def is_tidefs(self) -> bool:
        return self.fstype == "fuse.tidefs"


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _kernel_mount(mountpoint: str) -> _KernelMount | None:
    """The topmost mount at `mountpoint` (canonical) in this mount namespace, if any."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) < 5 or len(rest) < 3:
                    continue
                if _unescape_mountinfo(fields[4]) == mountpoint:
                    found = _KernelMount(fields[2], rest[0], rest[2])
    except OSError:
        return None
    return found


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot): None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _uids(pid: int) -> list[int]:
    """The real, effective, saved and file-system uids of process `pid`."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(u) for u in line.split()[1:]]
    return []


def _holds_fuse_device(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def _write_record(cfg: MountConfig) -> None:
    pid = os.getpid()
    kernel = _kernel_mount(cfg.mountpoint)
    record = {
        "pid": pid,
        "start": _start_time(pid),
        "uid": os.geteuid(),
        "dev": kernel.dev if kernel is not None else None,
        "mountpoint": cfg.mountpoint,
        "volume": cfg.volume,
        "journal_url": cfg.journal_url,
        "region": cfg.region,
        "state_dir": cfg.state_dir,
        "kafka_config": os.environ.get(KAFKA_CONFIG_ENV),
    }
    try:
        path = _record_path(cfg.mountpoint)
        tmp = f"{path}.{pid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        fd = os.open(
            os.path.join(cfg.state_dir, "mount.pid"),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
            0o600,
        )
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid}\n")
    except OSError as exc:
        log.warning("cannot record the mount for umount: %s", exc)


def _read_record(path: str) -> dict[str, Any] | None:
    """The record at `path` if it is a file of this user's (in a directory checked before)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        with os.fdopen(fd) as f:
            fd = -1
            record = json.load(f)
    except (OSError, ValueError):
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _find_records(mountpoint: str) -> list[tuple[str, dict[str, Any]]]:
    """The believable records of the mount at `mountpoint` (canonical): (path, record)."""
    out = []
    for directory in _record_dirs():
        path = os.path.join(directory, _record_name(mountpoint))
        record = _read_record(path)
        if record is not None and record.get("mountpoint") == mountpoint:
            out.append((path, record))
    return out


def _remove_record(cfg: MountConfig) -> None:
    for path, record in _find_records(cfg.mountpoint):
        if record["pid"] == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(path)
    pidfile = os.path.join(cfg.state_dir, "mount.pid")
    with contextlib.suppress(OSError, ValueError):
        with open(pidfile) as f:
            pid = int(f.read().strip())
        if pid == os.getpid():
            os.unlink(pidfile)


def _open_server(record: dict[str, Any], mountpoint: str) -> int | None:
    """A pidfd of the process that `record` names, if it provably serves `mountpoint`.

    Proof: the mount point is a tidefs FUSE mount of this user's whose
    connection is the one the record names, and the process runs under this
    user's uid, started when the record says, and holds /dev/fuse open. The
    pidfd is opened before the checks, so a PID reused meanwhile cannot be
    signalled through it (the signal fails instead). None otherwise.
    """
    uid = os.geteuid()
    kernel = _kernel_mount(mountpoint)
    if kernel is None or not kernel.is_tidefs or kernel.owner != uid:
        return None
    if record.get("dev") != kernel.dev or record.get("uid") != uid:
        return None
    pid = record["pid"]
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        start = _start_time(pid)
        proven = (
            start is not None
            and start == record.get("start")
            and _uids(pid)[:2] == [uid, uid]
            and _holds_fuse_device(pid)
        )
    except (OSError, ValueError):
        proven = False
    if not proven:
        os.close(pidfd)
        return None
    return pidfd


def _dead_mount(mountpoint: str) -> bool:
    """Whether `mountpoint` is a tidefs mount of this user's whose process is gone.

    The kernel keeps the mount of a killed FUSE process; every access to it
    fails with ENOTCONN until it is detached.
    """
    kernel = _kernel_mount(mountpoint)
    if kernel is None or not kernel.is_tidefs or kernel.owner != os.geteuid():
        return False
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _detach(mountpoint: str, *, lazy: bool) -> str | None:
    """fusermount3 -u (-z) `mountpoint`; None, or the reason it failed."""
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return None
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "fusermount3 failed"


def _forget_stale_records(mountpoint: str) -> list[int]:
    """Remove the records at `mountpoint` whose process is gone; return their pids."""
    gone = []
    for path, record in _find_records(mountpoint):
        start = _start_time(record["pid"])
        if start is None or start != record.get("start"):
            gone.append(record["pid"])
            with contextlib.suppress(OSError):
                os.unlink(path)
    return gone


def detach_dead_mount(mountpoint: str) -> str | None:
    """Detach a killed tidefs mount left at `mountpoint`; say what was done (None: nothing)."""
    mp = canonical_mountpoint(mountpoint)
    if not _dead_mount(mp):
        return None
    gone = _forget_stale_records(mp)
    why = _detach(mp, lazy=True)
    if why is not None:
        raise MountError(f"cannot detach the dead mount at {mp}: {why}")
    by = f" (process {gone[0]})" if gone else ""
    return f"detached the dead mount at {mp}: the tidefs process that served it{by} is gone"


def mount_record(mountpoint: str) -> dict[str, Any] | None:
    """Describe the live tidefs mount at `mountpoint`, None if there is none.

    Only a record whose process is proven to serve that mount (see
    `_open_server`) counts. Keys: pid, mountpoint, volume, journal_url,
    region, state_dir (and start, uid, dev: what the proof compares).
    """
    mp = canonical_mountpoint(mountpoint)
    for _path, record in _find_records(mp):
        pidfd = _open_server(record, mp)
        if pidfd is not None:
            os.close(pidfd)
            return record
    return None


def sync_mount(mountpoint: str, *, timeout: float = 60.0, data: bool = False) -> int:
    """Wait until the mount at `mountpoint` has applied everything appended before this call.

    The barrier of `tidefs sync`: the log's head is read first, then the
    mount's state is polled (read-only) until its applied offset reaches it.
    With `data`, every block that a file of the state at that point needs is
    then made present in the region's own store (copied from other regions
    here if the replicator has not done it yet; see `localize`), so that no
    read of those files needs another region afterwards. Both halves share
    `timeout`. Returns the exit code; errors are one line on stderr.
    """
    from tidefs.journal.log import JournalError, open_log
    from tidefs.replica.state import State, StateError

    record = mount_record(mountpoint)
    if record is None:
        print(f"tidefs sync: {mountpoint} is not a live tidefs mount", file=sys.stderr)
        return 1
    if record.get("kafka_config") and KAFKA_CONFIG_ENV not in os.environ:
        # The mount's Kafka settings file (the environment of this call wins, as for the mount).
        os.environ[KAFKA_CONFIG_ENV] = str(record["kafka_config"])
    try:
        with open_log(record["journal_url"], record["volume"]) as lg:
            target = lg.head() - 1
    except JournalError as exc:
        shown = redact_url(record["journal_url"])
        print(
            f"tidefs sync: journal {shown} is not usable: {redact_url(str(exc))}", file=sys.stderr
        )
        return 1
    deadline = time.monotonic() + timeout
    applied = -1
    while True:
        try:
            state = State.open(record["state_dir"], read_only=True)
            try:
                applied = state.applied_offset()
            finally:
                state.close()
        except StateError as exc:
            log.debug("cannot read the mount's state yet: %s", exc)
        if applied >= target:
            return _sync_data(mountpoint, record, deadline) if data else 0
        if time.monotonic() > deadline:
            print(
                f"tidefs sync: {mountpoint} applied offset {applied}, "
                f"not {target}, within {timeout:g}s",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.02)


def _sync_data(mountpoint: str, record: dict[str, Any], deadline: float) -> int:
    """The `--data` half of `sync_mount`: every referenced block into the local store."""
    from tidefs.replica.fetch import BlockFetcher, localize, open_region_stores
    from tidefs.replica.state import State, StateError
    from tidefs.replica.store import StoreError

    region = record["region"]
    try:
        state = State.open(record["state_dir"], read_only=True)
        try:
            vol = state.volume()
            refs = [ref for _ino, _chunk, ref in state.iter_live_slices()]
        finally:
            state.close()
    except StateError as exc:
        print(f"tidefs sync: cannot read the state of {mountpoint}: {exc}", file=sys.stderr)
        return 1
    if vol is None:
        print(f"tidefs sync: {mountpoint} has no volume record", file=sys.stderr)
        return 1
    left = max(0.1, deadline - time.monotonic())
    try:
        stores = open_region_stores(vol, timeout=min(5.0, left))
    except StoreError as exc:
        print(f"tidefs sync: cannot open the block stores: {exc}", file=sys.stderr)
        return 1
    fetcher = BlockFetcher(region, stores, timeout=min(5.0, left), write_back=False)
    try:
        result = localize(fetcher, refs, deadline=deadline)
    except StoreError as exc:
        print(f"tidefs sync: region {region}'s store is not usable: {exc}", file=sys.stderr)
        return 1
    finally:
        fetcher.close()
        for store in stores.values():
            with contextlib.suppress(Exception):
                store.close()
    if result.missing:
        key, why = next(iter(sorted(result.missing.items())))
        print(
            f"tidefs sync: {len(result.missing)} block(s) not in region {region}'s store "
            f"in time; first {key}: {why}",
            file=sys.stderr,
        )
        return 1
    log.info("sync --data: %d blocks local, %d copied", result.present, result.copied)
    return 0


def _wait_exit(pidfd: int, timeout: float) -> bool:
    """Wait until the process of `pidfd` has exited; False if `timeout` passed first."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def umount(mountpoint: str, *, timeout: float = 60.0) -> int:
    """Flush and unmount a tidefs mount; return the exit code (errors as one stderr line).

    The process proven to serve `mountpoint` (`_open_server`) is asked to
    stop (SIGTERM through its pidfd), which flushes every buffered write
    before it unmounts; this waits until it has exited. A dead mount (its
    process was killed) is detached and reported. A mount without a record
    proven to serve it is left to `fusermount3 -u`, which only its owner (or
    root) may run: no other process is ever signalled.
    """
    mp = canonical_mountpoint(mountpoint)
    for _path, record in _find_records(mp):
        pidfd = _open_server(record, mp)
        if pidfd is None:
            continue
        try:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            except ProcessLookupError:  # exited since the check: see what it left
                break
            if not _wait_exit(pidfd, timeout):
                print(
                    f"tidefs umount: the mount of {mp} did not stop within {timeout:g}s",
                    file=sys.stderr,
                )
                return 1
            return 0
        finally:
            os.close(pidfd)
    try:
        note = detach_dead_mount(mp)
    except MountError as exc:
        print(f"tidefs umount: {exc}", file=sys.stderr)
        return 1
    if note is not None:
        print(f"tidefs umount: {note}", file=sys.stderr)
        return 0
    _forget_stale_records(mp)
    if _kernel_mount(mp) is None:
        print(f"tidefs umount: {mp} is not mounted", file=sys.stderr)
        return 1
    why = _detach(mp, lazy=False)
    if why is not None:
        print(f"tidefs umount: {why}", file=sys.stderr)
        return 1
    return 0


# -- python -m tidefs.fs.mount -------------------------------------------------


def _metrics_addr(text: str) -> tuple[str, int]:
    try:
        return telemetry.parse_metrics_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Mount from the command line (the test harness's entry point; `tidefs mount` is the CLI's)."""
    p = argparse.ArgumentParser(prog="python -m tidefs.fs.mount")
    p.add_argument("volume")
    p.add_argument("mountpoint")
    p.add_argument("--journal", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--state-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--cache-size", type=int, default=1 << 30)
    p.add_argument("--foreground", "-f", action="store_true")
    p.add_argument("--no-replicate", dest="replicate", action="store_false")
    p.add_argument("--max-staleness", type=float)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--metrics-addr", type=_metrics_addr)
    p.add_argument("--private", action="store_true")
    p.add_argument("--nonempty", action="store_true")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--flush-interval", type=float, default=2.0)
    p.add_argument("--compact-threshold", type=int, default=16)
    p.add_argument("--compact-delay", type=float, default=5.0)
    p.add_argument("--attr-timeout", type=float, default=CACHE_TIMEOUT_S)
    p.add_argument("--write-through", choices=WRITE_THROUGH_CHOICES)
    p.add_argument("--store-timeout", type=float, default=5.0)
    p.add_argument("--umount", action="store_true", help="unmount MOUNTPOINT instead")
    p.add_argument("--kafka-config", metavar="FILE", help="librdkafka settings (secrets), mode 600")
    p.add_argument("--config-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="tidefs: %(levelname)s %(name)s: %(message)s",
    )
    if args.config_fd is not None:  # the daemon that `tidefs mount` started
        return _serve_daemon(args.config_fd)
    if args.kafka_config:
        os.environ[KAFKA_CONFIG_ENV] = os.path.abspath(args.kafka_config)
    if args.umount:
        return umount(args.mountpoint)
    if args.metrics_addr is not None and args.metrics_port is not None:
        p.error("--metrics-addr and --metrics-port exclude each other")
    host, port = args.metrics_addr or (telemetry.DEFAULT_METRICS_HOST, args.metrics_port)
    return run_mount(
        args.volume,
        args.mountpoint,
        journal_url=args.journal,
        region=args.region,
        state_dir=args.state_dir,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        foreground=args.foreground,
        replicate=args.replicate,
        max_staleness=args.max_staleness,
        metrics_port=port,
        metrics_host=host,
        private=args.private,
        nonempty=args.nonempty,
        strict=args.strict,
        ready_fd=args.ready_fd,
        flush_interval=args.flush_interval,
        compact_threshold=args.compact_threshold,
        compact_delay=args.compact_delay,
        attr_timeout=args.attr_timeout,
        write_through=args.write_through,
        store_timeout=args.store_timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
