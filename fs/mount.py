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
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from tidefs import telemetry
from tidefs.journal.log import KAFKA_CONFIG_ENV, redact_url

if TYPE_CHECKING:
    from tidefs.fs.coherence import Invalidator, OwnRequests
    from tidefs.fs.data import DataPath
    from tidefs.fs.ops import TideOps
    from tidefs.journal.log import Log
    from tidefs.replica.fetch import BlockFetcher
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import State
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
    attr_timeout: float = 1.0
    write_through: str | None = None
    store_timeout: float = 5.0


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


def _first_missing(path: str) -> str | None:
    """The outermost directory that creating `path` makes, None if `path` exists."""
    top = None
    while not os.path.lexists(path):
        top = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def _runtime_dir() -> str:
    """Where mounts record their daemon's pid for `umount`: $XDG_RUNTIME_DIR/tidefs."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "tidefs") if base else f"/tmp/tidefs-{os.getuid()}"


def canonical_mountpoint(path: str) -> str:
    """Resolve `path` without touching the mount point itself.

    Only the parent is resolved: a stat of a FUSE mount point from the process
    that serves it, before or after its loop runs, waits for that process.
    """
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _record_path(mountpoint: str) -> str:
    """The pid record of the mount at `mountpoint` (already canonical)."""
    digest = hashlib.sha256(mountpoint.encode()).hexdigest()[:24]
    return os.path.join(_runtime_dir(), f"{digest}.json")


# -- configuration checks ------------------------------------------------------


def check_config(cfg: MountConfig) -> None:
    """Fail fast on what can be checked without opening anything."""
    if not os.path.isdir(cfg.mountpoint):
        raise MountError(f"mount point {cfg.mountpoint} does not exist or is not a directory")
    if os.path.ismount(cfg.mountpoint):
        raise MountError(f"{cfg.mountpoint} is already a mount point")
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
            os.makedirs(cfg.state_dir, exist_ok=True)
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
            telemetry.start_exporters(cfg.metrics_port)
        except OSError as exc:
            raise MountError(f"cannot serve metrics on port {cfg.metrics_port}: {exc}") from exc

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
        if os.geteuid() == 0:
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
            await pyfuse3.main()
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
            self.publisher.stop()
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
    cfg: MountConfig, notify_fds: Sequence[int], *, echo_errors: bool, detach: bool = False
) -> int:
    """Open, mount and serve in this process; return the exit code.

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
    created = [d for d in map(_first_missing, made) if d is not None]
    emptied = [d for d in made if os.path.isdir(d) and not os.listdir(d)]
    m = Mount(cfg)
    failed = False
    try:
        try:
            if detach:
                _detach_stdio(cfg)
            m.open()
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
    attr_timeout: float = 1.0,
    write_through: str | None = None,
    store_timeout: float = 5.0,
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
    )
    try:
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
    line = _read_line(r)
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
    return _serve(cfg, notify, echo_errors=False, detach=True)


def _read_line(fd: int) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        out += chunk
    return out


def _detach_stdio(cfg: MountConfig) -> None:
    """Point stdio at /dev/null and the log at the state directory's mount.log."""
    os.makedirs(cfg.state_dir, exist_ok=True)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(os.path.join(cfg.state_dir, "mount.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


# -- the record that lets umount find the daemon --------------------------------


def _write_record(cfg: MountConfig) -> None:
    record = {
        "pid": os.getpid(),
        "mountpoint": cfg.mountpoint,
        "volume": cfg.volume,
        "journal_url": cfg.journal_url,
        "region": cfg.region,
        "state_dir": cfg.state_dir,
        "kafka_config": os.environ.get(KAFKA_CONFIG_ENV),
    }
    path = _record_path(cfg.mountpoint)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        with open(os.path.join(cfg.state_dir, "mount.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as exc:
        log.warning("cannot record the mount for umount: %s", exc)


def _read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _remove_record(cfg: MountConfig) -> None:
    path = _record_path(cfg.mountpoint)
    record = _read_record(path)
    if record is not None and record["pid"] == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
    pidfile = os.path.join(cfg.state_dir, "mount.pid")
    with contextlib.suppress(OSError, ValueError):
        with open(pidfile) as f:
            pid = int(f.read().strip())
        if pid == os.getpid():
            os.unlink(pidfile)


def mount_record(mountpoint: str) -> dict[str, Any] | None:
    """Describe the live tidefs mount at `mountpoint`, None if there is none.

    Keys: pid, mountpoint, volume, journal_url, region, state_dir.
    """
    record = _read_record(_record_path(canonical_mountpoint(mountpoint)))
    if record is None or not _alive(record["pid"]):
        return None
    return record


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


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def umount(mountpoint: str, *, timeout: float = 60.0) -> int:
    """Flush and unmount a tidefs mount; return the exit code (errors as one stderr line).

    The daemon serving `mountpoint` is asked to stop (SIGTERM), which flushes
    every buffered write before it unmounts; this waits until it has exited.
    A mount without a live daemon is detached with fusermount3.
    """
    mp = canonical_mountpoint(mountpoint)
    record = _read_record(_record_path(mp))
    pid = record["pid"] if record is not None else None
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            print(
                f"tidefs umount: the mount of {mp} did not stop within {timeout:g}s",
                file=sys.stderr,
            )
            return 1
        return 0
    if not os.path.ismount(mp):
        print(f"tidefs umount: {mp} is not mounted", file=sys.stderr)
        return 1
    lazy = pid is not None  # the daemon died: nothing left to flush, detach it
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "fusermount3 failed"
        print(f"tidefs umount: {why}", file=sys.stderr)
        return 1
    return 0


# -- python -m tidefs.fs.mount -------------------------------------------------


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
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--flush-interval", type=float, default=2.0)
    p.add_argument("--compact-threshold", type=int, default=16)
    p.add_argument("--compact-delay", type=float, default=5.0)
    p.add_argument("--attr-timeout", type=float, default=1.0)
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
        metrics_port=args.metrics_port,
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
