"""Region status: what each region publishes so that anyone reaching the journal can see lag.

A region's figures (applied offset, when it applied it, replicator backlog,
fallback reads) live in that region's process, perhaps on another continent.
Rather than a status server, each region appends a small JSON report to a
second log beside the volume's metadata log, `<volume>.status`, every few
seconds. The metadata log is never used for this: status reports are not
commands, must not move the head they measure, and must not enter the fold.

A region may run many mounts, on one host or several: each report names its
host and a mount id drawn at random when the publishing process starts, so
`tidefs status` and `tidefs top` show one row per mount (`read_mounts`). The
mount id is no fact of the fold: status reports never enter it.

gc and the log's trim point must not pass any running mount of a region, so
they take the lowest applied offset among the region's live mounts
(`lowest_live_offsets`). A mount that stops cleanly publishes a last report
marked `stopped`: it no longer counts (a state that restarts catches up with
the log before it serves, so it needs no old record or block). A killed mount
publishes nothing more; it counts while its newest report is younger than
`LIVE_S` (it may be cut off from the journal yet still serving), and is then
presumed dead and named, never silently waited for. A region with no live
mount counts at its newest report, as it would resume from there.

`tidefs status` reads the tail of that log, keeps the newest report of every
mount, and computes lag against the metadata log's head as it is *now*: in
records (head - 1 - applied) and in seconds (how long ago the oldest record
that region has not applied was appended).

Each report also carries the region's state digest with the offset it belongs
to (`digest_fields`), so that `tidefs verify` can check every region against a
replay of the log from the journal alone (`read_digests`).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidefs.journal import codec, features
from tidefs.journal.commands import AddRegion, CreateVolume, RemoveRegion
from tidefs.journal.log import JournalError, Log, open_log

if TYPE_CHECKING:
    from tidefs.replica.fetch import FetchStats
    from tidefs.replica.replica import Replica
    from tidefs.replica.replicator import Replicator
    from tidefs.replica.state import State

log = logging.getLogger(__name__)

STATUS_SUFFIX = ".status"
"""The status log of volume V is the log of the pseudo-volume `V.status`."""

TAIL_RECORDS = 2000
"""How many recent reports `read_status` scans for the newest of each region."""

LIVE_S = 600.0
"""A mount that has not reported for this long (and did not say it stopped) is presumed killed."""


def status_volume(volume: str) -> str:
    """Return the name under which `volume`'s status log is stored."""
    return volume + STATUS_SUFFIX


@dataclass
class RegionStatus:
    """The newest report of one region's mount, with lag computed against the current head."""

    region: str
    applied_offset: int
    published_ns: int
    host: str = ""
    """The host the reporting process runs on ("" in reports from before hosts were named)."""
    mount_id: str = ""
    """Random per mount (or `tidefs replicate`) process: two mounts of one region differ."""
    report_offset: int = -1
    """Where this report is in the status log: of two reports the later one is newer."""
    lag_records: int = 0
    lag_seconds: float = 0.0
    backlog_blocks: int = 0
    backlog_bytes: int = 0
    backlog_oldest_s: float = 0.0
    fallback_reads: int = 0
    fallback_bytes: int = 0
    apply_delay_p99_s: float = 0.0
    state_before_log_start: bool = False
    knows_schema: int = 0
    """The newest schema version its tidefs knows (0: it did not say, an older tidefs)."""
    knows_features: list[str] = field(default_factory=list)
    published: bool = True
    """False for a region of the volume that never published a report."""
    stopped: bool = False
    """The process said in this, its last report, that it stopped cleanly."""
    extra: dict[str, Any] = field(default_factory=dict)

    def live(self, now_ns: int, live_s: float = LIVE_S) -> bool:
        """Whether the process still counts: it did not stop, and reported within `live_s`."""
        return not self.stopped and now_ns - self.published_ns <= live_s * 1e9

    def knows(self, schema_version: int, names: Iterable[str]) -> bool:
        """Whether this region's tidefs knows `schema_version` and every feature in `names`."""
        return schema_version <= self.knows_schema and set(names) <= set(self.knows_features)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `tidefs status --json` for one region."""
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


class StatusPublisher:
    """Append this region's figures to the status log every `interval` seconds."""

    def __init__(
        self,
        journal_url: str,
        volume: str,
        region: str,
        collect: Callable[[], dict[str, Any]],
        *,
        interval: float = 2.0,
        host: str | None = None,
        mount_id: str | None = None,
    ) -> None:
        self.journal_url = journal_url
        self.volume = volume
        self.region = region
        self.host = host if host is not None else socket.gethostname()
        self.mount_id = mount_id if mount_id is not None else secrets.token_hex(4)
        self.collect = collect
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log: Log | None = None
        self._lock = threading.Lock()

    def start(self) -> StatusPublisher:
        """Start publishing in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"tidefs-status-{self.region}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, *, final: bool = False) -> None:
        """Stop publishing and close the status log.

        With `final`, first append a last report marked `stopped`, so that gc
        and the log's trim point stop counting this process at once.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if final:
            self.publish_final(stopped=True)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def publish(self, *, stopped: bool = False) -> None:
        """Append one report now (`stopped`: the last one of this process)."""
        with self._lock:
            if self._log is None:
                self._log = open_log(self.journal_url, status_volume(self.volume))
            report = {
                "region": self.region,
                "host": self.host,
                "mount_id": self.mount_id,
                "published_ns": time.time_ns(),
                **self.collect(),
            }
            if stopped:
                report["stopped"] = True
            self._log.append(json.dumps(report, sort_keys=True).encode())

    def publish_final(self, *, stopped: bool = False) -> None:
        """Append one report now, so that the last figures are current; a failure only warns."""
        try:
            self.publish(stopped=stopped)
        except JournalError as exc:
            log.warning("could not publish status: %s", exc)
        except Exception:
            log.exception("status collection failed")

    def _run(self) -> None:
        while True:
            try:
                self.publish()
            except JournalError as exc:
                # Status is best effort: a journal outage must not stop the region.
                log.warning("could not publish status: %s", exc)
            except Exception:
                log.exception("status collection failed")
            if self._stop.wait(self.interval):
                return


DIGEST_RECORDS = 200_000
"""How many recent reports `read_digests` scans for (offset, digest) pairs."""


def digest_fields(state: State) -> dict[str, Any]:
    """The fields of a report that let `tidefs verify` check this region from the journal.

    `digest_offset` and `digest` come from one RocksDB snapshot of the state
    (`State.applied_and_digest`): the digest is the state's at exactly that offset.
    """
    offset, digest = state.applied_and_digest()
    return {"digest_offset": offset, "digest": digest.hex()}


def knowledge_fields() -> dict[str, Any]:
    """What this tidefs can read, so that `tidefs upgrade` knows when every region can."""
    return {"knows_schema": codec.CURRENT_VERSION, "knows_features": sorted(features.KNOWN)}


def region_fields(
    replica: Replica,
    *,
    fetch_stats: Callable[[], FetchStats] | None = None,
    replicator: Replicator | None = None,
) -> dict[str, Any]:
    """The figures a region publishes for `tidefs status` and `tidefs verify`.

    A mount passes its fetcher's statistics (fallback reads) and its replicator
    when it runs one; `tidefs replicate` passes only its replicator.
    """
    vol = replica.state.volume()
    fields: dict[str, Any] = {
        "applied_offset": replica.applied,
        "apply_delay_p99_s": round(replica.delays.p99(), 6),
        **digest_fields(replica.state),
        **knowledge_fields(),
    }
    if vol is not None:
        # At about the applied offset: `tidefs status` follows the log's tail from there.
        fields["volume_regions"] = [r.name for r in vol.regions]
        fields["volume_primary"] = vol.primary
    if fetch_stats is not None:
        st = fetch_stats()
        fields["fallback_reads"] = st.fallback_reads
        fields["fallback_bytes"] = st.fallback_bytes
    if replicator is not None:
        fields.update(replicator.status_fields())
    return fields


def _reports(
    journal_url: str, volume: str, tail: int, since_ns: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (offset, report) for the newest `tail` records of the status log, oldest first.

    With `since_ns`, every record appended since then too, however many.
    A record that is not a JSON object naming its region is logged and skipped.
    """
    with open_log(journal_url, status_volume(volume)) as slog:
        head = slog.head()
        first = head - tail
        if since_ns is not None:
            first = min(first, slog.offset_for_time(since_ns))
        offset = max(slog.start(), first)
        while offset < head:
            records = slog.read(offset, max_records=1000, timeout=1.0)
            if not records:
                break
            for rec in records:
                try:
                    report = json.loads(rec.payload)
                    if not isinstance(report, dict) or not isinstance(report.get("region"), str):
                        raise ValueError("no region")
                except ValueError:
                    log.warning("ignoring a malformed status report at offset %d", rec.offset)
                    continue
                yield rec.offset, report
            offset = records[-1].offset + 1


def read_digests(journal_url: str, volume: str) -> dict[str, list[tuple[int, str]]]:
    """Return every region's reported (offset, digest) pairs, ascending by offset.

    Reports from before regions published digests, and malformed ones, are
    skipped; a pair reported several times is listed once. When one region
    reported two different digests at one offset (a state rebuilt differently,
    or a forged report), both are kept, in report order.
    """
    pairs: dict[str, dict[tuple[int, str], None]] = {}
    for offset, report in _reports(journal_url, volume, DIGEST_RECORDS):
        if "digest" not in report:
            continue
        try:
            pair = (int(report["digest_offset"]), str(report["digest"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed status report at offset %d", offset)
            continue
        if pair[0] >= 0:
            pairs.setdefault(str(report["region"]), {})[pair] = None
    return {region: sorted(seen, key=lambda p: p[0]) for region, seen in sorted(pairs.items())}


MountKey = tuple[str, str, str]
"""(region, host, mount id): what tells one mount's reports from another's."""


def read_status(
    journal_url: str,
    volume: str,
    *,
    metadata_log: Log | None = None,
    every_region: bool = False,
) -> dict[str, RegionStatus]:
    """Return the newest status of every region that ever published, with lag computed now.

    Of a region with several mounts, the one whose report is newest in the log stands for it.
    With `every_region`, a region of the volume that never published is listed
    too (`published` False, applied offset -1), so that none goes unnoticed.
    """
    own = metadata_log is None
    mlog = metadata_log if metadata_log is not None else open_log(journal_url, volume)
    try:
        out = newest_per_region(read_mounts(journal_url, volume, metadata_log=mlog))
        return with_silent_regions(mlog, out) if every_region else out
    finally:
        if own:
            mlog.close()


def with_silent_regions(mlog: Log, regions: dict[str, RegionStatus]) -> dict[str, RegionStatus]:
    """`regions` and every other region of the volume, those listed with `published` False."""
    out = dict(regions)
    reports = [{"applied_offset": st.applied_offset, **st.extra} for st in regions.values()]
    for region in volume_regions(mlog, reports):
        if region not in out:
            out[region] = RegionStatus(
                region=region,
                applied_offset=-1,
                published_ns=0,
                lag_records=mlog.head(),
                published=False,
            )
    return dict(sorted(out.items()))


def newest_per_region(mounts: dict[MountKey, RegionStatus]) -> dict[str, RegionStatus]:
    """Of every region's mounts, the one whose report came last in the status log."""
    out: dict[str, RegionStatus] = {}
    for st in mounts.values():
        if st.region not in out or st.report_offset > out[st.region].report_offset:
            out[st.region] = st
    return dict(sorted(out.items()))


def read_mounts(
    journal_url: str,
    volume: str,
    *,
    metadata_log: Log | None = None,
    since_ns: int | None = None,
) -> dict[MountKey, RegionStatus]:
    """Return the newest status of every mount, by (region, host, mount id), with lag computed now.

    Sorted by that key, so that a region's mounts are listed together. With
    `since_ns`, every mount that reported since then is found, however many
    reports others appended meanwhile.
    """
    reports: dict[MountKey, tuple[int, dict[str, Any]]] = {}
    for offset, report in _reports(journal_url, volume, TAIL_RECORDS, since_ns):
        key = (str(report["region"]), str(report.get("host", "")), str(report.get("mount_id", "")))
        reports[key] = (offset, report)
    own = metadata_log is None
    mlog = metadata_log if metadata_log is not None else open_log(journal_url, volume)
    try:
        m_head, m_start = mlog.head(), mlog.start()
        out: dict[MountKey, RegionStatus] = {}
        for (region, host, mount_id), (report_offset, rep) in sorted(reports.items()):
            applied = int(rep.get("applied_offset", -1))
            lag_records = max(0, m_head - 1 - applied)
            lag_seconds = 0.0
            if lag_records:
                # Below the log's start the oldest record still stored bounds the lag.
                first_missing = mlog.read(max(applied + 1, m_start), max_records=1, timeout=1.0)
                if first_missing:
                    lag_seconds = max(0.0, (time.time_ns() - first_missing[0].timestamp_ns) / 1e9)
            known = {
                f for f in RegionStatus.__dataclass_fields__ if f not in ("extra", "published")
            }
            status = RegionStatus(
                region=region,
                applied_offset=applied,
                published_ns=int(rep.get("published_ns", 0)),
                host=host,
                mount_id=mount_id,
                report_offset=report_offset,
                lag_records=lag_records,
                lag_seconds=lag_seconds,
                backlog_blocks=int(rep.get("backlog_blocks", 0)),
                backlog_bytes=int(rep.get("backlog_bytes", 0)),
                backlog_oldest_s=float(rep.get("backlog_oldest_s", 0.0)),
                fallback_reads=int(rep.get("fallback_reads", 0)),
                fallback_bytes=int(rep.get("fallback_bytes", 0)),
                apply_delay_p99_s=float(rep.get("apply_delay_p99_s", 0.0)),
                state_before_log_start=applied + 1 < m_start,
                knows_schema=int(rep.get("knows_schema", 0)),
                knows_features=sorted(str(f) for f in rep.get("knows_features", ())),
                stopped=bool(rep.get("stopped", False)),
                extra={k: v for k, v in rep.items() if k not in known},
            )
            out[region, host, mount_id] = status
        return out
    finally:
        if own:
            mlog.close()


@dataclass
class RegionOffset:
    """The applied offset gc and the log's trim point take for one region, and why."""

    region: str
    applied_offset: int
    why: str
    """Which mount decided it: "mount 1a2b on host h (report 3s old)"."""
    presumed_dead: list[str] = field(default_factory=list)
    """The region's mounts silent for longer than the bound, no longer waited for."""


def _mount_name(st: RegionStatus, now_ns: int) -> str:
    age = max(0.0, (now_ns - st.published_ns) / 1e9)
    return f"mount {st.mount_id or '?'} on host {st.host or '?'} (report {age:.0f}s old)"


def counted_mounts(
    mounts: dict[MountKey, RegionStatus],
    *,
    now_ns: int | None = None,
    live_s: float = LIVE_S,
) -> dict[str, list[RegionStatus]]:
    """Per region, the mounts that count: the live ones, or else the newest report alone.

    Live: not stopped, and reported within `live_s` (see the module doc).
    """
    now = time.time_ns() if now_ns is None else now_ns
    by_region: dict[str, list[RegionStatus]] = {}
    for st in mounts.values():
        by_region.setdefault(st.region, []).append(st)
    out: dict[str, list[RegionStatus]] = {}
    for region, sts in sorted(by_region.items()):
        live = [s for s in sts if s.live(now, live_s)]
        out[region] = live or [max(sts, key=lambda s: s.report_offset)]
    return out


def lowest_live_offsets(
    mounts: dict[MountKey, RegionStatus],
    *,
    now_ns: int | None = None,
    live_s: float = LIVE_S,
) -> dict[str, RegionOffset]:
    """Return, per region, the lowest applied offset of its live mounts (see the module doc).

    Live: not stopped, and reported within `live_s`. A region with no live
    mount takes its newest report, stopped or not.
    """
    now = time.time_ns() if now_ns is None else now_ns
    counted = counted_mounts(mounts, now_ns=now, live_s=live_s)
    out: dict[str, RegionOffset] = {}
    for region, sts in counted.items():
        dead = [
            f"{_mount_name(s, now)} at offset {s.applied_offset}, presumed killed"
            for s in mounts.values()
            if s.region == region and not s.stopped and not s.live(now, live_s)
        ]
        st = min(sts, key=lambda s: (s.applied_offset, s.report_offset))
        why = _mount_name(st, now)
        if not st.live(now, live_s):
            state = "stopped" if st.stopped else "presumed killed"
            why = f"no live mount; newest report from {why}, {state}"
        out[region] = RegionOffset(region, st.applied_offset, why, dead)
    return out


def read_live_offsets(
    journal_url: str, volume: str, *, metadata_log: Log | None = None
) -> dict[str, RegionOffset]:
    """`lowest_live_offsets` of every mount that reported within `LIVE_S`, and any later ones."""
    since = time.time_ns() - int(LIVE_S * 1e9)
    mounts = read_mounts(journal_url, volume, metadata_log=metadata_log, since_ns=since)
    return lowest_live_offsets(mounts)


REGION_SCAN_RECORDS = 200_000
"""Longest tail of the metadata log `volume_regions` reads to follow AddRegion and RemoveRegion."""


def volume_regions(mlog: Log, reports: Iterable[dict[str, Any]]) -> list[str]:
    """Return the names of the volume's regions at the log's head, those that never published too.

    Starts from the regions the most advanced report lists (its state's volume
    record) and follows AddRegion and RemoveRegion through the rest of the log;
    without such a report, from CreateVolume at offset 0. A log trimmed below
    every report's offset, or a tail longer than `REGION_SCAN_RECORDS` (no
    region runs a tidefs that publishes its regions), leaves only the
    reporting regions known (an empty list): status must stay quick.
    """
    best: dict[str, Any] | None = None
    for rep in reports:
        if isinstance(rep.get("volume_regions"), list) and (
            best is None or int(rep.get("applied_offset", -1)) > int(best["applied_offset"])
        ):
            best = rep
    if best is not None:
        names = [str(n) for n in best["volume_regions"]]
        primary = str(best.get("volume_primary", ""))
        offset = int(best["applied_offset"]) + 1
    else:
        if mlog.start() > 0 or mlog.head() == 0:
            return []
        first = mlog.read(0, max_records=1, timeout=1.0)
        if not first:
            return []
        try:
            create = codec.decode(first[0].payload).command
        except codec.CodecError:
            return []
        if not isinstance(create, CreateVolume):
            return []
        names, primary, offset = [r.name for r in create.regions], create.primary, 1
    head = mlog.head()
    offset = max(offset, mlog.start())
    if head - offset > REGION_SCAN_RECORDS:
        return []
    while offset < head:
        records = mlog.read(offset, max_records=1000, timeout=1.0)
        if not records:
            break
        for rec in records:
            try:
                cmd = codec.decode(rec.payload).command
            except codec.CodecError:
                return names  # a newer tidefs wrote the rest: as far as this one can read
            if isinstance(cmd, AddRegion) and cmd.region.name not in names:
                names.append(cmd.region.name)
            elif isinstance(cmd, RemoveRegion) and cmd.name != primary and cmd.name in names:
                names.remove(cmd.name)
        offset = records[-1].offset + 1
    return names
