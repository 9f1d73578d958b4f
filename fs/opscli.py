"""The operations subcommands of `tidefs`: snapshot, restore, verify, fsck, gc, region, upgrade.

They follow the conventions of `tidefs.fs.cli` (exit 0 on success, 1 with one
line on stderr for an operational error, `--json` for scripts, progress on
stderr) with two documented exceptions: `verify` exits 1 when the regions
diverge and `fsck` exits 1 when a fault is left unrepaired, so that a cron job
or a CI step can alert on them; their `--json` output says which it was.

None of them touches a region's own state directory for writing: each works
on a private state, rebuilt from the newest snapshot and the log in a
temporary directory (`--work-dir`, default the system's), or copied without
taking the mount's lock (`--state-dir`). A SIGKILL at any point leaves the
volume correct, and running the same command again completes the job; a
killed run may leave its temporary directory behind (`tidefs-*` in the work
directory).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tidefs.fs import cli as _cli_module
from tidefs.fs.cli import (
    _region_spec,
    non_negative_int,
    parse_duration,
    positive_int,
)

if TYPE_CHECKING:
    from tidefs.fs.progress import Progress
    from tidefs.journal.commands import Command, Outcome
    from tidefs.journal.features import Enabled
    from tidefs.journal.log import Log
    from tidefs.replica.keys import VolumeInfo
    from tidefs.replica.state import State
    from tidefs.replica.store import BlockStore

Handler = Callable[[argparse.Namespace], int]

_cli: ModuleType = _cli_module
"""The module whose parser registered these commands, and whose `CliError` its main catches.

Run as `python -m tidefs.fs.cli`, the CLI is the module `__main__`, a second
copy of `tidefs.fs.cli` with its own `CliError` class; `register` points this
at the copy that called it, so that errors raised here are the ones its main
turns into one line and exit code 1.
"""


def _error(message: str) -> Exception:
    """Return the calling CLI's `CliError` (one line on stderr, exit code 1) for `message`."""
    error: Exception = _cli.CliError(message)
    return error


class Bars:
    """Progress on stderr for operations in phases: a new `what` finishes the previous bar."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.what: str | None = None
        self.bar: Progress | None = None

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tidefs.fs.progress import Progress

        if what != self.what or self.bar is None:
            self.finish()
            self.bar = Progress(total, what)
            self.what = what
        self.bar.total = max(total, 0)
        self.bar.update(done)

    def finish(self) -> None:
        """End the current bar's line (a plain log already printed a completed phase)."""
        if self.bar is not None and (self.bar.tty or self.bar.done < self.bar.total):
            self.bar.finish()
        self.bar = None
        self.what = None


def _ops_errors(fn: Handler) -> Handler:
    """Turn the replica layer's operational errors into the CLI's one-line errors."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from tidefs.replica.gc import GcError
        from tidefs.replica.replica import ReplicaError
        from tidefs.replica.restore import RestoreError
        from tidefs.replica.snapshot import SnapshotError
        from tidefs.replica.verify import VerifyError

        try:
            return fn(args)
        except (GcError, ReplicaError, RestoreError, SnapshotError, VerifyError) as exc:
            raise _error(str(exc)) from exc

    return run


EXTRA_STORE = "--store"
"""Key prefix, in the stores dict of a command, of the stores named by `--store` (not regions)."""


@contextlib.contextmanager
def _volume(args: argparse.Namespace) -> Iterator[tuple[Log, VolumeInfo, dict[str, BlockStore]]]:
    """Open the log, find the volume record, and open every region's store.

    Yields (log, volume record, stores). The stores are keyed by region name,
    plus `--store N` for the stores named by `--store` (searched for snapshots
    only). The dict may grow (regions added after the volume was created);
    everything in it is closed at the end.
    """
    from tidefs.journal.log import open_log
    from tidefs.replica.fetch import open_region_stores
    from tidefs.replica.snapshot import volume_from_log
    from tidefs.replica.store import open_store

    lg = open_log(args.journal, args.volume)
    stores: dict[str, BlockStore] = {}
    try:
        for i, url in enumerate(getattr(args, "store", None) or ()):
            stores[f"{EXTRA_STORE} {i + 1}"] = open_store(url)
        info = volume_from_log(lg, stores.values())
        if info.name != args.volume:
            raise _error(f"the log holds volume {info.name!r}, not {args.volume!r}")
        stores.update(open_region_stores(info))
        yield lg, info, stores
    finally:
        for store in stores.values():
            with contextlib.suppress(Exception):
                store.close()
        lg.close()


def _regions_only(stores: dict[str, BlockStore]) -> dict[str, BlockStore]:
    return {k: v for k, v in stores.items() if not k.startswith(EXTRA_STORE)}


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True))
    else:
        for line in lines:
            print(line)


def _state_dirs(items: list[tuple[str, str]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, path in items or ():
        if name in out:
            raise _error(f"region {name} is named twice by --state-dir")
        out[name] = path
    return out


def _named_dir(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, not {text!r}")
    return name, path


# -- snapshot ----------------------------------------------------------------------


@_ops_errors
def cmd_snapshot(args: argparse.Namespace) -> int:
    words = [w for w in (args.action, args.target) if w is not None]
    if len(words) == 2:
        action, args.volume = words
    else:
        action, args.volume = "create", words[0]
    if action not in ("create", "list", "prune"):
        raise _error(f"unknown snapshot action {action!r}: expected create, list or prune")
    return {"create": _snapshot_create, "list": _snapshot_list, "prune": _snapshot_prune}[action](
        args
    )


def _snapshot_create(args: argparse.Namespace) -> int:
    from tidefs.replica.snapshot import create_snapshot

    bars = Bars(args.quiet)
    with _volume(args) as (lg, _info, stores):
        snap, new = create_snapshot(
            lg,
            stores,
            volume=args.volume,
            region=args.region,
            work_dir=args.work_dir,
            state_dir=args.state_dir,
            progress=bars,
        )
    bars.finish()
    verb = "stored" if new else "already stored"
    _emit(
        args,
        {**snap.as_dict(), "new": new, "region": args.region},
        [
            f"snapshot {snap.id} {verb} in region {args.region}: offset {snap.offset}, "
            f"{len(snap.files)} files, {snap.size} bytes"
        ],
    )
    return 0


def _region_store(stores: dict[str, BlockStore], info: VolumeInfo, region: str) -> BlockStore:
    if info.region(region) is not None and region in stores:
        return stores[region]
    names = ", ".join(r.name for r in info.regions)
    raise _error(f"volume {info.name} has no region {region!r} (regions: {names})")


def _snapshot_list(args: argparse.Namespace) -> int:
    from tidefs.replica.snapshot import (
        list_incomplete,
        list_snapshots,
        log_trim_point,
    )
    from tidefs.replica.status import read_live_offsets

    with _volume(args) as (lg, info, stores):
        store = _region_store(stores, info, args.region)
        snaps = list_snapshots(store, volume=args.volume)
        incomplete = list_incomplete(store)
        everywhere = [
            s for r in info.regions for s in list_snapshots(stores[r.name], volume=args.volume)
        ]
        offsets = read_live_offsets(args.journal, args.volume, metadata_log=lg)
        applied = {n: o.applied_offset for n, o in offsets.items()}
        trim, why = log_trim_point(
            lg, everywhere, applied, [r.name for r in info.regions], retention_s=info.retention_s
        )
        names = {r.name for r in info.regions}
        counted = [o for o in offsets.values() if o.region in names]
        if counted and trim == min(o.applied_offset for o in counted) + 1:
            held = min(counted, key=lambda o: o.applied_offset)
            why += f" (region {held.region}: {held.why})"
    lines = [f"{'offset':>12} {'bytes':>12} {'created':<20} id"]
    for s in snaps:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(s.created_ns / 1e9))
        lines.append(f"{s.offset:>12} {s.size:>12} {created:<20} {s.id}")
    if not snaps:
        lines = [f"region {args.region} holds no snapshot of {args.volume}"]
    if incomplete:
        lines.append(
            f"{len(incomplete)} incomplete snapshot(s) (no manifest): {', '.join(incomplete)}"
        )
    lines.append(f"the log may be trimmed below offset {trim} ({why})")
    dead = [f"region {o.region}: {d}" for o in counted for d in o.presumed_dead]
    lines += [f"not counted: {d}" for d in dead]
    result = {
        "snapshots": [s.as_dict() for s in snaps],
        "incomplete": incomplete,
        "log_trim_offset": trim,
        "log_trim_reason": why,
        "presumed_dead": dead,
    }
    _emit(args, result, lines)
    return 0


def _snapshot_prune(args: argparse.Namespace) -> int:
    from tidefs.replica.snapshot import prune_snapshots

    with _volume(args) as (_lg, info, stores):
        store = _region_store(stores, info, args.region)
        doomed = prune_snapshots(store, args.keep, volume=args.volume, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    lines = [f"{verb} snapshot {sid}" for sid in doomed] or ["nothing to prune"]
    _emit(args, {"deleted": doomed, "dry_run": args.dry_run}, lines)
    return 0


# -- restore -----------------------------------------------------------------------


@_ops_errors
def cmd_restore(args: argparse.Namespace) -> int:
    from tidefs.replica.restore import restore

    bars = Bars(args.quiet)
    with _volume(args) as (lg, _info, stores):
        if args.at is not None:
            at_ns = _cli.parse_time(args.at)
            if at_ns > time.time_ns():
                # As an offset beyond the head is: the tree at that time is not known yet.
                raise _error(
                    f"{args.at} is in the future, past the log of {args.volume} "
                    f"(head {lg.head()}): its tree is not known yet"
                )
            # The state as of that time includes the records stamped exactly then.
            target = lg.offset_for_time(at_ns + 1) - 1
            if target < 0:
                raise _error(f"volume {args.volume} did not exist yet at {args.at}")
        else:
            target = args.offset
        with tempfile.TemporaryDirectory(prefix="tidefs-restore-", dir=args.work_dir) as work:
            result = restore(
                lg,
                stores,
                volume=args.volume,
                source=args.path,
                dest=args.to,
                target=target,
                work_dir=work,
                region=args.region,
                check_blocks=args.check_blocks,
                progress=bars,
            )
    bars.finish()
    if result.already:
        line = f"{result.dest} was already restored from {result.source} at offset {target}"
    else:
        line = (
            f"restored {result.source} as of offset {result.offset} to {result.dest}: "
            f"{result.entries} entries, {result.commands} commands"
        )
    _emit(args, result.as_dict(), [line])
    return 0


# -- verify ------------------------------------------------------------------------


@_ops_errors
def cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tidefs.replica.snapshot import copy_state, rebuild_state
    from tidefs.replica.state import State
    from tidefs.replica.verify import REFERENCE, compare_states

    dirs = _state_dirs(args.state_dir)
    if not dirs:
        return _verify_from_status(args)
    if REFERENCE in dirs:
        raise _error(
            f"{REFERENCE!r} is the name of the log's own replay; name the region otherwise"
        )
    bars = Bars(args.quiet)
    with (
        _volume(args) as (lg, _info, stores),
        tempfile.TemporaryDirectory(prefix="tidefs-verify-", dir=args.work_dir) as work,
    ):
        states: dict[str, State] = {}
        try:
            for name, path in dirs.items():
                copy_state(path, Path(work) / name)
                states[name] = State.open(Path(work) / name)
                vol = states[name].volume()
                if vol is not None and vol.name != args.volume:
                    raise _error(f"{path} holds volume {vol.name!r}, not {args.volume!r}")
            if args.replay or len(states) == 1:
                highest = max(s.applied_offset() for s in states.values())
                target = highest if args.offset is None else args.offset
                states[REFERENCE] = rebuild_state(
                    lg,
                    Path(work) / f"{REFERENCE}.replay",
                    stores=stores,
                    volume=args.volume,
                    to_offset=target,
                    progress=bars,
                )
            result = compare_states(
                states,
                lg,
                offset=args.offset,
                deep=args.deep,
                max_diffs=args.max_diffs,
                progress=bars,
            )
        finally:
            for s in states.values():
                s.close()
    bars.finish()
    lines = [
        f"{r.region:<12} applied {r.applied:>10} -> offset {r.offset:>10} digest {r.digest}"
        + ("" if r.consistent else f" (keys add up to {r.recomputed})")
        for r in result.regions
    ]
    if result.equal:
        lines.append(f"all {len(result.regions)} states agree at offset {result.offset}")
    else:
        lines.append(f"DIVERGENCE at offset {result.offset}; first differing keys:")
        for d in result.diffs:
            lines.append(f"  {d.what} [{d.key}]")
            for region, value in d.values.items():
                lines.append(f"    {region:<10} {'(absent)' if value is None else value}")
    _emit(args, result.as_dict(), lines)
    return 0 if result.equal else 1


def _verify_from_status(args: argparse.Namespace) -> int:
    """`tidefs verify` without `--state-dir`: every region's published digests against a replay."""
    from pathlib import Path

    from tidefs.replica.snapshot import rebuild_state
    from tidefs.replica.status import read_digests, read_status
    from tidefs.replica.verify import DIVERGED, OK, verify_reports

    if args.offset is not None or args.deep:
        raise _error("--offset and --deep need the regions' states: name them with --state-dir")
    reports = read_digests(args.journal, args.volume)
    if not reports:
        raise _error(
            f"no region of {args.volume} has published a digest to its status log yet "
            "(mounts and `tidefs replicate` publish every few seconds); "
            "or name the regions' states with --state-dir NAME=DIR"
        )
    bars = Bars(args.quiet)
    with (
        _volume(args) as (lg, _info, stores),
        tempfile.TemporaryDirectory(prefix="tidefs-verify-", dir=args.work_dir) as work,
    ):

        def replay(offset: int) -> State:
            return rebuild_state(
                lg,
                Path(work) / "replay",
                stores=stores,
                volume=args.volume,
                to_offset=offset,
                progress=bars,
            )

        every = read_status(args.journal, args.volume, metadata_log=lg, every_region=True)
        result = verify_reports(reports, lg, replay, regions=every, progress=bars)
    bars.finish()
    lines: list[str] = []
    for r in result.regions:
        if r.status == OK:
            lines.append(
                f"{r.region:<12} ok       at offset {r.offset:>10} digest {r.digest} "
                f"({r.checked} report(s) checked)"
            )
        elif r.status == DIVERGED:
            since = (
                f"after offset {r.last_good}, " if r.last_good is not None else "no report agreed; "
            )
            lines.append(
                f"{r.region:<12} DIVERGED at offset {r.offset:>10} digest {r.digest}, "
                f"the log's replay has {r.replay_digest}; {since}first wrong at offset {r.first_bad}"
            )
            lines.append(
                f"{'':<12} for the first differing keys, run on {r.region}'s machine: tidefs verify "
                f"{args.volume} --journal URL --state-dir {r.region}=DIR --replay "
                "(or on a copy of its state directory)"
            )
        else:
            lines.append(f"{r.region:<12} not checked: {r.detail}")
        if r.earlier_mismatches:
            lines.append(
                f"{'':<12} earlier reports disagreed at offset(s) "
                + ", ".join(str(o) for o in r.earlier_mismatches)
            )
    diverged = [r.region for r in result.regions if r.status == DIVERGED]
    if diverged:
        verb = "differs" if len(diverged) == 1 else "differ"
        lines.append(f"DIVERGENCE: {', '.join(diverged)} {verb} from the log's replay")
    else:
        checked = sum(r.status == OK for r in result.regions)
        lines.append(f"{checked} region(s) agree with the log's replay")
    _emit(args, result.as_dict(), lines)
    return 0 if result.equal else 1


# -- fsck --------------------------------------------------------------------------


@_ops_errors
def cmd_fsck(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tidefs.replica.fetch import open_region_stores
    from tidefs.replica.snapshot import rebuild_state
    from tidefs.replica.state import State
    from tidefs.replica.verify import fsck

    bars = Bars(args.quiet)
    with (
        _volume(args) as (lg, _info, stores),
        tempfile.TemporaryDirectory(prefix="tidefs-fsck-", dir=args.work_dir) as work,
    ):
        if args.state_dir is not None:
            state = State.open(args.state_dir, read_only=True)
        else:
            state = rebuild_state(
                lg,
                Path(work) / "state",
                stores=stores,
                volume=args.volume,
                prefer=args.region,
                progress=bars,
            )
        try:
            vol = state.volume()
            if vol is None or vol.name != args.volume:
                raise _error(
                    f"the state holds volume {vol.name if vol else None!r}, not {args.volume!r}"
                )
            if vol.region(args.region) is None:
                raise _error(f"volume {args.volume} has no region {args.region!r}")
            stores.update(open_region_stores([r for r in vol.regions if r.name not in stores]))
            result = fsck(
                state,
                args.region,
                _regions_only(stores),
                repair=args.repair,
                quick=args.quick,
                jobs=args.jobs,
                progress=bars,
            )
        finally:
            state.close()
    bars.finish()
    summary = result.as_dict()
    lines = [
        f"region {result.region} at offset {result.offset}: {result.slices} live slices, "
        f"{result.blocks} blocks; {summary['missing']} missing, {summary['corrupt']} corrupt, "
        f"{summary['unreplicated']} not yet replicated, {summary['repaired']} repaired"
    ]
    for p in result.faults:
        state_word = "repaired" if p.repaired else "NOT repaired"
        lines.append(
            f"  {p.kind:<8} {p.key} (home {p.home}) {state_word}{': ' + p.detail if p.detail else ''}"
        )
    if not result.ok and not args.repair:
        lines.append("run again with --repair to copy the blocks from a region with a good copy")
    _emit(args, summary, lines)
    return 0 if result.ok else 1


# -- gc ----------------------------------------------------------------------------


@_ops_errors
def cmd_gc(args: argparse.Namespace) -> int:
    from tidefs.replica.gc import apply_gc, plan_gc
    from tidefs.replica.state import State
    from tidefs.replica.status import read_live_offsets

    dirs = _state_dirs(args.state_dir)
    bars = Bars(args.quiet)
    with (
        _volume(args) as (lg, _info, stores),
        tempfile.TemporaryDirectory(prefix="tidefs-gc-", dir=args.work_dir) as work,
    ):
        offsets = read_live_offsets(args.journal, args.volume, metadata_log=lg)
        applied = {name: o.applied_offset for name, o in offsets.items()}
        held_by = {name: o.why for name, o in offsets.items()}
        for name, path in dirs.items():
            with State.open(path, read_only=True) as state:
                applied[name] = state.applied_offset()
            held_by[name] = f"state directory {path}"
        regions = _regions_only(stores)
        plan = plan_gc(
            lg,
            regions,
            volume=args.volume,
            applied=applied,
            work_dir=work,
            grace_s=args.grace,
            progress=bars,
        )
        stores.update(regions)
        bars.finish()
        if plan.blocked is not None and args.apply:
            raise _error(plan.blocked)
        deleted = apply_gc(regions, plan, progress=bars) if args.apply else 0
    bars.finish()
    dead = [
        f"region {o.region}: {d}"
        for o in offsets.values()
        if o.region in plan.regions and o.region not in dirs
        for d in o.presumed_dead
    ]
    result = {
        **plan.as_dict(),
        "applied_deletes": deleted,
        "dry_run": not args.apply,
        "held_by": {name: held_by[name] for name in plan.regions if name in held_by},
        "presumed_dead": dead,
    }
    region_lines = [
        f"region {name}: "
        + (
            f"applied offset {plan.applied[name]}, {held_by[name]}"
            if name in plan.applied
            else "never published"
        )
        for name in plan.regions
    ]
    region_lines += [f"not counted: {d}" for d in dead]
    if plan.blocked is not None:
        lines = [*region_lines, f"nothing can be deleted: {plan.blocked}"]
    else:
        verb = "deleted" if args.apply else "would delete"
        lines = [
            f"protecting {plan.referenced} slices referenced at offsets >= {plan.protect_from} "
            f"(retention window from offset {plan.window_start}, head {plan.head}); "
            f"{plan.listed} blocks listed, {plan.young} younger than the grace kept",
            *region_lines,
        ]
        for region, garbage in sorted(plan.by_region().items()):
            size = sum(g.size for g in garbage)
            lines.append(f"region {region}: {verb} {len(garbage)} blocks ({size} bytes)")
            for g in garbage[: args.show]:
                lines.append(f"  {g.key} ({g.size} bytes)")
            if len(garbage) > args.show:
                lines.append(f"  ... and {len(garbage) - args.show} more (--show N, or --json)")
        if not plan.garbage:
            lines.append("no garbage")
        elif not args.apply:
            lines.append("dry run: nothing was deleted; run with --apply to delete")
    _emit(args, result, lines)
    return 0


# -- region ------------------------------------------------------------------------


@_ops_errors
def cmd_region(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.region_parser
    if args.action == "add":
        try:
            args.region = _region_spec(args.region)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument NAME=STORE_URL: {exc}")  # exits 2, nothing appended
        return _region_add(args)
    if args.action == "remove":
        return _region_remove(args)
    parser.error(f"unknown region action {args.action!r}: expected add or remove")
    return 2  # pragma: no cover - parser.error exits


def _append_volume_command(
    args: argparse.Namespace,
    check: Callable[[State, VolumeInfo, dict[str, BlockStore]], Command],
) -> tuple[Outcome, VolumeInfo]:
    """Fold a private state to the head, let `check` refuse or build the command, append it.

    The outcome is the fold's own, so a concurrent change of the volume record
    (two `region remove`, an `upgrade` racing another) is decided by the log.
    """
    from pathlib import Path

    from tidefs.replica.replica import Replica
    from tidefs.replica.snapshot import rebuild_state

    bars = Bars(args.quiet)
    with (
        _volume(args) as (lg, _info, stores),
        tempfile.TemporaryDirectory(prefix="tidefs-region-", dir=args.work_dir) as work,
    ):
        state = rebuild_state(
            lg, Path(work) / "state", stores=stores, volume=args.volume, progress=bars
        )
        try:
            vol = state.volume()
            assert vol is not None  # rebuild_state checked the volume's name
            bars.finish()
            command = check(state, vol, stores)
            outcome = Replica(lg, state, vol.primary).submit(command)
        finally:
            state.close()
    bars.finish()
    return outcome, vol


def _refused(what: str, code: int) -> Exception:
    """The error for a command the fold refused with errno `code`, named by its symbol too."""
    import errno as errno_names
    import os

    return _error(
        f"{what} was refused by the volume: {os.strerror(code)} "
        f"({errno_names.errorcode.get(code, code)})"
    )


def _region_remove(args: argparse.Namespace) -> int:
    """Append RemoveRegion once no live block has its only copy in that region's store."""

    from tidefs.journal import features
    from tidefs.journal.commands import RemoveRegion
    from tidefs.replica.fetch import open_region_stores
    from tidefs.replica.status import LIVE_S, read_mounts
    from tidefs.replica.verify import sole_copies

    name = args.region

    def check(state: State, vol: VolumeInfo, stores: dict[str, BlockStore]) -> Command:
        names = ", ".join(r.name for r in vol.regions)
        if vol.region(name) is None:
            raise _error(f"volume {args.volume} has no region {name!r} (regions: {names})")
        if name == vol.primary:
            raise _error(
                f"region {name} is the primary of volume {args.volume}: it cannot be removed"
            )
        command = RemoveRegion(name)
        feature = features.missing(command, state.features())
        if feature is not None:
            raise _error(features.not_enabled(feature, args.volume))
        # A mount still running there could commit a block after the check below.
        now = time.time_ns()
        since = now - int(LIVE_S * 1e9)
        live = [
            m
            for m in read_mounts(args.journal, args.volume, since_ns=since).values()
            if m.region == name and m.live(now)
        ]
        if live:
            who = ", ".join(f"mount {m.mount_id or '?'} on host {m.host or '?'}" for m in live)
            raise _error(
                f"region {name} still runs {len(live)} process(es) ({who}): stop them first "
                f"(tidefs umount), since what they write would have its only copy in {name}; "
                f"one killed counts until it has not reported for {LIVE_S / 60:g} minutes"
            )
        stores.update(open_region_stores([r for r in vol.regions if r.name not in stores]))
        regions = {r.name: stores[r.name] for r in vol.regions}
        try:
            sole, unlisted = sole_copies(state, name, regions)
        except Exception as exc:  # another region's store is unreachable: nothing is proven
            raise _error(
                f"cannot check where the live blocks are before removing region {name}: {exc}"
            ) from exc
        if sole:
            why = f" ({unlisted})" if unlisted is not None else ""
            other = vol.primary  # never the region removed
            fix = (
                f"tidefs sync --data on a mount of region {other}, or tidefs replicate "
                f"{args.volume} --journal URL --region {other} --once"
            )
            raise _error(
                f"{len(sole)} live block(s) have their only copy in region {name}{why}, e.g. "
                f"{sole[0]}: copy them to another region first ({fix}), then remove it"
            )
        return command

    outcome, _vol = _append_volume_command(args, check)
    if not outcome.ok:
        raise _refused(f"removing region {name!r}", outcome.errno)
    _emit(
        args,
        {"volume": args.volume, "removed": name, "offset": outcome.offset},
        [f"removed region {name} from volume {args.volume} at offset {outcome.offset}"],
    )
    return 0


# -- upgrade -----------------------------------------------------------------------


@_ops_errors
def cmd_upgrade(args: argparse.Namespace) -> int:
    """Enable everything this tidefs knows once every region that published status knows it too."""

    from tidefs.journal import features
    from tidefs.replica.status import LIVE_S, counted_mounts, read_mounts

    target = features.enable_all()
    before: dict[str, Any] = {}

    def check(state: State, vol: VolumeInfo, _stores: dict[str, BlockStore]) -> Command:
        enabled = state.features()
        before.update(schema_version=enabled.schema_version, features=sorted(enabled.features))
        new = sorted(set(target.features) - enabled.features)
        if target.schema_version <= enabled.schema_version and not new:
            raise _AlreadyEnabled(enabled)
        if not args.force:
            # Every live mount of a region must know it: any one would stop its fold.
            since = time.time_ns() - int(LIVE_S * 1e9)
            mounts = counted_mounts(read_mounts(args.journal, args.volume, since_ns=since))
            for region in (r.name for r in vol.regions):
                st = next(
                    (m for m in mounts.get(region, ()) if not m.knows(target.schema_version, new)),
                    None,
                )
                if st is None:
                    continue
                knows = f"schema v{st.knows_schema}" if st.knows_schema else "an older schema"
                where = f" (mount {st.mount_id} on host {st.host})" if st.mount_id else ""
                raise _error(
                    f"region {region} runs a tidefs that knows {knows}{where}, not schema "
                    f"v{target.schema_version}"
                    + (f" with {', '.join(new)}" if new else "")
                    + ": upgrade tidefs there first (tidefs status shows what each region "
                    "knows), or pass --force"
                )
        return target

    try:
        outcome, _vol = _append_volume_command(args, check)
    except _AlreadyEnabled as done:
        _emit(
            args,
            {"volume": args.volume, "changed": False, **_level(done.enabled), "offset": None},
            [f"volume {args.volume} already enables {done.enabled.describe()}"],
        )
        return 0
    if not outcome.ok:
        raise _refused("the upgrade", outcome.errno)
    now = features.Enabled(
        target.schema_version, frozenset(target.features) | frozenset(before["features"])
    )
    _emit(
        args,
        {
            "volume": args.volume,
            "changed": True,
            **_level(now),
            "offset": outcome.offset,
            "before": before,
        },
        [f"volume {args.volume} now enables {now.describe()} (offset {outcome.offset})"],
    )
    return 0


class _AlreadyEnabled(Exception):
    def __init__(self, enabled: Enabled) -> None:
        super().__init__("already enabled")
        self.enabled = enabled


def _level(enabled: Enabled) -> dict[str, Any]:
    return {"schema_version": enabled.schema_version, "features": sorted(enabled.features)}


def _region_add(args: argparse.Namespace) -> int:
    """Append AddRegion, checked against the volume's current record by the fold itself.

    The command goes through a Replica on a private state folded to the head,
    so the outcome is the fold's own: a name that exists (even one added by a
    concurrent `region add`) comes back EEXIST and nothing changes.
    """
    import errno as errno_names

    from tidefs.fs.volume import VolumeError, probe_store
    from tidefs.journal.commands import AddRegion, Region

    name, url = args.region
    if not name or "/" in name or name != name.strip():
        raise _error(f"invalid region name {name!r}")

    def check(_state: State, vol: VolumeInfo, _stores: dict[str, BlockStore]) -> Command:
        existing = vol.region(name)
        if existing is not None:
            raise _error(
                f"volume {args.volume} already has a region {name!r} (store {existing.store_url})"
            )
        try:
            probe_store(url)
        except VolumeError as exc:
            raise _error(str(exc)) from exc
        return AddRegion(Region(name, url))

    outcome, _vol = _append_volume_command(args, check)
    if outcome.errno == errno_names.EEXIST:
        raise _error(f"volume {args.volume} already has a region {name!r}")
    if not outcome.ok:
        raise _refused(f"region {name!r}", outcome.errno)
    _emit(
        args,
        {"volume": args.volume, "region": name, "store_url": url, "offset": outcome.offset},
        [
            f"added region {name} (store {url}) to volume {args.volume} at offset "
            f"{outcome.offset}; start it with tidefs mount or tidefs replicate --region {name}"
        ],
    )
    return 0


# -- parsers -----------------------------------------------------------------------


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    journal_arg: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add the snapshot, restore, verify, fsck, gc and region parsers to the `tidefs` command line."""
    global _cli
    _cli = sys.modules.get(getattr(journal_arg, "__module__", ""), _cli_module)

    def common(sp: argparse.ArgumentParser, *, json_out: bool = True) -> None:
        journal_arg(sp)
        sp.add_argument(
            "--store",
            action="append",
            metavar="URL",
            help="a block store holding snapshots of the volume, for a log that no longer "
            "starts at offset 0 (repeatable)",
        )
        sp.add_argument(
            "--work-dir", metavar="DIR", help="where private states are built (default: temp dir)"
        )
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
        if json_out:
            sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser(
        "snapshot",
        help="store a snapshot of the volume's state in a region's store; list or prune them",
        description="tidefs snapshot [create] VOLUME | snapshot list VOLUME | snapshot prune VOLUME",
    )
    sp.add_argument("action", metavar="[create|list|prune]")
    sp.add_argument("target", nargs="?", metavar="VOLUME")
    common(sp)
    sp.add_argument(
        "--region", required=True, metavar="NAME", help="whose store holds the snapshots"
    )
    sp.add_argument(
        "--state-dir",
        metavar="DIR",
        help="snapshot this state directory at its offset (copied without its lock) instead "
        "of folding a private state to the head",
    )
    sp.add_argument(
        "--keep", type=non_negative_int, default=3, metavar="N", help="prune: snapshots to keep"
    )
    sp.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    sp.set_defaults(func=cmd_snapshot)

    sp = sub.add_parser(
        "restore",
        help="re-create a tree as it was at a past time or offset under a new path",
    )
    sp.add_argument("volume")
    common(sp)
    when = sp.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="ISO8601", help="the time whose tree to restore")
    when.add_argument(
        "--offset", type=non_negative_int, metavar="N", help="the log offset whose tree to restore"
    )
    sp.add_argument(
        "--path", required=True, metavar="/DIR", help="the tree to restore (in the volume)"
    )
    sp.add_argument(
        "--to", required=True, metavar="/NEW", help="where to re-create it; must not exist"
    )
    sp.add_argument(
        "--region", metavar="NAME", help="the region the commands come from (default: primary)"
    )
    sp.add_argument(
        "--no-check-blocks",
        dest="check_blocks",
        action="store_false",
        help="do not check that every block exists before committing a file",
    )
    sp.set_defaults(func=cmd_restore)

    sp = sub.add_parser(
        "verify",
        help="compare the digests of all regions with a replay of the log (exit 1 when they "
        "diverge): from their status reports, or from their states with --state-dir",
    )
    sp.add_argument("volume")
    common(sp)
    sp.add_argument(
        "--state-dir",
        action="append",
        type=_named_dir,
        metavar="NAME=DIR",
        help="a region's state directory (repeatable; read without its lock); without it, "
        "the regions' digests published in the status log are checked",
    )
    sp.add_argument("--replay", action="store_true", help="also compare with a replay of the log")
    sp.add_argument(
        "--offset",
        type=non_negative_int,
        metavar="N",
        help="compare at this offset (default: the highest applied)",
    )
    sp.add_argument("--deep", action="store_true", help="also recompute each digest from every key")
    sp.add_argument("--max-diffs", type=non_negative_int, default=10, metavar="N")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser(
        "fsck",
        help="check every block of every live slice in a region's store (exit 1 on a fault)",
    )
    sp.add_argument("volume")
    common(sp)
    sp.add_argument("--region", required=True, metavar="NAME")
    sp.add_argument(
        "--state-dir",
        metavar="DIR",
        help="use this state (read-only) instead of a fold to the head",
    )
    sp.add_argument(
        "--repair", action="store_true", help="copy missing or corrupt blocks from another region"
    )
    sp.add_argument("--quick", action="store_true", help="check existence only, do not read blocks")
    sp.add_argument(
        "--jobs", type=positive_int, default=8, metavar="N", help="parallel block checks"
    )
    sp.set_defaults(func=cmd_fsck)

    sp = sub.add_parser("gc", help="delete blocks no slice can need (a dry run unless --apply)")
    sp.add_argument("volume")
    common(sp)
    sp.add_argument("--apply", action="store_true", help="delete; without it gc only reports")
    sp.add_argument(
        "--grace",
        type=parse_duration,
        default=3600,
        metavar="DURATION",
        help="keep unreferenced blocks younger than this (writes in progress; default 1h)",
    )
    sp.add_argument(
        "--state-dir",
        action="append",
        type=_named_dir,
        metavar="NAME=DIR",
        help="a region's state, for its applied offset when it publishes no status (repeatable)",
    )
    sp.add_argument(
        "--show", type=non_negative_int, default=20, metavar="N", help="keys listed per region"
    )
    sp.set_defaults(func=cmd_gc)

    sp = sub.add_parser(
        "region",
        help="add a region to an existing volume, or remove one",
        description="tidefs region add VOLUME NAME=STORE_URL --journal URL | "
        "tidefs region remove VOLUME NAME --journal URL",
    )
    sp.add_argument("action", metavar="add|remove")
    sp.add_argument("volume", metavar="VOLUME")
    sp.add_argument("region", metavar="NAME=STORE_URL|NAME")
    common(sp)
    sp.set_defaults(func=cmd_region, region_parser=sp)

    sp = sub.add_parser(
        "upgrade",
        help="let the volume's writers use every schema version and feature this tidefs knows",
        description="tidefs upgrade VOLUME --journal URL: refused while a region that published "
        "its status runs a tidefs that does not know them (tidefs status), unless --force",
    )
    sp.add_argument("volume", metavar="VOLUME")
    common(sp)
    sp.add_argument(
        "--force",
        action="store_true",
        help="enable even though a region's tidefs does not know it (its fold will stop there)",
    )
    sp.set_defaults(func=cmd_upgrade)
