"""Verify and fsck: proving that the regions agree, and that their blocks are there.

verify. Two regions that applied the same offset hold byte-identical states
(invariant 2), and each state carries a digest, an order-independent hash of
every live key and value kept current by the fold. So agreement is checked by
bringing private copies of the regions' states to one common offset, the
highest any of them has applied, and comparing digests: equal digests prove
equal states (with overwhelming probability), and a difference is a bug or
damage that would otherwise stay silent until a user read different bytes in
two regions. On a mismatch, the key sets are merged in key order and the first
differing keys are reported, decoded (inode 42's attributes, the entry
"x.csv" of directory 7, ...), because "the digests differ" alone tells an
operator nothing about where to look. With `deep`, each digest is also
recomputed from every key, which catches a stored digest that drifted from the
keys it summarises.

The states compared are copies (`snapshot.copy_state`): a region's own
directory is never written, and a running mount keeps its lock. A replay of
the log itself can join the comparison as a reference region named "log".

From the journal alone. Regions far apart have no shared disk, so each one
publishes its digest with the offset it belongs to in every status report
(`status.digest_fields`). `verify_reports` replays the log once into a private
state, from the newest snapshot at or below the lowest reported offset, and
stops at every reported offset to compare: a region whose newest report
disagrees has diverged, and its older reports bracket when (the newest that
agreed, the oldest that did not). The differing keys need the region's state,
which only its machine has: there, `--state-dir` names it.

fsck. Metadata that agrees is not enough: every block that a live slice
shows must exist in the stores with the bytes it was sealed with. fsck walks
every live slice of a state at the head, derives the blocks each one needs
(`blocks_needed`: a slice cut by a truncate needs only the blocks it still
covers) and reads each from one region's store, verifying its checksum (or,
with `quick`, only checks that it exists). A block that is absent from a
mirror but present in its home region is replication backlog, counted but not
a fault. A missing or corrupt block is a fault; with `repair` it is copied
from another region that holds a verified copy (the fetcher reads only
verified bytes), written back, and read again to prove the repair.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tidefs.journal.commands import SliceRef
from tidefs.journal.log import Log
from tidefs.replica import keys as K
from tidefs.replica.blocks import BLOCKS_PREFIX, block_key
from tidefs.replica.fetch import BlockFetcher, blocks_needed
from tidefs.replica.replica import fold_range
from tidefs.replica.state import State
from tidefs.replica.store import BlockNotFound, BlockStore, CorruptBlockError, StoreError

Report = Callable[[str, int, int], None]

REFERENCE = "log"
"""The name under which a replay of the log joins a verify as a reference region."""

_BATCH = 1024
_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
}


class VerifyError(Exception):
    """A verify or fsck could not be carried out (not: found a difference)."""


# -- verify ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionDigest:
    """One region's state as compared: where it was, where it was folded to, its digest."""

    region: str
    applied: int
    offset: int
    digest: str
    recomputed: str | None = None

    @property
    def consistent(self) -> bool:
        """Whether the recomputed digest (if any) matches the stored one."""
        return self.recomputed is None or self.recomputed == self.digest


@dataclass(frozen=True, slots=True)
class KeyDiff:
    """One key whose value differs between two regions (None: absent there)."""

    key: str
    what: str
    values: dict[str, str | None]


@dataclass
class VerifyResult:
    """The outcome of one verify: equal when every digest matches (and recomputes)."""

    offset: int
    regions: list[RegionDigest]
    diffs: list[KeyDiff] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """Whether all regions agree and every digest is consistent with its keys."""
        digests = {r.digest for r in self.regions}
        return len(digests) <= 1 and all(r.consistent for r in self.regions)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs verify --json`."""
        return {
            "equal": self.equal,
            "offset": self.offset,
            "regions": [
                {
                    "region": r.region,
                    "applied": r.applied,
                    "offset": r.offset,
                    "digest": r.digest,
                    "recomputed": r.recomputed,
                }
                for r in self.regions
            ],
            "diffs": [{"key": d.key, "what": d.what, "values": d.values} for d in self.diffs],
        }


def compare_states(
    states: Mapping[str, State],
    log_: Log,
    *,
    offset: int | None = None,
    deep: bool = False,
    max_diffs: int = 10,
    progress: Report | None = None,
) -> VerifyResult:
    """Fold every (writable, private) state to one offset and compare their digests.

    The common offset is `offset`, or the highest offset any state has
    applied; a state already past `offset` cannot be compared there (a fold
    never goes back) and raises VerifyError.
    """
    if not states:
        raise VerifyError("nothing to compare")
    applied = {name: s.applied_offset() for name, s in states.items()}
    target = max(applied.values()) if offset is None else offset
    late = sorted(name for name, a in applied.items() if a > target)
    if late:
        raise VerifyError(f"region(s) {', '.join(late)} already applied past offset {target}")
    for name, state in states.items():
        start = state.applied_offset()

        def report(now: int, goal: int, name: str = name, start: int = start) -> None:
            if progress is not None:
                progress(f"records folded ({name})", now - start, goal - start)

        fold_range(log_, state, to_offset=target, progress=report)
        if state.applied_offset() != target:
            raise VerifyError(
                f"region {name} stopped at offset {state.applied_offset()}, before {target}"
            )
    result = VerifyResult(target, [])
    for name, state in states.items():
        recomputed = state.recompute_digest().hex() if deep else None
        result.regions.append(
            RegionDigest(name, applied[name], target, state.digest_hex(), recomputed)
        )
    if not result.equal:
        result.diffs = _diffs(states, result.regions, max_diffs)
    return result


# -- verify from the journal alone ------------------------------------------------

MAX_REPORTS = 64
"""How many of a region's newest reported (offset, digest) pairs a journal verify checks."""

OK = "ok"
"""The region's newest checked report agrees with the replay."""
DIVERGED = "diverged"
"""The region's newest checked report disagrees with the replay (or names an offset past the head)."""
UNCHECKED = "unchecked"
"""None of the region's reports could be compared (older than the log's start)."""


@dataclass
class ReportedRegion:
    """One region's reported digests checked against a replay of the log.

    `status` is DIVERGED when the region's newest checked report disagrees
    with the replay: `first_bad` is then the oldest disagreeing report after
    `last_good`, the newest agreeing one (None: no older report agreed), so
    the damage happened in (last_good, first_bad]. Older disagreements that a
    later agreeing report followed (a state since rebuilt) are listed in
    `earlier_mismatches` without making the region diverged. UNCHECKED: none
    of its reports could be reached by the replay (`detail` says why).
    """

    region: str
    offset: int
    digest: str
    replay_digest: str | None = None
    status: str = UNCHECKED
    checked: int = 0
    last_good: int | None = None
    first_bad: int | None = None
    earlier_mismatches: list[int] = field(default_factory=list)
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of one region in `tidefs verify --json` without `--state-dir`."""
        return {
            "region": self.region,
            "offset": self.offset,
            "digest": self.digest,
            "replay_digest": self.replay_digest,
            "status": self.status,
            "checked": self.checked,
            "last_good": self.last_good,
            "first_bad": self.first_bad,
            "earlier_mismatches": self.earlier_mismatches,
            "detail": self.detail,
        }


@dataclass
class JournalVerifyResult:
    """The outcome of a verify from the status log: equal when no region diverged."""

    replay_start: int
    regions: list[ReportedRegion]

    @property
    def equal(self) -> bool:
        """Whether no region's newest checked report disagrees with the replay."""
        return all(r.status != DIVERGED for r in self.regions)

    @property
    def offset(self) -> int:
        """The highest offset at which some region was compared (-1: none)."""
        return max((r.offset for r in self.regions if r.status != UNCHECKED), default=-1)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs verify --json` without `--state-dir`."""
        return {
            "equal": self.equal,
            "source": "status",
            "offset": self.offset,
            "replay_start": self.replay_start,
            "regions": [r.as_dict() for r in self.regions],
        }


def reported_offsets(
    reports: Mapping[str, list[tuple[int, str]]], *, log_start: int, limit: int = MAX_REPORTS
) -> dict[str, list[tuple[int, str]]]:
    """Keep each region's newest `limit` pairs that a replay of a log starting at `log_start` reaches.

    A fold from offset o needs the records after o, so a pair below
    `log_start - 1` cannot be replayed (a snapshot exactly there aside, which
    is not worth a search).
    """
    floor = log_start - 1 if log_start > 0 else -1
    return {
        region: [p for p in pairs if p[0] >= floor][-limit:] for region, pairs in reports.items()
    }


def verify_reports(
    reports: Mapping[str, list[tuple[int, str]]],
    log_: Log,
    replay: Callable[[int], State],
    *,
    regions: Iterable[str] = (),
    progress: Report | None = None,
) -> JournalVerifyResult:
    """Check every region's reported (offset, digest) pairs against one replay of the log.

    `reports` maps each region to its pairs in ascending offset order (as
    `status.read_digests` returns them). `replay(offset)` returns a private,
    writable State folded to `offset` (from the newest snapshot at or below it);
    it is called once, with the lowest reported offset that the log still
    holds, and the state is then folded forward once, stopping at each
    reported offset to read the digest. Raises VerifyError when no region
    reported a digest. A region of `regions` (the volume's) that reported
    nothing is listed as not checked, so that none goes unnoticed.
    """
    if not any(reports.values()):
        raise VerifyError("no region has published a digest to the status log")
    kept = reported_offsets(reports, log_start=log_.start())
    out: dict[str, ReportedRegion] = {}
    for region, pairs in sorted(reports.items()):
        if not pairs:
            continue
        newest = pairs[-1]
        out[region] = ReportedRegion(region, newest[0], newest[1])
        if not kept.get(region):
            out[
                region
            ].detail = f"its reports (newest at offset {newest[0]}) are older than the log's start"
    offsets = sorted({o for pairs in kept.values() for o, _d in pairs})
    replayed: dict[int, str | None] = {}
    start = -1
    if offsets:
        state = replay(offsets[0])
        try:
            start = state.applied_offset()
            goal = offsets[-1]
            for o in offsets:
                if o < start:
                    continue

                def report(now: int, _t: int, base: int = start, goal: int = goal) -> None:
                    if progress is not None:
                        progress("records folded", now - base, goal - base)

                fold_range(log_, state, to_offset=o, progress=report)
                applied, digest = state.applied_and_digest()
                replayed[o] = digest.hex() if applied == o else None
        finally:
            state.close()
    for region, pairs in kept.items():
        r = out[region]
        checked = [(o, d) for o, d in pairs if o in replayed]
        if not checked:
            if pairs:
                r.detail = "the replay could not reach its reports"
            continue
        r.checked = len(checked)
        newest_o, newest_d = checked[-1]
        r.offset, r.digest, r.replay_digest = newest_o, newest_d, replayed[newest_o]
        agrees = [replayed[o] == d for o, d in checked]
        if agrees[-1]:
            r.status = OK
            r.earlier_mismatches = [o for (o, _d), a in zip(checked, agrees, strict=True) if not a]
            continue
        r.status = DIVERGED
        good = [i for i, a in enumerate(agrees) if a]
        first_bad_i = good[-1] + 1 if good else 0
        r.last_good = checked[good[-1]][0] if good else None
        r.first_bad = checked[first_bad_i][0]
        r.earlier_mismatches = [
            o
            for (o, _d), a in zip(checked[:first_bad_i], agrees[:first_bad_i], strict=True)
            if not a
        ]
        if replayed[newest_o] is None:
            r.detail = f"it reported offset {newest_o}, past the log's head"
    for region in regions:
        if region not in out:
            out[region] = ReportedRegion(
                region,
                -1,
                "",
                detail="it never published a digest to the status log (is it running? "
                "a region that is gone: tidefs region remove)",
            )
    return JournalVerifyResult(start, [out[name] for name in sorted(out)])


def _diffs(states: Mapping[str, State], digests: list[RegionDigest], limit: int) -> list[KeyDiff]:
    """Diff each region whose digest differs from the most common one against that majority."""
    counts: dict[str, int] = {}
    for r in digests:
        counts[r.digest] = counts.get(r.digest, 0) + 1
    majority = max(counts, key=lambda d: (counts[d], d == digests[0].digest))
    ref = next(r.region for r in digests if r.digest == majority)
    out: list[KeyDiff] = []
    for r in digests:
        if r.region == ref or (r.digest == majority and r.consistent):
            continue
        for key, a, b in diff_states(states[ref], states[r.region], limit - len(out)):
            out.append(
                KeyDiff(
                    key.hex(),
                    describe_key(key),
                    {ref: describe_value(key, a), r.region: describe_value(key, b)},
                )
            )
        if len(out) >= limit:
            break
    return out


def diff_states(
    a: State, b: State, limit: int = 10
) -> Iterator[tuple[bytes, bytes | None, bytes | None]]:
    """Yield up to `limit` (key, value in a, value in b) where the live keys differ, in key order."""
    left, right = a.dump(), b.dump()
    x, y = next(left, None), next(right, None)
    found = 0
    while found < limit and (x is not None or y is not None):
        if y is None or (x is not None and x[0] < y[0]):
            assert x is not None
            yield x[0], x[1], None
            found += 1
            x = next(left, None)
        elif x is None or y[0] < x[0]:
            yield y[0], None, y[1]
            found += 1
            y = next(right, None)
        else:
            if x[1] != y[1]:
                yield x[0], x[1], y[1]
                found += 1
            x, y = next(left, None), next(right, None)


def describe_key(key: bytes) -> str:
    """Return a key of the state in words: which record of which inode it is."""
    tag = key[:1]
    try:
        if tag == K.TAG_VOLUME:
            return "the volume record"
        if tag == K.TAG_FEATURES:
            return "the volume's enabled schema version and features"
        if tag == K.TAG_INODE:
            return f"attributes of inode {K.key_inode(key)}"
        if tag == K.TAG_SYMLINK:
            return f"symlink target of inode {K.key_inode(key)}"
        if tag == K.TAG_PARENT:
            return f"parent of directory {K.key_inode(key)}"
        if tag == K.TAG_DIRENT:
            parent, _cookie, name = K.split_dirent_key(key)
            return f"entry {os.fsdecode(name)!r} of directory {parent}"
        if tag == K.TAG_CHUNK:
            ino, index = K.split_chunk_key(key)
            return f"slice of chunk {index} of inode {ino} placed at offset {K.slice_sequence(key)}"
        if tag == K.TAG_XATTR:
            return f"xattr {os.fsdecode(key[9:])!r} of inode {K.key_inode(key)}"
        if tag == K.TAG_ORPHAN:
            return f"orphan mark of inode {K.key_inode(key)}"
        if tag == K.TAG_OUTCOME:
            return f"outcome of request {key[9:].hex()} (generation {K.read_u64(key, 1)})"
    except Exception:  # a malformed key is itself the finding
        return f"malformed key {key.hex()}"
    return f"unknown key {key.hex()}"


def describe_value(key: bytes, value: bytes | None) -> str | None:
    """Return a value of the state in words (None stays None: the key is absent)."""
    if value is None:
        return None
    tag = key[:1]
    try:
        if tag == K.TAG_INODE:
            a = K.decode_attr(K.key_inode(key), value)
            return (
                f"mode {a.mode:o} uid {a.uid} gid {a.gid} nlink {a.nlink} size {a.size} "
                f"mtime {a.mtime_ns} ctime {a.ctime_ns}"
            )
        if tag == K.TAG_DIRENT:
            child, kind = K.decode_dirent(value)
            return f"inode {child} ({_KINDS.get(kind, f'type {kind:o}')})"
        if tag == K.TAG_CHUNK:
            return ", ".join(
                f"{s.slice_id:016x}@{s.offset}+{s.length}" + (f" skip {s.skip}" if s.skip else "")
                for s in K.decode_slices(value)
            )
        if tag == K.TAG_OUTCOME:
            o = K.decode_outcome(value)
            return f"errno {o.errno} inode {o.inode} offset {o.offset}"
        if tag in (K.TAG_PARENT,):
            return f"inode {K.read_u64(value)}"
    except Exception:
        pass
    text = value[:48].hex()
    return f"{len(value)} bytes {text}{'...' if len(value) > 48 else ''}"


# -- fsck --------------------------------------------------------------------------

MISSING = "missing"
"""The region's store lacks a block that it should hold (its home copy, or one no region has)."""
CORRUPT = "corrupt"
"""The region's copy of a block fails verification."""
UNREPLICATED = "unreplicated"
"""Absent from a mirror, present at home: replication backlog, not a fault."""


@dataclass
class BlockProblem:
    """One block of a live slice that the region's store does not hold intact."""

    key: str
    slice_id: int
    index: int
    home: str
    kind: str
    detail: str = ""
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "slice_id": f"{self.slice_id:016x}",
            "index": self.index,
            "home": self.home,
            "kind": self.kind,
            "detail": self.detail,
            "repaired": self.repaired,
        }


@dataclass
class FsckResult:
    """What fsck found in one region's store; `ok` when no fault is left unrepaired."""

    region: str
    offset: int
    slices: int = 0
    blocks: int = 0
    problems: list[BlockProblem] = field(default_factory=list)

    @property
    def faults(self) -> list[BlockProblem]:
        """Missing and corrupt blocks, repaired or not (replication backlog excluded)."""
        return [p for p in self.problems if p.kind != UNREPLICATED]

    @property
    def ok(self) -> bool:
        """Whether every fault found was repaired."""
        return all(p.repaired for p in self.faults)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs fsck --json`."""
        faults = self.faults
        return {
            "ok": self.ok,
            "region": self.region,
            "offset": self.offset,
            "slices": self.slices,
            "blocks": self.blocks,
            "missing": sum(p.kind == MISSING for p in faults),
            "corrupt": sum(p.kind == CORRUPT for p in faults),
            "unreplicated": sum(p.kind == UNREPLICATED for p in self.problems),
            "repaired": sum(p.repaired for p in self.problems),
            "problems": [p.as_dict() for p in self.problems],
        }


def live_blocks(state: State) -> tuple[int, list[tuple[SliceRef, int]]]:
    """Return (number of distinct live slices, every (slice, block index) they need), sorted.

    A slice id may be live in several places (a restore re-commits old
    slices, possibly with another cut): it needs the most blocks any of them shows.
    """
    widest: dict[int, SliceRef] = {}
    for _ino, _chunk, ref in state.iter_live_slices():
        seen = widest.get(ref.slice_id)
        if seen is None or blocks_needed(ref) > blocks_needed(seen):
            widest[ref.slice_id] = ref
    items = [(ref, i) for _sid, ref in sorted(widest.items()) for i in range(blocks_needed(ref))]
    return len(widest), items


def sole_copies(
    state: State, region: str, stores: Mapping[str, BlockStore]
) -> tuple[list[str], str | None]:
    """Return the live blocks whose only copy may be in `region`'s store, sorted.

    A live block held by another region's store in `stores` is safe. Of the
    others, those `region`'s store holds are returned; when its store cannot
    be listed, every one of them is (with the reason as the second value),
    since nothing proves they are not there. A block no store holds at all
    is lost already and not counted.
    """
    _slices, items = live_blocks(state)
    if not items:
        return [], None
    elsewhere: set[str] = set()
    for name, store in stores.items():
        if name != region:
            elsewhere.update(store.list(BLOCKS_PREFIX))
    needed = sorted(
        {key for ref, i in items if (key := block_key(ref.slice_id, i)) not in elsewhere}
    )
    if not needed:
        return [], None
    try:
        there = set(stores[region].list(BLOCKS_PREFIX))
    except Exception as exc:  # unreachable, or never created: it cannot vouch for anything
        return needed, f"its store cannot be listed: {exc}"
    return [key for key in needed if key in there], None


def fsck(
    state: State,
    region: str,
    stores: Mapping[str, BlockStore],
    *,
    repair: bool = False,
    quick: bool = False,
    jobs: int = 8,
    timeout: float = 30.0,
    progress: Report | None = None,
) -> FsckResult:
    """Check every block of every live slice of `state` in `region`'s store; see the module doc.

    With `repair`, missing, corrupt and not yet replicated blocks are copied
    from another region holding a verified copy, and read back. Raises
    VerifyError when the region's store is unknown; store outages raise
    StoreError (fsck cannot conclude anything about a store it cannot read).
    """
    local = stores.get(region)
    if local is None:
        raise VerifyError(f"no block store for region {region!r}")
    nslices, items = live_blocks(state)
    result = FsckResult(region, state.applied_offset(), nslices, len(items))
    fetcher = BlockFetcher(region, stores, timeout=timeout, write_back=False)

    def check(item: tuple[SliceRef, int]) -> BlockProblem | None:
        ref, index = item
        key = block_key(ref.slice_id, index)
        problem: BlockProblem | None = None
        try:
            if quick:
                if not local.exists(key):
                    raise BlockNotFound(key)
            else:
                local.get_block(key)
        except BlockNotFound:
            kind = MISSING
            if ref.home != region:
                home = stores.get(ref.home)
                if home is not None and home.exists(key):
                    kind = UNREPLICATED
            problem = BlockProblem(key, ref.slice_id, index, ref.home, kind)
        except CorruptBlockError as exc:
            problem = BlockProblem(key, ref.slice_id, index, ref.home, CORRUPT, exc.reason)
        if problem is not None and repair:
            _repair(fetcher, local, ref, index, problem)
        return problem

    try:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="tidefs-fsck") as pool:
            for start in range(0, len(items), _BATCH):
                for problem in pool.map(check, items[start : start + _BATCH]):
                    if problem is not None:
                        result.problems.append(problem)
                if progress is not None:
                    progress("blocks checked", min(start + _BATCH, len(items)), len(items))
    finally:
        fetcher.close()
    return result


def _repair(
    fetcher: BlockFetcher, local: BlockStore, ref: SliceRef, index: int, problem: BlockProblem
) -> None:
    """Copy a verified copy of the block from another region into `local`, and read it back."""
    try:
        fetched = fetcher.fetch_remote(ref, index)
    except StoreError as exc:
        problem.detail = (problem.detail + "; " if problem.detail else "") + f"no repair: {exc}"
        return
    local.put_block(problem.key, fetched.payload)
    try:
        ok = local.get_block(problem.key) == fetched.payload
    except StoreError as exc:
        problem.detail += f"; the repaired copy does not read back: {exc}"
        return
    if ok:
        problem.repaired = True
        problem.detail = (problem.detail + "; " if problem.detail else "") + (
            f"copied from {fetched.region}"
        )
