"""Regions publish their status through the journal; `tidefs status` reads it from anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tidefs.journal.commands import ROOT_INODE, CreateVolume, Mkdir, Region
from tidefs.journal.log import open_log
from tidefs.replica.replica import Replica, fold_range
from tidefs.replica.state import State
from tidefs.replica.status import (
    StatusPublisher,
    digest_fields,
    read_digests,
    read_status,
    status_volume,
)

REGIONS = (Region("a", "file:///unused-a"), Region("b", "file:///unused-b"))


def _collect(rep: Replica) -> Callable[[], dict[str, Any]]:
    return lambda: {"applied_offset": rep.applied, "backlog_blocks": 3}


def test_lag_rises_while_a_region_is_paused_and_falls_after(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    reps = {
        name: Replica(open_log(journal_url, journal_volume), State.open(tmp_path / name), name)
        for name in ("a", "b")
    }
    pubs = {
        name: StatusPublisher(
            journal_url,
            journal_volume,
            name,
            _collect(rep),
            interval=3600,  # published explicitly below
        )
        for name, rep in reps.items()
    }
    try:
        for rep in reps.values():
            rep.start()
        a, b = reps["a"], reps["b"]
        a.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a"))
        b.barrier(timeout=30)
        b.pause()
        for i in range(25):
            a.submit(Mkdir(ROOT_INODE, b"d%d" % i, 0o40755, 0, 0))
        for p in pubs.values():
            p.publish()
        status = read_status(journal_url, journal_volume)
        assert set(status) == {"a", "b"}
        assert status["a"].lag_records == 0
        assert status["b"].lag_records == 25
        assert status["b"].lag_seconds > 0
        assert status["b"].backlog_blocks == 3

        b.resume()
        b.barrier(timeout=30)
        pubs["b"].publish()
        after = read_status(journal_url, journal_volume)
        assert after["b"].lag_records == 0
        assert after["b"].applied_offset == after["a"].applied_offset

        cli = subprocess.run(
            [sys.executable, "-m", "tidefs.fs.cli", "status", journal_volume,
             "--journal", journal_url, "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        doc = json.loads(cli.stdout)
        assert set(doc) == {"a", "b"}
        for key in ("applied_offset", "lag_records", "lag_seconds", "backlog_blocks",
                    "backlog_bytes", "backlog_oldest_s", "fallback_reads", "fallback_bytes"):  # fmt: skip
            assert key in doc["b"]
    finally:
        for rep in reps.values():
            rep.stop()
            rep.state.close()
            rep.log.close()
        for p in pubs.values():
            p.stop()


def test_status_before_any_report(journal_url: str, journal_volume: str) -> None:
    assert read_status(journal_url, journal_volume) == {}


def test_a_replicate_only_region_publishes_its_status(tmp_path: Path) -> None:
    """`tidefs replicate` publishes like a mount: status shows the region and gc counts it."""
    from tidefs.fs.volume import format_volume

    journal = f"sqlite://{tmp_path / 'log.db'}"
    regions = [Region(n, (tmp_path / f"store-{n}").as_uri()) for n in ("a", "b")]
    format_volume(journal, "vol", regions, "a")

    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "tidefs.fs.cli", *args],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip

    assert read_status(journal, "vol") == {}
    cli("replicate", "vol", "--journal", journal, "--region", "b", "--once",
        "--state-dir", str(tmp_path / "replicate-b"))  # fmt: skip
    status = json.loads(cli("status", "vol", "--journal", journal, "--json"))
    assert {n for n, st in status.items() if st["published"]} == {"b"}
    assert set(status) == {"a", "b"}  # a never published: listed all the same
    # Offset 1: format appends CreateVolume and the EnableFeatures of this tidefs.
    assert status["b"]["applied_offset"] == 1 and status["b"]["backlog_blocks"] == 0

    cli("replay", "vol", "--journal", journal, "--state-dir", str(tmp_path / "a"), "-q")
    gc = json.loads(
        cli("gc", "vol", "--journal", journal, "--json", "--state-dir", f"a={tmp_path / 'a'}")
    )
    assert gc["blocked"] is None and gc["applied"] == {"a": 1, "b": 1}


def test_published_digests_match_a_replay_even_while_the_fold_runs(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    """Each report's digest is the state's at exactly its offset, however the fold interleaves.

    `tidefs verify` compares a region's reported digest with a replay's at the
    reported offset: a pair torn between two batches would be a false alarm.
    """
    rep = Replica(open_log(journal_url, journal_volume), State.open(tmp_path / "a"), "a")
    pub = StatusPublisher(
        journal_url, journal_volume, "a", lambda: digest_fields(rep.state), interval=3600
    )
    rep.start()
    done = threading.Event()

    def write() -> None:
        try:
            rep.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a"))
            for i in range(150):
                rep.submit(Mkdir(ROOT_INODE, b"d%d" % i, 0o40755, 0, 0))
        finally:
            done.set()

    writer = threading.Thread(target=write)
    try:
        writer.start()
        for _ in range(2000):  # bounded: the writer ends long before
            pub.publish()
            if done.is_set():
                break
        writer.join(timeout=120)
        assert done.is_set()
        rep.barrier(timeout=30)
        pub.publish()
        with open_log(journal_url, status_volume(journal_volume)) as slog:
            slog.append(json.dumps({"region": "old", "applied_offset": 3}).encode())
    finally:
        pub.stop()
        rep.stop()
        rep.state.close()
        rep.log.close()

    reports = read_digests(journal_url, journal_volume)
    assert set(reports) == {"a"}  # a report without a digest is not a digest
    pairs = reports["a"]
    assert pairs == sorted(set(pairs)) and pairs[-1][0] == 150
    with open_log(journal_url, journal_volume) as lg, State.open(tmp_path / "replay") as replay:
        for offset, digest in pairs:
            assert fold_range(lg, replay, to_offset=offset) == offset
            assert replay.applied_and_digest() == (offset, bytes.fromhex(digest))


def test_every_mount_of_a_region_is_a_row(tmp_path: Path) -> None:
    """Two processes serving region b (two hosts, or two mounts on one) are two rows, not one.

    Each `tidefs replicate` publishes like a mount, with its host and a mount id of its
    own; `status` (text and `--json`) and `top` list both, gc and verify still see
    one region b.
    """
    import socket

    from tidefs.fs.top import render
    from tidefs.fs.volume import format_volume
    from tidefs.replica.status import read_mounts

    journal = f"sqlite://{tmp_path / 'log.db'}"
    regions = [Region(n, (tmp_path / f"store-{n}").as_uri()) for n in ("a", "b")]
    format_volume(journal, "vol", regions, "a")
    with open_log(journal, "vol") as lg:
        last = lg.head() - 1  # the offset a replicate that read everything has applied

    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "tidefs.fs.cli", *args],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip

    for n in (1, 2):
        cli("replicate", "vol", "--journal", journal, "--region", "b", "--once",
            "--state-dir", str(tmp_path / f"replicate-b{n}"))  # fmt: skip
    # A report from before mounts were told apart (no host, no mount id) is a row of its own.
    with open_log(journal, status_volume("vol")) as slog:
        slog.append(json.dumps({"region": "a", "applied_offset": 0}).encode())

    mounts = read_mounts(journal, "vol")
    host = socket.gethostname()
    assert [(r, h) for r, h, _m in mounts] == [("a", ""), ("b", host), ("b", host)]
    ids = [m for r, _h, m in mounts if r == "b"]
    assert len(set(ids)) == 2 and all(ids)
    assert set(read_status(journal, "vol")) == {"a", "b"}

    status = json.loads(cli("status", "vol", "--journal", journal, "--json"))
    assert set(status) == {"a", "b"}
    assert status["b"]["applied_offset"] == last  # the region's newest report, as before
    rows = status["b"]["mounts"]
    assert sorted(r["mount_id"] for r in rows) == sorted(ids)
    assert {r["host"] for r in rows} == {host}
    assert len(status["a"]["mounts"]) == 1

    text = cli("status", "vol", "--journal", journal).splitlines()
    assert text[0].split()[-2:] == ["host", "mount"]
    assert [line.split()[0] for line in text[1:]] == ["a", "b", "b"]
    assert {line.split()[-1] for line in text[1:] if line.startswith("b")} == set(ids)

    screen = render("vol", mounts, {}, now_ns=time.time_ns())
    assert sum(line.startswith("b ") for line in screen.split("\r\n")) == 2, screen
    assert all(m in screen for m in ids)

    # gc counts region b once, at the applied offset its processes published.
    cli("replay", "vol", "--journal", journal, "--state-dir", str(tmp_path / "a"), "-q")
    gc = json.loads(
        cli("gc", "vol", "--journal", journal, "--json", "--state-dir", f"a={tmp_path / 'a'}")
    )
    assert gc["blocked"] is None and gc["applied"] == {"a": last, "b": last}


def test_gc_waits_for_the_lowest_live_mount_of_a_region(tmp_path: Path) -> None:
    """Of a region's mounts gc counts the one furthest behind, not the one that reported last.

    A mount that stops cleanly says so and no longer counts; one killed long ago
    (its newest report older than `LIVE_S`) is named and not waited for.
    """
    from tidefs.fs.volume import format_volume
    from tidefs.replica.status import LIVE_S, read_live_offsets

    journal = f"sqlite://{tmp_path / 'log.db'}"
    regions = [Region(n, (tmp_path / f"store-{n}").as_uri()) for n in ("a", "b")]
    format_volume(journal, "vol", regions, "a")
    with open_log(journal, "vol") as lg:
        head = lg.head()
    assert head >= 2

    def publisher(region: str, mount_id: str, applied: int) -> StatusPublisher:
        return StatusPublisher(
            journal, "vol", region, lambda: {"applied_offset": applied},
            interval=3600, host="h", mount_id=mount_id,
        )  # fmt: skip

    def gc() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "tidefs.fs.cli", "gc", "vol", "--journal", journal, "--json"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        result: dict[str, Any] = json.loads(out)
        return result

    a = publisher("a", "a1", head - 1)
    lagging, current = publisher("b", "b1", 0), publisher("b", "b2", head - 1)
    try:
        a.publish()
        lagging.publish()
        current.publish()  # the newest report of region b, but not its lowest
        result = gc()
        assert result["applied"] == {"a": head - 1, "b": 0}
        assert "mount b1 on host h" in result["held_by"]["b"]
        assert read_live_offsets(journal, "vol")["b"].applied_offset == 0

        lagging.stop(final=True)  # unmounted: says so, and stops counting at once
        result = gc()
        assert result["applied"]["b"] == head - 1
        assert "mount b2 on host h" in result["held_by"]["b"]
        assert result["presumed_dead"] == []

        # A mount killed long ago: its last report is old, nothing says it stopped.
        with open_log(journal, status_volume("vol")) as slog:
            old = time.time_ns() - int((LIVE_S + 60) * 1e9)
            killed = {"region": "b", "host": "h", "mount_id": "b3", "applied_offset": 0}
            slog.append(json.dumps({**killed, "published_ns": old}).encode())
        result = gc()
        assert result["applied"]["b"] == head - 1
        assert len(result["presumed_dead"]) == 1
        assert "mount b3 on host h" in result["presumed_dead"][0]
        assert "presumed killed" in result["presumed_dead"][0]
        text = subprocess.run(
            [sys.executable, "-m", "tidefs.fs.cli", "gc", "vol", "--journal", journal],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        assert "not counted: region b: mount b3 on host h" in text, text

        # With no live mount left, the region counts at its newest report, stopped or not.
        current.stop(final=True)
        offsets = read_live_offsets(journal, "vol")
        assert offsets["b"].applied_offset == head - 1
        assert "no live mount" in offsets["b"].why and "stopped" in offsets["b"].why
    finally:
        for p in (a, lagging, current):
            p.stop()
