"""`tidefs region add`: a new region joins a volume, starts from a snapshot, and fills its store.

The volume is built with `OpsVolume` (real Replicas on a real log, blocks in
real directory stores); everything the new region does goes through the real
CLI in subprocesses, and its files are read through a real FUSE mount.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness.mount import MountFactory
from tests.test_snapshot import BS, OpsVolume, data, ops_volume, run_cli
from tidefs.journal.commands import ROOT_INODE
from tidefs.replica.snapshot import create_snapshot

__all__ = ["ops_volume"]  # the fixture, imported for these tests


@contextmanager
def stores_away(*dirs: Path) -> Iterator[None]:
    """Move directory stores out of reach for a while, so that nothing can be read from them."""
    for d in dirs:
        d.rename(d.with_name(d.name + ".away"))
    try:
        yield
    finally:
        for d in dirs:
            if d.exists():  # a store opened meanwhile may have made an empty one
                shutil.rmtree(d)
            d.with_name(d.name + ".away").rename(d)


def test_region_add_bootstraps_from_a_snapshot_and_replicates(
    ops_volume: Callable[..., OpsVolume], mount_factory: MountFactory, tmp_path: Path
) -> None:
    """A region added to a volume with files serves every byte from its own store and agrees."""
    vol = ops_volume()
    journal = vol.journal_url
    d = vol.mkdir(ROOT_INODE, b"data")
    expected: dict[str, bytes] = {}
    inodes: dict[str, int] = {}
    for i in range(6):
        payload = data(BS * (i % 3 + 1) + 123 * i, i)
        inodes[f"f{i}"] = vol.mkfile(d, b"f%d" % i, payload, region="ab"[i % 2])
        expected[f"f{i}"] = payload
    lg = vol.open_log()
    snap, _ = create_snapshot(lg, vol.stores, volume=vol.name, region="a", work_dir=tmp_path)

    # After the snapshot: an overwrite from b, then the new region, then a file from a.
    patch = data(BS // 2, 99)
    vol.write(inodes["f0"], 100, patch, region="b")
    f0 = bytearray(expected["f0"])
    f0[100 : 100 + len(patch)] = patch
    expected["f0"] = bytes(f0)
    c_url = (tmp_path / "store-c").as_uri()
    added = json.loads(
        run_cli("region", "add", vol.name, f"c={c_url}", "--journal", journal, "--json").stdout
    )
    assert (added["region"], added["store_url"]) == ("c", c_url)
    expected["late"] = data(2 * BS + 7, 100)
    vol.mkfile(d, b"late", expected["late"], region="a")
    head = vol.sync("a")
    assert vol.sync("b") == head
    assert vol.state("a").volume().region("c") is not None  # type: ignore[union-attr]

    # The replicator of c starts its own state from a's snapshot and copies every block.
    proc = run_cli(
        "-v", "replicate", vol.name, "--journal", journal, "--region", "c", "--once",
        "--state-dir", str(tmp_path / "replicate-c"), "--timeout", "120",
    )  # fmt: skip
    assert f"starts from the snapshot at offset {snap.offset} of region a" in proc.stderr
    fsck = json.loads(
        run_cli("fsck", vol.name, "--journal", journal, "--region", "c", "--json").stdout
    )
    assert fsck["ok"] and fsck["blocks"] > 0
    assert (fsck["missing"], fsck["corrupt"], fsck["unreplicated"]) == (0, 0, 0)

    # The replicate-only region published its status: status and gc both see it.
    status = json.loads(run_cli("status", vol.name, "--journal", journal, "--json").stdout)
    assert status["c"]["applied_offset"] == head and status["c"]["backlog_blocks"] == 0
    gc = json.loads(
        run_cli(
            "gc", vol.name, "--journal", journal, "--json",
            "--state-dir", f"a={vol.state_dir('a')}", "--state-dir", f"b={vol.state_dir('b')}",
        ).stdout
    )  # fmt: skip
    assert gc["blocked"] is None and gc["applied"]["c"] == head

    # A mount of c with an empty state directory starts from the snapshot too, and with
    # the stores of a and b out of reach, reads every file from c's own store.
    m = mount_factory(volume=vol.name, journal_url=journal, region="c", extra=["--no-replicate"])
    assert f"starts from the snapshot at offset {snap.offset}" in m.log_path.read_text()
    with stores_away(tmp_path / "store-a", tmp_path / "store-b"):
        assert sorted(p.name for p in (m.path / "data").iterdir()) == sorted(expected)
        for name, payload in expected.items():
            assert (m.path / "data" / name).read_bytes() == payload, name

    # Every region's state, and a replay of the log, agree.
    proc = run_cli(
        "verify", vol.name, "--journal", journal, "--replay", "--json",
        "--state-dir", f"a={vol.state_dir('a')}", "--state-dir", f"b={vol.state_dir('b')}",
        "--state-dir", f"c={m.state_dir}",
    )  # fmt: skip
    verdict = json.loads(proc.stdout)
    assert verdict["equal"] and verdict["offset"] == head
    assert {r["region"] for r in verdict["regions"]} == {"a", "b", "c", "log"}


def test_region_add_refuses_a_duplicate_name_and_an_unknown_volume(tmp_path: Path) -> None:
    """Refusals are one line with exit code 1, and append nothing."""
    journal = f"sqlite://{tmp_path / 'log.db'}"
    vol = OpsVolume.create(journal, "vol", tmp_path, {"a": (tmp_path / "store-a").as_uri()})
    try:
        head = vol.open_log().head()
        c_url = (tmp_path / "store-c").as_uri()
        for volume, spec, message in (
            ("vol", f"a={c_url}", "volume vol already has a region 'a'"),
            ("nope", f"c={c_url}", "volume nope does not exist"),
            ("vol", "c=s3://bucket/p?endpoint=http://127.0.0.1:9", "is not reachable"),
        ):
            proc = run_cli("region", "add", volume, spec, "--journal", journal, "-q", check=False)
            assert proc.returncode == 1, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert message in proc.stderr
        assert vol.open_log().head() == head
        assert (
            run_cli("region", "add", "vol", "c", "--journal", journal, check=False).returncode == 2
        )
        run_cli("region", "add", "vol", f"c={c_url}", "--journal", journal, "-q")
        again = run_cli("region", "add", "vol", f"c={c_url}", "--journal", journal, check=False)
        assert again.returncode == 1 and "already has a region 'c'" in again.stderr
        assert vol.open_log().head() == head + 1
    finally:
        vol.close()
