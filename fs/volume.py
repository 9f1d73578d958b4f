"""Creating a volume: the one command that must be first in its log.

A volume exists once its log holds a `CreateVolume` record at offset 0; every
region that later mounts it folds that record first and learns the volume's
regions, chunk and block sizes from it. `format_volume` is the single code path
that writes it, shared by `tidefs format` and the test harness, so that a test
volume is made exactly as a user's is.

Formatting checks what it can before it appends, because a record in the log
is forever: the regions and sizes are validated, and the stores are probed so
that a typo in a store URL fails here, not at the first write of some mount.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from urllib.parse import unquote, urlsplit

from tidefs import private
from tidefs.journal import codec, features
from tidefs.journal.commands import CreateVolume, Envelope, Region
from tidefs.journal.log import Log, open_log, redact_url
from tidefs.replica.blocks import MAX_BLOCK_SIZE

DEFAULT_CHUNK_SIZE = 64 << 20
"""Bytes of file data per chunk (DESIGN: files are cut into 64 MiB chunks)."""

DEFAULT_BLOCK_SIZE = 4 << 20
"""Largest block of a slice; blocks are the unit of upload, cache and replication."""

DEFAULT_RETENTION_S = 7 * 24 * 3600
"""How long unreferenced blocks are kept before gc, so that a replay can bring files back."""


REGION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a region name may be: it names directories, status rows and command-line arguments."""


def region_name_problem(name: str) -> str | None:
    """Return why `name` cannot name a region (one line), or None when it can."""
    if REGION_NAME.fullmatch(name) is None:
        return (
            f"invalid region name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return None


class VolumeError(Exception):
    """A volume could not be formatted (bad layout, or it exists already)."""


class VolumeExistsError(VolumeError):
    """The volume's log is not empty: a volume of that name was formatted before."""


def validate_layout(
    regions: Sequence[Region], primary: str, chunk_size: int, block_size: int
) -> None:
    """Raise VolumeError unless the regions and sizes make a usable volume."""
    if not regions:
        raise VolumeError("a volume needs at least one region")
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise VolumeError(f"duplicate region names in {names}")
    for r in regions:
        problem = region_name_problem(r.name)
        if problem is not None:
            raise VolumeError(problem)
        if not r.store_url:
            raise VolumeError(f"region {r.name!r} has no store URL")
    if primary not in names:
        raise VolumeError(f"primary region {primary!r} is not one of {names}")
    if not 0 < block_size <= MAX_BLOCK_SIZE:
        raise VolumeError(f"block size must be in (0, {MAX_BLOCK_SIZE}], not {block_size}")
    if chunk_size < block_size or chunk_size % block_size:
        raise VolumeError(
            f"chunk size {chunk_size} must be a positive multiple of the block size {block_size}"
        )


def probe_store(url: str) -> None:
    """Raise VolumeError when the block store at `url` cannot be opened or listed."""
    from tidefs.replica.store import open_store

    try:
        store = open_store(url)
        store.exists("blocks/00/0000000000000000/00000")
    except Exception as exc:  # any failure means "unusable store", said once
        raise VolumeError(f"block store {redact_url(url)} is not reachable: {exc}") from exc


def _missing_dirs(url: str) -> list[str]:
    """The directories that opening the `file://` store at `url` would create, deepest first."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return []
    return private.missing_dirs(unquote(parts.path))


@contextlib.contextmanager
def _undo_new_dirs(urls: Sequence[str]) -> Iterator[None]:
    """On failure, remove the store directories created inside (never one that existed).

    Only empty directories go (rmdir): whatever another process put there meanwhile stays.
    """
    created = [d for url in urls for d in _missing_dirs(url)]
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def format_volume(
    journal_url: str,
    volume: str,
    regions: Sequence[Region],
    primary: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    retention_s: int = DEFAULT_RETENTION_S,
    root_mode: int = 0o40755,
    root_uid: int = 0,
    root_gid: int = 0,
    check_stores: bool = True,
    schema_version: int | None = None,
) -> None:
    """Create `volume` in the log at `journal_url`, with its regions and layout.

    Raises VolumeExistsError when the log already holds records, VolumeError for
    a bad layout or an unreachable store, and the journal's errors as they are.
    Two concurrent formats cannot both win: only a record at offset 0 creates
    the volume (the fold rejects a later CreateVolume), so the loser is told.

    The volume enables every schema version and feature this tidefs knows
    (an EnableFeatures right after CreateVolume, in the same append), or those
    up to `schema_version`: 1 writes no EnableFeatures, so that regions still
    running a tidefs of schema v1 can read the volume until `tidefs upgrade`.
    """
    if not volume or "/" in volume:
        raise VolumeError(f"invalid volume name {volume!r}")
    validate_layout(regions, primary, chunk_size, block_size)
    try:
        enable = features.enable_up_to(
            codec.CURRENT_VERSION if schema_version is None else schema_version
        )
    except ValueError as exc:
        raise VolumeError(str(exc)) from exc
    command = CreateVolume(
        name=volume,
        regions=tuple(regions),
        primary=primary,
        chunk_size=chunk_size,
        block_size=block_size,
        retention_s=retention_s,
        root_mode=root_mode,
        root_uid=root_uid,
        root_gid=root_gid,
    )
    shown = redact_url(journal_url)
    # A failed format leaves no store directory behind that it created itself.
    with _undo_new_dirs([r.store_url for r in regions] if check_stores else []):
        if check_stores:
            for r in regions:
                probe_store(r.store_url)
        with open_log(journal_url, volume) as log_:
            if log_.head() > 0:
                raise VolumeExistsError(f"volume {volume!r} already exists in {shown}")
            now = time.time_ns()
            version = features.LEGACY_SCHEMA if enable is None else enable.schema_version
            level = features.Enabled(version, frozenset())
            envs = [Envelope(command=command, origin=primary, timestamp_ns=now)]
            if enable is not None:
                envs.append(Envelope(command=enable, origin=primary, timestamp_ns=now))
            payloads = [
                (codec.encode(env, features.write_version(env.command, level)), now) for env in envs
            ]
            offset = log_.append_many(payloads)[0]
            first = log_.start()
    if offset != first:
        raise VolumeExistsError(
            f"volume {volume!r} was formatted concurrently in {shown}; this format lost"
        )


def volume_identity(log_: Log) -> str | None:
    """Return what tells this volume from any other of its name: its CreateVolume's request id.

    Names are not identities: two journals may each hold a volume `data`, and
    a volume may be formatted anew under an old name. The request id of the
    first record is random and written once. None when the log no longer
    starts at offset 0 (trimmed) or does not begin with a CreateVolume.
    """
    if log_.start() != 0:
        return None
    records = log_.read(0, max_records=1)
    if not records or records[0].offset != 0:
        return None
    try:
        env = codec.decode(records[0].payload)
    except codec.CodecError:
        return None
    if not isinstance(env.command, CreateVolume):
        return None
    return env.request_id.hex()[:16]
