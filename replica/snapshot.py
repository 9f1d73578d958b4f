"""Snapshots: a state at one offset, kept in a block store, for a fold to start from.

Replaying a volume's log from offset 0 rebuilds any region's state (invariant 1),
but the cost grows with the log, and a Kafka topic cannot keep every record
forever. A snapshot is a RocksDB checkpoint of a state at some offset, uploaded
to a region's block store beside the blocks. The fold is deterministic and reads
nothing region-local (invariant 2), so the state at an offset is the same in
every region: a snapshot made from any region's state is a valid start for
every region, and a new region begins with the newest one and folds the rest
of the log.

Layout in a store (the keys share the store with `blocks/`):

    snapshots/<offset:020d>-<digest hex>/files/<file name>/<part:05d>
    snapshots/<offset:020d>-<digest hex>/manifest.json

The manifest is written LAST, after every part: a snapshot without one is an
upload in progress or one that was interrupted, and no reader ever uses it. It
lists each file with its size and SHA-256, and the state's offset, digest and
volume record. A download is therefore checked twice, each file against its
checksum and then the opened state against the offset and digest it claims; a
snapshot that fails either check is skipped in favour of an older one (or of
the log itself), never used.

Offsets are zero-padded so that a listing returns snapshots oldest first; the
digest in the name keeps two different states at one offset (a fold bug) from
overwriting each other, and makes a second upload of the same state a no-op.
Files are cut into parts of `PART_SIZE` so that neither upload nor download
holds a whole table file in memory.

This module also holds the two ways every operations tool gets a state of its
own without touching a region's: `rebuild_state` (newest snapshot plus the
log) and `copy_state` (a lock-free copy of a state directory that a mount may
be writing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rocksdict import AccessType, Options, Rdict, WriteBatch

from tidefs import private
from tidefs.journal import codec
from tidefs.journal.commands import CreateVolume, Region
from tidefs.journal.log import Log, redact_url
from tidefs.replica.keys import VolumeInfo
from tidefs.replica.replica import fold_range
from tidefs.replica.state import LOCK_FILE, State, StateError
from tidefs.replica.store import BlockNotFound, BlockStore, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

SNAPSHOTS_PREFIX = "snapshots/"
"""Every snapshot key starts with this; gc never looks here, prune never looks elsewhere."""

MANIFEST_NAME = "manifest.json"
"""The object that makes a snapshot usable; written after every file part."""

PART_SIZE = 64 << 20
"""Largest object one snapshot file is cut into, in bytes."""

FORMAT_VERSION = 1
"""Version of the manifest; a reader skips snapshots of a version it does not know."""

INCOMPLETE_GRACE_S = 3600
"""Age after which `prune_snapshots` removes a snapshot that never got its manifest.

An upload in progress writes a part at least every few seconds, so an hour of
silence means the uploader died; a younger incomplete snapshot may still finish.
"""

_SKIPPED_FILES = frozenset({"LOCK", LOCK_FILE})
_COPY_BATCH = 10_000

Report = Callable[[str, int, int], None]
"""Progress callback of long operations: (what, done, total); a new `what` starts a new phase."""


class SnapshotError(Exception):
    """A snapshot could not be made, found, verified or used."""


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """One file of a checkpoint: its name, size, SHA-256 (hex) and number of parts."""

    name: str
    size: int
    sha256: str
    parts: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A usable snapshot: the manifest of a state at `offset` with digest `digest` (hex)."""

    volume: VolumeInfo
    offset: int
    digest: str
    created_ns: int
    files: tuple[SnapshotFile, ...]

    @property
    def id(self) -> str:
        """The snapshot's name in the store: `<offset:020d>-<digest>`."""
        return snapshot_id(self.offset, self.digest)

    @property
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs snapshot list --json` for one snapshot."""
        return {
            "id": self.id,
            "volume": self.volume.name,
            "offset": self.offset,
            "digest": self.digest,
            "created_ns": self.created_ns,
            "files": len(self.files),
            "bytes": self.size,
        }

    def manifest(self) -> bytes:
        """Return the manifest object's bytes."""
        v = self.volume
        doc = {
            "format": FORMAT_VERSION,
            "volume": {
                "name": v.name,
                "regions": [{"name": r.name, "store_url": r.store_url} for r in v.regions],
                "primary": v.primary,
                "chunk_size": v.chunk_size,
                "block_size": v.block_size,
                "retention_s": v.retention_s,
            },
            "offset": self.offset,
            "digest": self.digest,
            "created_ns": self.created_ns,
            "files": [
                {"name": f.name, "size": f.size, "sha256": f.sha256, "parts": f.parts}
                for f in self.files
            ],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Snapshot:
        """Decode a manifest; raise SnapshotError for anything malformed or of another format."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT_VERSION:
                raise SnapshotError(f"unknown snapshot format {doc.get('format')!r}")
            v = doc["volume"]
            volume = VolumeInfo(
                name=str(v["name"]),
                regions=tuple(Region(str(r["name"]), str(r["store_url"])) for r in v["regions"]),
                primary=str(v["primary"]),
                chunk_size=int(v["chunk_size"]),
                block_size=int(v["block_size"]),
                retention_s=int(v["retention_s"]),
            )
            files = tuple(
                SnapshotFile(str(f["name"]), int(f["size"]), str(f["sha256"]), int(f["parts"]))
                for f in doc["files"]
            )
            snap = cls(
                volume, int(doc["offset"]), str(doc["digest"]), int(doc["created_ns"]), files
            )
        except SnapshotError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"malformed snapshot manifest: {exc!r}") from exc
        for f in files:
            # Names become paths on download: a manifest must never write outside its directory.
            if not _plain_name(f.name) or f.parts < 1 or f.size < 0:
                raise SnapshotError(f"malformed snapshot manifest: bad file entry {f}")
        return snap


def snapshot_id(offset: int, digest: str) -> str:
    """Return the store name of the snapshot of the state at `offset` with `digest` (hex)."""
    return f"{offset:020d}-{digest}"


def manifest_key(sid: str) -> str:
    """Return the key of snapshot `sid`'s manifest."""
    return f"{SNAPSHOTS_PREFIX}{sid}/{MANIFEST_NAME}"


def part_key(sid: str, name: str, part: int) -> str:
    """Return the key of part `part` of file `name` of snapshot `sid`."""
    return f"{SNAPSHOTS_PREFIX}{sid}/files/{name}/{part:05d}"


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


def _split_key(key: str) -> tuple[str, str] | None:
    """Return (snapshot id, rest) of a key under SNAPSHOTS_PREFIX."""
    if not key.startswith(SNAPSHOTS_PREFIX):
        return None
    sid, sep, rest = key[len(SNAPSHOTS_PREFIX) :].partition("/")
    return (sid, rest) if sep and sid else None


# -- listing -------------------------------------------------------------------


def read_snapshot(store: BlockStore, sid: str) -> Snapshot | None:
    """Return the snapshot `sid` if its manifest is present and sound, else None."""
    try:
        raw = store.get(manifest_key(sid))
    except BlockNotFound:
        return None
    try:
        snap = Snapshot.parse(raw)
    except SnapshotError as exc:
        log.warning("skipping snapshot %s in %s: %s", sid, redact_url(store.url), exc)
        return None
    if snap.id != sid:
        log.warning(
            "skipping snapshot %s in %s: its manifest names %s", sid, redact_url(store.url), snap.id
        )
        return None
    return snap


def _ids(store: BlockStore) -> tuple[list[str], set[str]]:
    """Return (every snapshot id with any object, the ids that have a manifest)."""
    seen: dict[str, None] = {}
    complete: set[str] = set()
    for key in store.list(SNAPSHOTS_PREFIX):
        split = _split_key(key)
        if split is None:
            continue
        sid, rest = split
        seen.setdefault(sid)
        if rest == MANIFEST_NAME:
            complete.add(sid)
    return list(seen), complete


def list_snapshots(store: BlockStore, *, volume: str | None = None) -> list[Snapshot]:
    """Return the usable snapshots in `store` (of `volume`, when given), oldest first."""
    _all, complete = _ids(store)
    out: list[Snapshot] = []
    for sid in sorted(complete):
        snap = read_snapshot(store, sid)
        if snap is not None and (volume is None or snap.volume.name == volume):
            out.append(snap)
    out.sort(key=lambda s: (s.offset, s.digest))
    return out


def list_incomplete(store: BlockStore) -> list[str]:
    """Return the ids of snapshots with objects but no manifest (uploads in progress or dead)."""
    every, complete = _ids(store)
    return sorted(sid for sid in every if sid not in complete)


# -- making and removing -------------------------------------------------------


def upload_snapshot(
    store: BlockStore,
    checkpoint_dir: str | os.PathLike[str],
    *,
    volume: VolumeInfo,
    offset: int,
    digest: str,
    progress: Report | None = None,
) -> tuple[Snapshot, bool]:
    """Upload the checkpoint in `checkpoint_dir` as a snapshot; return it and whether it is new.

    A snapshot of the same offset and digest that is already complete is kept as
    it is (the states are equal). Otherwise every part is (re)written and the
    manifest goes last, so an upload killed at any point leaves no usable
    snapshot and a rerun simply writes it again.
    """
    sid = snapshot_id(offset, digest)
    existing = read_snapshot(store, sid)
    if existing is not None:
        return existing, False
    root = Path(checkpoint_dir)
    paths = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.name not in _SKIPPED_FILES and not p.name.startswith("LOG")
    )
    total = sum(p.stat().st_size for p in paths)
    done = 0
    files: list[SnapshotFile] = []
    for path in paths:
        if not _plain_name(path.name):
            raise SnapshotError(f"unexpected file {path.name!r} in the checkpoint")
        h = hashlib.sha256()
        parts = size = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(PART_SIZE)
                if not data and parts:
                    break
                store.put(part_key(sid, path.name, parts), data)
                h.update(data)
                parts += 1
                size += len(data)
                done += len(data)
                if progress is not None:
                    progress("bytes uploaded", done, total)
                if len(data) < PART_SIZE:
                    break
        files.append(SnapshotFile(path.name, size, h.hexdigest(), parts))
    snap = Snapshot(volume, offset, digest, time.time_ns(), tuple(files))
    store.put(manifest_key(sid), snap.manifest())
    return snap, True


def delete_snapshot(store: BlockStore, sid: str) -> int:
    """Delete snapshot `sid`: the manifest first, so that it is unusable at once; return objects removed.

    Killed midway, it leaves an incomplete snapshot that no reader uses and a
    later prune removes.
    """
    store.delete(manifest_key(sid))
    keys = list(store.list(f"{SNAPSHOTS_PREFIX}{sid}/"))
    store.delete_many(keys)
    return len(keys) + 1


def prune_snapshots(
    store: BlockStore,
    keep: int,
    *,
    volume: str | None = None,
    incomplete_grace_s: float = INCOMPLETE_GRACE_S,
    now_ns: int | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete all but the `keep` newest snapshots, and incomplete ones older than the grace.

    Returns the ids deleted (or that would be, with `dry_run`). At least one
    snapshot is always kept: it is what a new region and a trimmed log rely on.
    """
    if keep < 1:
        raise SnapshotError("prune keeps at least one snapshot")
    now = time.time_ns() if now_ns is None else now_ns
    doomed = [s.id for s in list_snapshots(store, volume=volume)[:-keep]]
    for sid in list_incomplete(store):
        stats = [store.stat(k) for k in store.list(f"{SNAPSHOTS_PREFIX}{sid}/")]
        newest = max((s.mtime_ns for s in stats if s is not None), default=0)
        if now - newest > incomplete_grace_s * 1e9:
            doomed.append(sid)
    if not dry_run:
        for sid in doomed:
            delete_snapshot(store, sid)
    return doomed


# -- using ---------------------------------------------------------------------


def download_snapshot(
    store: BlockStore, snap: Snapshot, dest: str | os.PathLike[str], *, deep: bool = False
) -> None:
    """Download and verify `snap` into the new directory `dest`.

    Files are written to a hidden sibling directory and renamed into place
    only after every checksum matched and the opened state showed the
    offset and digest of the manifest (with `deep`, also a digest recomputed
    from every key). Raises SnapshotError when the snapshot is unusable; `dest`
    is then left as it was.
    """
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SnapshotError(f"{target} exists and is not an empty directory")
    private.makedirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for f in snap.files:
            h = hashlib.sha256()
            size = 0
            with open(tmp / f.name, "wb") as out:
                for part in range(f.parts):
                    try:
                        data = store.get(part_key(snap.id, f.name, part))
                    except BlockNotFound as exc:
                        raise SnapshotError(
                            f"snapshot {snap.id}: part {part} of {f.name} is missing"
                        ) from exc
                    h.update(data)
                    size += len(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if size != f.size or h.hexdigest() != f.sha256:
                raise SnapshotError(
                    f"snapshot {snap.id}: {f.name} fails its checksum ({size} bytes, sha256 {h.hexdigest()})"
                )
        _check_state(tmp, snap, deep=deep)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_state(path: Path, snap: Snapshot, *, deep: bool) -> None:
    try:
        state = State.open(path)
    except StateError as exc:
        raise SnapshotError(f"snapshot {snap.id} does not open as a state: {exc}") from exc
    try:
        vol = state.volume()
        applied, digest = state.applied_offset(), state.digest_hex()
        if (applied, digest) != (snap.offset, snap.digest):
            raise SnapshotError(
                f"snapshot {snap.id} holds a state at offset {applied} with digest {digest}"
            )
        if vol is None or vol.name != snap.volume.name:
            raise SnapshotError(f"snapshot {snap.id} holds another volume's state")
        if deep and state.recompute_digest().hex() != digest:
            raise SnapshotError(f"snapshot {snap.id}: the keys do not add up to the stored digest")
    finally:
        state.close()


def restore_newest_snapshot(
    store: BlockStore,
    dest_dir: str | os.PathLike[str],
    *,
    at_or_below: int | None,
    volume: str | None = None,
    deep: bool = False,
) -> int | None:
    """Download the newest usable snapshot at or below `at_or_below` into `dest_dir`.

    Returns its offset, or None when the store holds no usable one (the caller
    then folds from offset 0). A snapshot that fails verification is logged and
    the next older one is tried. StoreUnavailable propagates: an unreachable
    store says nothing about which snapshots exist.
    """
    found = restore_newest_snapshot_from(
        {"": store}, dest_dir, at_or_below=at_or_below, volume=volume, deep=deep
    )
    return None if found is None else found[0]


def restore_newest_snapshot_from(
    stores: Mapping[str, BlockStore],
    dest_dir: str | os.PathLike[str],
    *,
    at_or_below: int | None,
    volume: str | None = None,
    prefer: str | None = None,
    deep: bool = False,
) -> tuple[int, str] | None:
    """As `restore_newest_snapshot`, searching every region's store; return (offset, region).

    Snapshots are tried newest first; at equal offsets the `prefer` region's
    store (the local one) comes first. With several stores, one that cannot be
    reached is skipped with a warning: another region's snapshots do as well.
    """
    target = Path(dest_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SnapshotError(f"{target} exists and is not an empty directory")
    candidates: list[tuple[int, bool, str, Snapshot]] = []
    for region, store in stores.items():
        try:
            snaps = list_snapshots(store, volume=volume)
        except StoreUnavailable:
            if len(stores) == 1:
                raise
            log.warning("cannot list the snapshots of region %s; trying the others", region)
            continue
        for snap in snaps:
            if at_or_below is None or snap.offset <= at_or_below:
                candidates.append((snap.offset, region == prefer, region, snap))
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    for offset, _preferred, region, snap in candidates:
        try:
            download_snapshot(stores[region], snap, dest_dir, deep=deep)
        except SnapshotError as exc:
            log.warning("snapshot %s is unusable, trying an older one: %s", snap.id, exc)
            continue
        except StoreError as exc:
            if len(stores) == 1:
                raise
            log.warning("cannot download snapshot %s from region %s: %s", snap.id, region, exc)
            continue
        return offset, region
    return None


def bootstrap_state(
    log_: Log,
    dest: str | os.PathLike[str],
    *,
    volume: str,
    to_offset: int | None = None,
    prefer: str | None = None,
    stores: Iterable[BlockStore] = (),
) -> tuple[int, str] | None:
    """Fill the empty state directory `dest` from the newest usable snapshot at or below `to_offset`.

    This is where a region's state begins: a mount, `tidefs replay`, a
    replicator and a new region call it before their first fold, and then fold
    the rest of the log. Snapshots are looked for in the stores of the
    volume's regions (as its first record, or with a trimmed log the newest
    manifest in `stores`, names them) and in `stores`; at equal offsets the
    `prefer` region's store comes first.

    Returns (offset, region) of the snapshot used, or None when `dest` already
    holds something, the log is empty, or the log still starts at offset 0 and
    no usable snapshot was found (or no store could be listed): the caller then
    folds from offset 0. With a trimmed log a snapshot is required, and one
    too old to fold on from the log's start is refused: SnapshotError, naming
    the log's start, and `dest` is left empty.
    """
    from tidefs.replica.fetch import open_region_stores

    path = Path(dest)
    existed = path.exists()
    if existed and (not path.is_dir() or any(path.iterdir())):
        return None
    head = log_.head()
    if head == 0:
        return None
    first = log_.start()
    target = head - 1 if to_offset is None else min(to_offset, head - 1)
    extra = list(stores)
    try:
        info = volume_from_log(log_, extra)
    except SnapshotError as exc:
        if first == 0 or extra:
            raise
        # Without its first record the log names no store to look for snapshots in.
        raise SnapshotError(
            f"the log of {volume} starts at offset {first} and {path} holds no state: seed it "
            f"from a snapshot with `tidefs replay {volume} --journal URL --store STORE_URL "
            f"--state-dir {path}`, STORE_URL being any block store with the volume's snapshots"
        ) from exc
    where: dict[str, BlockStore] = {f"--store {i + 1}": s for i, s in enumerate(extra)}
    opened = open_region_stores(info)
    try:
        where.update(opened)
        try:
            found = restore_newest_snapshot_from(
                where, path, at_or_below=target, volume=volume, prefer=prefer
            )
        except StoreError as exc:
            if first > 0:
                raise SnapshotError(
                    f"the log of {volume} starts at offset {first} and the snapshots that "
                    f"must replace the older records cannot be listed: {exc}"
                ) from exc
            log.info("no snapshot could be listed (%s); folding the log from offset 0", exc)
            return None
    finally:
        for store in opened.values():
            with contextlib.suppress(Exception):
                store.close()
    if found is not None and found[0] + 1 < first and found[0] < target:
        shutil.rmtree(path, ignore_errors=True)
        if existed:
            private.makedirs(path)
        found = None
    if found is None and first > 0 and target >= 0:
        names = ", ".join(where)
        raise SnapshotError(
            f"the log of {volume} starts at offset {first}, and no usable snapshot at an "
            f"offset from {first - 1} to {target} is in the stores of {names}: take a snapshot "
            "(tidefs snapshot) in a region that has a state, or name a store that holds one"
        )
    if found is not None:
        log.info("state %s starts from the snapshot at offset %d of region %s", path, *found)
    return found


def rebuild_state(
    log_: Log,
    dest: str | os.PathLike[str],
    *,
    stores: Mapping[str, BlockStore],
    volume: str,
    to_offset: int | None = None,
    prefer: str | None = None,
    progress: Report | None = None,
) -> State:
    """Return a writable State in `dest` at `to_offset` (the head when None), open.

    It starts from the newest usable snapshot at or below the target in any of
    `stores` (or from offset 0) and folds the log from there: this is how every
    tool gets a state without touching a region's own directory. A `dest` that
    already holds a state (from an interrupted earlier run) is folded on from
    where it is, provided it is not past the target.
    """
    path = Path(dest)
    if not (path / "CURRENT").exists():
        restore_newest_snapshot_from(
            stores, path, at_or_below=to_offset, volume=volume, prefer=prefer
        )
    state = State.open(path)
    try:
        applied = state.applied_offset()
        head = log_.head()
        target = head - 1 if to_offset is None else min(to_offset, head - 1)
        if applied > target:
            raise SnapshotError(f"the state in {path} is at offset {applied}, past {target}")
        first = log_.start()
        if applied + 1 < first and applied < target:
            raise SnapshotError(
                f"the log of {volume} starts at offset {first}, and no usable snapshot at an "
                f"offset from {first - 1} to {target} was found: the state cannot be rebuilt"
            )
        start = applied

        def report(now: int, _target: int) -> None:
            if progress is not None:
                progress("records folded", now - start, target - start)

        fold_range(log_, state, to_offset=target, progress=report)
        if state.applied_offset() < target:
            raise SnapshotError(
                f"the fold of {volume} stopped at offset {state.applied_offset()}, before {target}"
            )
        vol = state.volume()
        if target >= 0 and (vol is None or vol.name != volume):
            raise SnapshotError(
                f"the log folds into volume {vol.name if vol else None!r}, not {volume!r}"
            )
    except BaseException:
        state.close()
        raise
    return state


def copy_state(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy the state directory `src` into the new directory `dest` without locking `src`.

    A region's mount holds its state's write lock for as long as it runs, and
    the tools must never take it (a mount starting meanwhile would fail). A
    read-only RocksDB open needs no lock and sees the state at the end of some
    applied batch, its write-ahead log replayed in memory; a checkpoint of such
    an open would miss that unflushed part, so the keys (meta included: the
    applied offset and digest travel with them) are copied one by one. The cost
    is one read of the state, paid only by tools.
    """
    src_path, dest_path = Path(src), Path(dest)
    if not (src_path / "CURRENT").exists():
        raise SnapshotError(f"no tidefs state at {src_path}")
    if dest_path.exists():
        raise SnapshotError(f"{dest_path} exists already")
    try:
        source = Rdict(
            str(src_path), Options(raw_mode=True), access_type=AccessType.read_only(False)
        )
    except Exception as exc:
        raise SnapshotError(f"cannot open the state at {src_path} read-only: {exc}") from exc
    try:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        target = Rdict(str(dest_path), opts)
        try:
            batch = WriteBatch(raw_mode=True)
            for n, (key, value) in enumerate(source.items(), 1):
                batch.put(key, value)
                if n % _COPY_BATCH == 0:
                    target.write(batch)
                    batch = WriteBatch(raw_mode=True)
            target.write(batch)
            target.flush()
        finally:
            target.close()
    finally:
        source.close()


def volume_from_log(log_: Log, stores: Iterable[BlockStore] = ()) -> VolumeInfo:
    """Return the volume record as the log's first record (CreateVolume) made it.

    Enough to find the regions' stores, and so their snapshots; regions added
    later come from the rebuilt state. When the log no longer starts at 0, the
    record comes from the newest snapshot manifest in `stores`.
    """
    if log_.start() == 0 and log_.head() > 0:
        records = log_.read(0, max_records=1, timeout=1.0)
        if records and records[0].offset == 0:
            command = codec.decode(records[0].payload).command
            if isinstance(command, CreateVolume):
                return VolumeInfo(
                    command.name,
                    tuple(command.regions),
                    command.primary,
                    command.chunk_size,
                    command.block_size,
                    command.retention_s,
                )
            raise SnapshotError(f"the log of {log_.volume} does not start with CreateVolume")
    newest: Snapshot | None = None
    for store in stores:
        with contextlib.suppress(StoreError):
            for snap in list_snapshots(store, volume=log_.volume):
                if newest is None or snap.offset > newest.offset:
                    newest = snap
    if newest is not None:
        return newest.volume
    if log_.head() == 0:
        raise SnapshotError(f"volume {log_.volume} does not exist (its log is empty)")
    raise SnapshotError(
        f"the log of {log_.volume} starts at offset {log_.start()}: name a block store that "
        "holds its snapshots (--store URL)"
    )


def create_snapshot(
    log_: Log,
    stores: dict[str, BlockStore],
    *,
    volume: str,
    region: str,
    work_dir: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    progress: Report | None = None,
) -> tuple[Snapshot, bool]:
    """Snapshot the volume into `region`'s store; return the snapshot and whether it is new.

    The state is a private one: by default rebuilt from the newest snapshot
    and folded to the log's head (so no mount's locked directory is needed),
    or, with `state_dir`, a lock-free copy of that directory at its own
    offset. `stores` maps region names to stores; the store of a region added
    after the volume was created is opened and added to it (the caller closes
    them all).
    """
    with tempfile.TemporaryDirectory(prefix="tidefs-snapshot-", dir=work_dir) as tmp:
        path = Path(tmp) / "state"
        if state_dir is not None:
            copy_state(state_dir, path)
            state = State.open(path)
        else:
            state = rebuild_state(
                log_, path, stores=stores, volume=volume, prefer=region, progress=progress
            )
        try:
            vol = state.volume()
            if vol is None or vol.name != volume:
                raise SnapshotError(
                    f"the state holds volume {vol.name if vol else None!r}, not {volume!r}"
                )
            home = vol.region(region)
            if home is None:
                raise SnapshotError(f"volume {volume} has no region {region!r}")
            if region not in stores:
                from tidefs.replica.store import open_store

                stores[region] = open_store(home.store_url)
            offset, digest = state.applied_offset(), state.digest_hex()
            existing = read_snapshot(stores[region], snapshot_id(offset, digest))
            if existing is not None:
                return existing, False
            checkpoint = Path(tmp) / "checkpoint"
            state.checkpoint(checkpoint)
        finally:
            state.close()
        return upload_snapshot(
            stores[region],
            checkpoint,
            volume=vol,
            offset=offset,
            digest=digest,
            progress=progress,
        )


def log_trim_point(
    log_: Log,
    snapshots: Iterable[Snapshot],
    applied: Mapping[str, int],
    regions: Iterable[str],
    *,
    retention_s: int,
    now_ns: int | None = None,
) -> tuple[int, str]:
    """Return (T, reason): the records below offset T may be deleted from the log now.

    Three readers need old records. A region folds from its applied offset
    (so T <= lowest applied + 1). A rebuild to any offset inside the retention
    window (a restore, gc) starts from a snapshot at or below it: the newest
    snapshot at or below the window's first state must stay reachable (T <= its
    offset + 1). A new region starts from the newest snapshot, later than that
    one. `reason` names the bound that decided T; T is 0 when a region's offset
    is unknown or no snapshot is old enough.
    """
    from tidefs.replica.restore import window_start

    now = time.time_ns() if now_ns is None else now_ns
    names = sorted(set(regions))
    unknown = [r for r in names if r not in applied]
    if unknown:
        return 0, f"region(s) {', '.join(unknown)} published no applied offset"
    first_state = window_start(log_, retention_s, now) - 1
    below = [s.offset for s in snapshots if s.offset <= first_state]
    if not below:
        return 0, (
            f"no snapshot at or below offset {first_state}, where the retention window "
            "begins: take snapshots regularly and keep enough of them"
        )
    lowest = min(applied[r] for r in names)
    if lowest + 1 <= max(below) + 1:
        return max(lowest + 1, 0), f"the lowest applied offset of any region is {lowest}"
    return max(below) + 1, (
        f"snapshot at offset {max(below)} is the newest at or below the retention window"
    )
