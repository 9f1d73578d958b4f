"""Regions publish their status through the journal; `tidefs status` reads it from anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tidefs.journal.commands import ROOT_INODE, CreateVolume, Mkdir, Region
from tidefs.journal.log import open_log
from tidefs.replica.replica import Replica
from tidefs.replica.state import State
from tidefs.replica.status import StatusPublisher, read_status

REGIONS = (Region("a", "file:///unused-a"), Region("b", "file:///unused-b"))


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
            lambda r=rep: {"applied_offset": r.applied, "backlog_blocks": 3},
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
    assert set(status) == {"b"}
    assert status["b"]["applied_offset"] == 0 and status["b"]["backlog_blocks"] == 0

    cli("replay", "vol", "--journal", journal, "--state-dir", str(tmp_path / "a"), "-q")
    gc = json.loads(
        cli("gc", "vol", "--journal", journal, "--json", "--state-dir", f"a={tmp_path / 'a'}")
    )
    assert gc["blocked"] is None and gc["applied"] == {"a": 0, "b": 0}
