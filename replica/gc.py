"""Garbage collection: delete the blocks that no slice can need any more.

Blocks are immutable and never deleted by the commands that stop using them:
an overwrite, a truncate, an unlink or a compaction only changes which slices
the state lists. Keeping the blocks is what makes a restore possible (a
deleted tree comes back by re-committing its old slices, restore.py), and what
lets a region that lags behind still read what its state shows. gc deletes a
block only when all of these hold:

1. Retention. No state inside the retention window references its slice.
   The state at offset o lasted until record o + 1 was appended, so the states
   in the window ending now are those at offsets >= W - 1, where W is the first
   offset appended after `now - retention` (`restore.window_start`). restore
   accepts exactly those offsets, so it never meets a collected block.
2. Every region is past it. No region's state may still show the slice: the
   states at offsets >= the lowest applied offset of any region are protected
   too. Regions publish their applied offsets in the status log, and a
   region's figure is its live mount furthest behind
   (`tidefs.replica.status.lowest_live_offsets`); an operator can name a
   region's state directory instead. A region whose offset is unknown could be at offset -1, so then
   nothing is deleted at all (the plan says which region is missing). The
   regions are those of the volume at the head: a region removed by
   RemoveRegion no longer counts, and its store is left alone.
3. Grace. Blocks are uploaded before the command that records them is
   appended, so a block that no command references yet may belong to a write
   in progress. Only blocks older than the grace period (by the store's
   modification time) are deleted; after it, an unreferenced block is the
   remains of a write whose command never landed (a crashed writer, a rejected
   compaction).

Computing the protected set: with S = min(W - 1, lowest applied offset), every
slice referenced by any state at an offset in [S, head) is either live in the
state at S, or was recorded by a command after S (slices enter a state only
through CommitSlice and CompactChunk). So gc rebuilds the state at S (from the
newest snapshot at or below it, plus the log), takes its live slices, then
reads the commands from S + 1 to the head and adds every slice they name,
rejected or not. Any block in any region's store whose slice is outside that
set and which is older than the grace is garbage.

The plan is computed first and printed (a dry run by default); applying it
deletes the blocks in batches. Deleting an absent key is not an error, so an
interrupted gc is simply run again: it recomputes the plan from scratch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidefs.journal import codec
from tidefs.journal.commands import (
    AddRegion,
    CommitSlice,
    CompactChunk,
    EnableFeatures,
    RemoveRegion,
)
from tidefs.journal.features import LEGACY
from tidefs.journal.log import Log
from tidefs.replica.blocks import BLOCKS_PREFIX, parse_block_key
from tidefs.replica.fold import Reject, change_volume
from tidefs.replica.restore import window_start
from tidefs.replica.snapshot import rebuild_state, volume_from_log
from tidefs.replica.store import BlockStore, open_store

Report = Callable[[str, int, int], None]

DEFAULT_GRACE_S = 3600
"""Default age, in seconds, before an unreferenced block may be deleted."""

DELETE_BATCH = 1000
"""Keys per delete call (one S3 DeleteObjects request)."""


class GcError(Exception):
    """gc could not compute a safe plan."""


@dataclass(frozen=True, slots=True)
class Garbage:
    """One block that gc deletes (or would)."""

    region: str
    key: str
    size: int
    mtime_ns: int


@dataclass
class GcPlan:
    """What gc found: the protected range, the protected slices, and the garbage."""

    volume: str
    head: int
    window_start: int
    protect_from: int
    """S: every slice referenced by a state at an offset >= S is kept."""
    applied: dict[str, int]
    referenced: int = 0
    """Distinct slice ids protected."""
    listed: int = 0
    """Blocks listed in all the stores."""
    young: int = 0
    """Unreferenced blocks kept because they are younger than the grace."""
    garbage: list[Garbage] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    """Every region of the volume at the head, whether it published an offset or not."""
    blocked: str | None = None
    """Why nothing may be deleted at all, when that is so."""

    @property
    def bytes(self) -> int:
        """Stored bytes of the garbage."""
        return sum(g.size for g in self.garbage)

    def by_region(self) -> dict[str, list[Garbage]]:
        """The garbage grouped by region."""
        out: dict[str, list[Garbage]] = {}
        for g in self.garbage:
            out.setdefault(g.region, []).append(g)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs gc --json`."""
        return {
            "volume": self.volume,
            "head": self.head,
            "window_start": self.window_start,
            "protect_from": self.protect_from,
            "applied": self.applied,
            "regions": self.regions,
            "referenced_slices": self.referenced,
            "blocks_listed": self.listed,
            "young_kept": self.young,
            "blocked": self.blocked,
            "garbage_blocks": len(self.garbage),
            "garbage_bytes": self.bytes,
            "garbage": [
                {"region": g.region, "key": g.key, "size": g.size, "mtime_ns": g.mtime_ns}
                for g in self.garbage
            ],
        }


def plan_gc(
    log_: Log,
    stores: dict[str, BlockStore],
    *,
    volume: str,
    applied: Mapping[str, int],
    work_dir: str | os.PathLike[str],
    now_ns: int | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    mtime_cutoff_ns: int | None = None,
    progress: Report | None = None,
) -> GcPlan:
    """Compute what gc may delete now; see the module doc. Deletes nothing.

    `stores` maps region names to their stores; the store of a region added
    after the volume was created is opened and added to it (the caller closes
    them all). `applied` maps region names to
    their applied offsets. `now_ns` places the retention window (default: now);
    `mtime_cutoff_ns` (default: the wall clock minus `grace_s`) is the newest
    modification time a deleted block may have.
    """
    now = time.time_ns() if now_ns is None else now_ns
    cutoff = time.time_ns() - int(grace_s * 1e9) if mtime_cutoff_ns is None else mtime_cutoff_ns
    info = volume_from_log(log_, stores.values())
    head = log_.head()
    first_in_window = window_start(log_, info.retention_s, now)
    plan = GcPlan(volume, head, first_in_window, -1, dict(applied))
    # The regions of the volume at the head decide, and only the log's tail says
    # which those are (AddRegion, RemoveRegion): a region missing from `applied`
    # blocks the plan after the scan, not here; the primary is never removed.
    if info.primary not in applied:
        plan.blocked = _unknown([info.primary])
        plan.regions = [r.name for r in info.regions]
        return plan
    lowest = min((applied[r.name] for r in info.regions if r.name in applied), default=-1)
    start = min(first_in_window - 1, lowest, head - 1)
    plan.protect_from = start
    referenced: set[int] = set()
    vol, enabled = info, LEGACY
    if start >= 0:
        state = rebuild_state(
            log_,
            Path(work_dir) / "state",
            stores=stores,
            volume=volume,
            to_offset=start,
            progress=progress,
        )
        try:
            at_start = state.volume()
            assert at_start is not None
            vol, enabled = at_start, state.features()
            referenced.update(ref.slice_id for _i, _c, ref in state.iter_live_slices())
        finally:
            state.close()
    if log_.start() > start + 1:
        # Slices named by the trimmed records would go unprotected: never guess.
        raise GcError(
            f"the log of {volume} starts at offset {log_.start()}, after {start + 1}, the first "
            "record gc must read: a region lags behind the trimmed log, or the log was trimmed "
            "above the retention window's snapshot"
        )
    offset = start + 1
    while offset < head:
        records = log_.read(offset, max_records=1000, timeout=1.0)
        records = [r for r in records if r.offset < head]
        if not records:
            raise GcError(f"the log of {volume} ended at offset {offset}, before its head {head}")
        for rec in records:
            command = codec.decode(rec.payload).command
            if isinstance(command, CommitSlice | CompactChunk):
                referenced.add(command.slice.slice_id)
            elif isinstance(command, AddRegion | RemoveRegion | EnableFeatures):
                # By the fold's own rules: a refused command changes nothing.
                with contextlib.suppress(Reject):
                    vol, enabled = change_volume(vol, enabled, command)
        offset = records[-1].offset + 1
        if progress is not None:
            progress("records scanned", offset - start - 1, head - start - 1)
    plan.referenced = len(referenced)
    urls = {r.name: r.store_url for r in vol.regions}
    regions = set(urls)
    plan.regions = sorted(regions)
    unknown = sorted(r for r in regions if r not in applied)
    if unknown:
        plan.blocked = _unknown(unknown)
        return plan
    for region in sorted(regions):
        if region not in stores:
            stores[region] = open_store(urls[region])
    for region in sorted(regions):
        store = stores[region]
        for key in store.list(BLOCKS_PREFIX):
            try:
                slice_id, _index = parse_block_key(key)
            except ValueError:
                continue  # not a block: never touched
            plan.listed += 1
            if progress is not None and plan.listed % 1000 == 0:
                progress("blocks listed", plan.listed, plan.listed)
            if slice_id in referenced:
                continue
            st = store.stat(key)
            if st is None:
                continue
            if st.mtime_ns > cutoff:
                plan.young += 1
                continue
            plan.garbage.append(Garbage(region, key, st.size, st.mtime_ns))
    return plan


def _unknown(regions: list[str]) -> str:
    return (
        f"region(s) {', '.join(regions)} published no applied offset: such a region may still "
        "need any block, so nothing can be deleted (start its mount, name its state "
        "directory with --state-dir NAME=DIR, or remove the region: tidefs region remove)"
    )


def apply_gc(
    stores: Mapping[str, BlockStore], plan: GcPlan, *, progress: Report | None = None
) -> int:
    """Delete the plan's garbage, in batches; return the number of blocks deleted."""
    if plan.blocked is not None:
        return 0
    total = len(plan.garbage)
    done = 0
    for region, garbage in sorted(plan.by_region().items()):
        store = stores[region]
        for start in range(0, len(garbage), DELETE_BATCH):
            batch = garbage[start : start + DELETE_BATCH]
            store.delete_many(g.key for g in batch)
            done += len(batch)
            if progress is not None:
                progress("blocks deleted", done, total)
    return done
