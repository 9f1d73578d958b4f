"""The `tidefs` command line.

Every subcommand follows the same conventions: `--help`, exit code 0 on
success, 1 on an operational error (one clear line on stderr), 2 on a usage
error (argparse), and `--json` where a script would read the output. Errors
from the layers below are caught once, here, and turned into that one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tidefs import __version__
from tidefs.journal.commands import Envelope

if TYPE_CHECKING:
    from tidefs.journal.log import Log

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An operational error to print as one line, with exit code 1."""


# -- argument types ----------------------------------------------------------
# Shared by every subcommand: a value out of range is a usage error (exit 2,
# argparse names the option), never a crash or a silent surprise further down.


def _number(text: str, kind: Callable[[str], Any], low: float, strict: bool, what: str) -> Any:
    """Parse `text` with `kind` and check it is finite and above (or at) `low`."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An offset, a count or a limit: 0 or more."""
    value: int = _number(text, int, 0, False, "an integer >= 0")
    return value


def positive_int(text: str) -> int:
    """A number of workers, refreshes or items: 1 or more."""
    value: int = _number(text, int, 0, True, "an integer > 0")
    return value


def non_negative_float(text: str) -> float:
    """A timeout or a bound in seconds: 0 or more (0 means do not wait)."""
    value: float = _number(text, float, 0.0, False, "a number of seconds >= 0")
    return value


def positive_float(text: str) -> float:
    """An interval in seconds that must pass between two steps: more than 0."""
    value: float = _number(text, float, 0.0, True, "a number of seconds > 0")
    return value


def port_number(text: str) -> int:
    """A TCP port to listen on: 1 to 65535."""
    value: int = _number(text, int, 1, False, "a port number from 1 to 65535")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return value


# -- rendering -------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Turn dataclasses, tuples and bytes into JSON-friendly values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return os.fsdecode(value)
    return value


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="milliseconds")


def record_dict(offset: int, log_ts_ns: int, env: Envelope) -> dict[str, Any]:
    """The JSON shape of one decoded log record (`tidefs log --json`)."""
    return {
        "offset": offset,
        "time": _iso(env.timestamp_ns),
        "log_time": _iso(log_ts_ns),
        "region": env.origin,
        "request_id": env.request_id.hex(),
        "command": type(env.command).__name__,
        "fields": _plain(env.command),
    }


def parse_time(text: str) -> int:
    """Parse an ISO 8601 time (naive means local time) into ns since the epoch."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"not an ISO 8601 time: {text!r}") from exc
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp() * 1_000_000_000)


def parse_size(text: str) -> int:
    """Parse a size such as 512M, 10G or 1048576 into bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        size = int(float(t[: len(t) - len(unit)]) * units[unit])
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from exc
    if size < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return size


# -- subcommands -----------------------------------------------------------


def open_volume_log(journal_url: str, volume: str) -> Log:
    """Open the log of `volume`, refusing (exit 1) a volume that was never formatted.

    A command that only reads must not pass off a missing volume as an empty
    one, nor create what it looks for: a SQLite journal file that does not
    exist is not created, and a missing Kafka topic is not created either.
    """
    from tidefs.journal.log import LogMissing, open_log

    try:
        lg = open_log(journal_url, volume, create=False)
    except LogMissing as exc:
        raise CliError(
            f"no volume {volume!r} in this journal ({exc}; tidefs format makes one)"
        ) from exc
    try:
        if lg.head() == 0:
            raise CliError(
                f"no volume {volume!r} in this journal (its log is empty; tidefs format makes one)"
            )
    except BaseException:
        lg.close()
        raise
    return lg


def _region_spec(text: str) -> tuple[str, str]:
    from tidefs.fs.volume import region_name_problem

    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=STORE_URL, not {text!r}")
    problem = region_name_problem(name)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return name, url


def _schema_version(text: str) -> int:
    from tidefs.journal import codec, features

    try:
        version = int(text)
    except ValueError:
        version = -1
    if not features.LEGACY_SCHEMA <= version <= codec.CURRENT_VERSION:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a schema version this tidefs writes "
            f"({features.LEGACY_SCHEMA}..{codec.CURRENT_VERSION})"
        )
    return version


def parse_duration(text: str) -> int:
    """Parse a duration such as 7d, 12h, 30m or 3600 (seconds) into seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    t = text.strip().lower()
    unit = t[-1:] if t[-1:] in units else "s"
    try:
        seconds = int(float(t.rstrip("smhdw")) * units[unit])
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from exc
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text!r}")
    return seconds


def cmd_format(args: argparse.Namespace) -> int:
    from tidefs.fs.volume import VolumeError, format_volume
    from tidefs.journal.commands import Region

    regions = [Region(name, url) for name, url in args.region]
    primary = args.primary or regions[0].name
    try:
        format_volume(
            args.journal,
            args.volume,
            regions,
            primary,
            chunk_size=args.chunk_size,
            block_size=args.block_size,
            retention_s=args.retention,
            schema_version=args.schema_version,
        )
    except VolumeError as exc:
        raise CliError(str(exc)) from exc
    names = ", ".join(r.name for r in regions)
    print(f"formatted volume {args.volume} (regions {names}; primary {primary})")
    return 0


def _metrics_addr(text: str) -> tuple[str, int]:
    from tidefs import telemetry

    try:
        return telemetry.parse_metrics_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _metrics_where(args: argparse.Namespace) -> tuple[str, int | None]:
    """(host, port) of the metrics endpoint: `--metrics-port P` is loopback only."""
    from tidefs import telemetry

    if args.metrics_addr is not None:
        if args.metrics_port is not None:
            raise CliUsageError("--metrics-addr and --metrics-port exclude each other")
        return args.metrics_addr
    return telemetry.DEFAULT_METRICS_HOST, args.metrics_port


class CliUsageError(Exception):
    """A usage error found after parsing: one line, exit code 2."""


def cmd_mount(args: argparse.Namespace) -> int:
    from tidefs.fs.mount import run_mount

    metrics_host, metrics_port = _metrics_where(args)
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
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        write_through=args.write_through,
        store_timeout=args.store_timeout,
        private=args.private,
        nonempty=args.nonempty,
        strict=args.strict,
    )


def cmd_umount(args: argparse.Namespace) -> int:
    from tidefs.fs.mount import umount

    return umount(args.mountpoint, timeout=args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    from tidefs.replica.status import newest_per_region, read_mounts, with_silent_regions

    with open_volume_log(args.journal, args.volume) as lg:
        mounts = read_mounts(args.journal, args.volume, metadata_log=lg)
        regions = with_silent_regions(lg, newest_per_region(mounts))
    if args.json:
        # Per region its newest report (the figures of a region with one mount), and every
        # mount of the region, one row each, under "mounts".
        doc = {name: st.as_dict() for name, st in regions.items()}
        for st in mounts.values():
            doc[st.region].setdefault("mounts", []).append(st.as_dict())
        print(json.dumps(doc, sort_keys=True))
        return 0
    if not regions:
        print(f"no region of volume {args.volume} has published its status yet")
        return 0
    print(
        f"{'region':<12} {'applied':>9} {'lag rec':>8} {'lag s':>7} {'backlog':>8} "
        f"{'bytes':>10} {'oldest s':>8} {'fallback':>8} {'schema':>6} {'host':<16} mount"
    )
    for st in regions.values():
        if not st.published:
            print(f"{st.region:<12} {'-':>9} never published its status (not running?)")
    warned: set[str] = set()
    for st in mounts.values():
        print(
            f"{st.region:<12} {st.applied_offset:>9} {st.lag_records:>8} {st.lag_seconds:>7.2f} "
            f"{st.backlog_blocks:>8} {st.backlog_bytes:>10} {st.backlog_oldest_s:>8.1f} "
            f"{st.fallback_reads:>8} {f'v{st.knows_schema}' if st.knows_schema else '?':>6} "
            f"{st.host or '-':<16} {st.mount_id or '-'}"
        )
        if st.state_before_log_start and st.region not in warned:
            warned.add(st.region)
            print(
                f"warning: region {st.region} is at offset {st.applied_offset}, older than the "
                "log's start: it must restart from a snapshot",
                file=sys.stderr,
            )
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from tidefs.fs.mount import sync_mount

    return sync_mount(args.mountpoint, timeout=args.timeout, data=args.data)


def cmd_top(args: argparse.Namespace) -> int:
    from tidefs.fs.top import run_top

    open_volume_log(args.journal, args.volume).close()
    return run_top(args.journal, args.volume, interval=args.interval, iterations=args.iterations)


def cmd_replicate(args: argparse.Namespace) -> int:
    from tidefs.fs.mount import MountError, default_dirs
    from tidefs.journal.log import LogMissing, open_log
    from tidefs.replica.replicator import run_replicator

    state_dir = args.state_dir
    if not state_dir:
        # The default is keyed by the volume's identity, which its log's first record holds.
        try:
            with open_log(args.journal, args.volume, create=False) as lg:
                state_dir = default_dirs(lg, args.volume, args.region, suffix=".replicate")[0]
        except LogMissing as exc:
            raise CliError(f"volume {args.volume!r} does not exist") from exc
        except MountError as exc:
            raise CliError(str(exc)) from exc
    metrics_host, metrics_port = _metrics_where(args)
    return run_replicator(
        args.volume,
        args.journal,
        args.region,
        state_dir=state_dir,
        concurrency=args.concurrency,
        bandwidth_limit=args.bandwidth_limit,
        once=args.once,
        timeout=args.timeout,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )


def cmd_log(args: argparse.Namespace) -> int:
    from tidefs.journal import codec
    from tidefs.journal.kafka import LogTrimmed

    def below_start(start: int, wanted: int) -> CliError:
        return CliError(
            f"the log of volume {args.volume!r} starts at offset {start} (older records "
            f"were deleted), so offset {wanted} cannot be read; use --from {start} or higher"
        )

    with open_volume_log(args.journal, args.volume) as lg:
        start = lg.start()
        offset = start if args.from_offset is None else args.from_offset
        if offset < start:
            raise below_start(start, offset)
        if start > 0 and args.from_offset is None:
            # Trimmed: say where the output starts, so that nobody mistakes it for the whole log.
            print(f"the log starts at offset {start} (older records were deleted)", file=sys.stderr)
        remaining = args.limit
        while remaining is None or remaining > 0:
            batch = 1000 if remaining is None else min(remaining, 1000)
            try:
                records = lg.read(offset, max_records=batch, timeout=0.0)
            except LogTrimmed as exc:  # trimmed while we read
                raise below_start(exc.start, exc.wanted) from exc
            if not records:
                break
            for rec in records:
                env = codec.decode(rec.payload)
                row = record_dict(rec.offset, rec.timestamp_ns, env)
                if args.json:
                    print(json.dumps(row, sort_keys=True))
                else:
                    fields = " ".join(f"{k}={v!r}" for k, v in row["fields"].items())
                    print(
                        f"{rec.offset:>8} {row['time']} {env.origin:<10} {row['command']} {fields}"
                    )
            offset = records[-1].offset + 1
            if remaining is not None:
                remaining -= len(records)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tidefs.fs.progress import Progress
    from tidefs.journal.log import open_log
    from tidefs.replica.replica import fold_range
    from tidefs.replica.snapshot import SnapshotError, bootstrap_state
    from tidefs.replica.state import State
    from tidefs.replica.store import open_store

    to_ns = parse_time(args.to_time) if args.to_time is not None else None
    with open_log(args.journal, args.volume) as lg:
        head = lg.head()
        if to_ns is not None:
            # State as of that time includes records stamped exactly then.
            target = lg.offset_for_time(to_ns + 1) - 1
        elif args.to_offset is not None:
            target = min(args.to_offset, head - 1)
        else:
            target = head - 1
        extra = [open_store(url) for url in args.store or ()]
        try:
            # An empty directory starts from the newest snapshot at or below the target.
            found = bootstrap_state(
                lg, args.state_dir, volume=args.volume, to_offset=target, stores=extra
            )
        except SnapshotError as exc:
            raise CliError(str(exc)) from exc
        finally:
            for store in extra:
                store.close()
        if found is not None and not args.quiet:
            print(
                f"starting from the snapshot at offset {found[0]} (region {found[1]})",
                file=sys.stderr,
            )
        state = State.open(args.state_dir)
        try:
            applied = state.applied_offset()
            vol = state.volume()
            if vol is not None and vol.name != args.volume:
                raise CliError(f"{args.state_dir} holds volume {vol.name!r}, not {args.volume!r}")
            if applied > target:
                raise CliError(
                    f"{args.state_dir} is already at offset {applied}, past the target {target}: "
                    "replay into an empty directory to rewind"
                )
            bar = Progress(target - applied, "records") if not args.quiet else None

            def progress(now: int, _target: int) -> None:
                if bar is not None:
                    bar.update(now - applied)

            final = fold_range(lg, state, to_offset=target, progress=progress)
            if bar is not None:
                bar.finish()
            result = {
                "offset": final,
                "digest": state.digest_hex(),
                "target": target,
                "snapshot_offset": None if found is None else found[0],
            }
        finally:
            state.close()
    _emit(args, result, f"offset {result['offset']} digest {result['digest']}")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from tidefs.replica.state import State

    if not os.path.isdir(args.state_dir):
        raise CliError(f"no state directory at {args.state_dir}")
    state = State.open(args.state_dir, read_only=True)
    try:
        vol = state.volume()
        result = {
            "offset": state.applied_offset(),
            "digest": state.digest_hex(),
            "volume": vol.name if vol else None,
        }
    finally:
        state.close()
    _emit(args, result, f"offset {result['offset']} digest {result['digest']}")
    return 0


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result, sort_keys=True) if getattr(args, "json", False) else text)


# -- parser ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="tidefs",
        description="tidefs: a multi-region POSIX file system for AI data.",
    )
    p.add_argument("--version", action="version", version=f"tidefs {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def journal_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--journal",
            required=True,
            metavar="URL",
            help="the metadata log: sqlite:///path/log.db or kafka://host:port[,host:port]",
        )
        sp.add_argument(
            "--kafka-config",
            metavar="FILE",
            help="librdkafka settings, e.g. SASL credentials (mode 600; default "
            "$TIDEFS_KAFKA_CONFIG); TIDEFS_KAFKA_<SETTING> variables override it",
        )

    sp = sub.add_parser("format", help="create a volume: its regions, stores and layout")
    sp.add_argument("volume")
    journal_arg(sp)
    sp.add_argument(
        "--region",
        required=True,
        action="append",
        type=_region_spec,
        metavar="NAME=STORE_URL",
        help="a region and its block store (file:///dir or s3://bucket/prefix?endpoint=URL); repeat",
    )
    sp.add_argument("--primary", metavar="NAME", help="the primary region (default: the first)")
    sp.add_argument("--chunk-size", type=parse_size, default=64 << 20, metavar="SIZE")
    sp.add_argument("--block-size", type=parse_size, default=4 << 20, metavar="SIZE")
    sp.add_argument(
        "--retention",
        type=parse_duration,
        default=7 * 86400,
        metavar="DURATION",
        help="how long unreferenced blocks are kept for restores (default 7d)",
    )
    sp.add_argument(
        "--schema-version",
        type=_schema_version,
        metavar="N",
        help="enable schema versions and features only up to N, so that regions running an "
        "older tidefs can read the volume until `tidefs upgrade` (default: all this one knows)",
    )
    sp.set_defaults(func=cmd_format)

    sp = sub.add_parser("mount", help="mount a volume for one region")
    sp.add_argument("volume")
    sp.add_argument("mountpoint")
    journal_arg(sp)
    sp.add_argument("--region", required=True, metavar="NAME")
    sp.add_argument("--state-dir", metavar="DIR", help="the region's RocksDB state")
    sp.add_argument("--cache-dir", metavar="DIR", help="the on-disk block cache")
    sp.add_argument("--cache-size", type=parse_size, default=1 << 30, metavar="SIZE")
    sp.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    sp.add_argument(
        "--no-replicate",
        dest="replicate",
        action="store_false",
        help="do not run the block replicator in this mount",
    )
    sp.add_argument(
        "--max-staleness",
        type=non_negative_float,
        metavar="SECONDS",
        help="reads wait while the local fold lags the log head by more than this",
    )
    sp.add_argument("--metrics-port", type=port_number, metavar="PORT")
    sp.add_argument(
        "--metrics-addr",
        type=_metrics_addr,
        metavar="HOST:PORT",
        help="serve metrics on HOST:PORT (--metrics-port P is 127.0.0.1:P; 0.0.0.0:P is every interface)",
    )
    sp.add_argument(
        "--private",
        action="store_true",
        help="only the mounting user may use the mount (root's mounts serve every user otherwise)",
    )
    sp.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even over a directory that holds files (hiding them while mounted)",
    )
    sp.add_argument(
        "--strict",
        action="store_true",
        help="refuse to mount when local state, cache, store or log files are open to other users",
    )
    sp.add_argument(
        "--write-through",
        choices=("primary",),
        help="also put every block into the primary region's store before acknowledging",
    )
    sp.add_argument(
        "--store-timeout",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="bound on each block store call; a read needing an unreachable store fails (EIO)",
    )
    sp.set_defaults(func=cmd_mount)

    sp = sub.add_parser("umount", help="flush and unmount a tidefs mount")
    sp.add_argument("mountpoint")
    sp.add_argument("--timeout", type=non_negative_float, default=60.0, metavar="SECONDS")
    sp.set_defaults(func=cmd_umount)

    sp = sub.add_parser("sync", help="wait until a mount has applied everything appended so far")
    sp.add_argument("mountpoint")
    sp.add_argument("--timeout", type=non_negative_float, default=60.0, metavar="SECONDS")
    sp.add_argument(
        "--data",
        action="store_true",
        help="also wait until every block the files need is in this region's own store",
    )
    sp.set_defaults(func=cmd_sync)

    sp = sub.add_parser("replicate", help="run a region's block replicator without a mount")
    sp.add_argument("volume")
    journal_arg(sp)
    sp.add_argument("--region", required=True, metavar="NAME")
    sp.add_argument("--state-dir", metavar="DIR", help="the replicator's own state and progress")
    sp.add_argument("--concurrency", type=positive_int, default=8)
    sp.add_argument("--bandwidth-limit", type=parse_size, default=None, metavar="BYTES_PER_S")
    sp.add_argument("--once", action="store_true", help="copy the current backlog, then exit")
    sp.add_argument("--timeout", type=non_negative_float, default=None, metavar="SECONDS")
    sp.add_argument(
        "--metrics-port", type=port_number, metavar="PORT", help="serve Prometheus metrics on PORT"
    )
    sp.add_argument(
        "--metrics-addr",
        type=_metrics_addr,
        metavar="HOST:PORT",
        help="serve metrics on HOST:PORT (--metrics-port P is 127.0.0.1:P)",
    )
    sp.set_defaults(func=cmd_replicate)

    sp = sub.add_parser("log", help="print the decoded records of a volume's log")
    sp.add_argument("volume")
    journal_arg(sp)
    sp.add_argument(
        "--from",
        dest="from_offset",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="first offset to print (default: the log's start)",
    )
    sp.add_argument("--limit", type=non_negative_int, default=None, metavar="K")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.set_defaults(func=cmd_log)

    sp = sub.add_parser("replay", help="rebuild a state directory from the log")
    sp.add_argument("volume")
    journal_arg(sp)
    sp.add_argument("--state-dir", required=True, metavar="DIR")
    to = sp.add_mutually_exclusive_group()
    to.add_argument("--to-offset", type=non_negative_int, default=None, metavar="N")
    to.add_argument("--to-time", default=None, metavar="ISO8601")
    sp.add_argument(
        "--store",
        action="append",
        metavar="URL",
        help="a block store holding snapshots, for a log that no longer starts at 0 (repeatable)",
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("status", help="lag, backlog and fallback reads of every region")
    sp.add_argument("volume")
    journal_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("top", help="a live view of every region's lag (q quits)")
    sp.add_argument("volume")
    journal_arg(sp)
    sp.add_argument("--interval", type=positive_float, default=1.0, metavar="SECONDS")
    sp.add_argument(
        "--iterations", type=positive_int, default=None, metavar="N", help="quit after N refreshes"
    )
    sp.set_defaults(func=cmd_top)

    sp = sub.add_parser("digest", help="print the applied offset and digest of a state directory")
    sp.add_argument("--state-dir", required=True, metavar="DIR")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_digest)

    from tidefs.fs.opscli import register

    register(sub, journal_arg)
    return p


def _error_types() -> tuple[type[BaseException], ...]:
    """Every error the layers raise for bad input or unreachable services."""
    from tidefs.journal.codec import CodecError
    from tidefs.journal.log import JournalError

    types: list[type[BaseException]] = [CliError, JournalError, CodecError, OSError]
    try:
        from tidefs.replica.state import StateError

        types.append(StateError)
    except ImportError:
        pass
    try:
        from tidefs.replica.store import StoreError

        types.append(StoreError)
    except ImportError:
        pass
    return tuple(types)


def _stdout_closed() -> bool:
    """True if nobody reads stdout any more: a pipe whose reader exited reports POLLERR.

    This tells a `| head` that has read enough from a broken connection to a
    service, which is an error to report.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported
    return any(events & select.POLLERR for _fd, events in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `tidefs` command line; return the exit code."""
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="tidefs: %(levelname)s %(name)s: %(message)s",
    )
    from tidefs.journal.log import KAFKA_CONFIG_ENV, redact_url

    if getattr(args, "kafka_config", None):
        # Through the environment, every log this command opens (and a mount's daemon) sees it.
        os.environ[KAFKA_CONFIG_ENV] = os.path.abspath(args.kafka_config)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's last flush
        return code
    except KeyboardInterrupt:
        print("tidefs: interrupted", file=sys.stderr)
        return 130
    except CliUsageError as exc:
        print(f"tidefs {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:
        if not _stdout_closed():
            print(f"tidefs {args.command}: {exc}", file=sys.stderr)
            return 1
        # The reader went away (`| head`): stop quietly, as a tool that SIGPIPE ends does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except _error_types() as exc:
        print(f"tidefs {args.command}: {redact_url(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
