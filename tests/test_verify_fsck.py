"""verify compares regions' digests at one offset; fsck finds and repairs damaged blocks.

Both run as the real CLI, against state directories that this process holds
open for writing (as a mount would), on real logs and real stores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Options, Rdict

from tests.harness.mount import MountFactory
from tests.test_snapshot import (  # noqa: F401 - ops_volume is a fixture
    BS,
    OpsVolume,
    churn,
    data,
    ops_volume,
    read_file,
    run_cli,
)
from tidefs.journal.commands import ROOT_INODE, SetAttr
from tidefs.journal.log import open_log
from tidefs.replica import keys as K
from tidefs.replica.blocks import block_key
from tidefs.replica.replica import fold_range
from tidefs.replica.snapshot import copy_state
from tidefs.replica.state import State
from tidefs.replica.status import StatusPublisher, read_digests


def verify(vol: OpsVolume, *args: str) -> tuple[int, dict[str, Any]]:
    out = run_cli(
        "verify", vol.name, "--journal", vol.journal_url, "--json", "-q", *args, check=False
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_verify_regions_at_different_offsets_agree(
    ops_volume: Callable[..., OpsVolume],  # noqa: F811 - the fixture imported above
) -> None:
    vol = ops_volume()
    churn(vol, 15, seed=1)
    churn_b = vol.sync("b")
    for seed in (2, 3):
        churn(vol, 10, seed=seed)
    head = vol.sync("a")
    assert vol.state("b").applied_offset() == churn_b < head  # b lags behind

    code, result = verify(
        vol,
        "--state-dir", f"a={vol.state_dir('a')}",
        "--state-dir", f"b={vol.state_dir('b')}",
        "--replay", "--deep",
    )  # fmt: skip
    assert code == 0 and result["equal"] is True
    regions = {r["region"]: r for r in result["regions"]}
    assert set(regions) == {"a", "b", "log"}
    assert regions["b"]["applied"] == churn_b and regions["b"]["offset"] == head
    assert {r["digest"] for r in regions.values()} == {vol.state("a").digest_hex()}
    # The regions' own directories were not touched.
    assert vol.state("b").applied_offset() == churn_b


def test_verify_reports_divergence_with_the_differing_keys(tmp_path: Path) -> None:
    """Two states of one name folded from logs that differ in one command, and a tampered copy."""
    urls = {"a": (tmp_path / "sa").as_uri()}
    one = OpsVolume.create(f"sqlite://{tmp_path / 'one.db'}", "vol", tmp_path / "1", urls)
    two = OpsVolume.create(f"sqlite://{tmp_path / 'two.db'}", "vol", tmp_path / "2", urls)
    try:
        for vol, name in ((one, b"same"), (two, b"same"), (one, b"x.csv"), (two, b"y.csv")):
            vol.mkdir(ROOT_INODE, name)
        one.sync()
        two.sync()
        code, result = verify(
            one, "--state-dir", f"a={one.state_dir('a')}", "--state-dir", f"b={two.state_dir('a')}"
        )
        assert code == 1 and result["equal"] is False
        whats = [d["what"] for d in result["diffs"]]
        assert "entry 'x.csv' of directory 1" in whats
        assert "entry 'y.csv' of directory 1" in whats
        entry = next(d for d in result["diffs"] if "x.csv" in d["what"])
        assert entry["values"]["b"] is None and entry["values"]["a"].startswith("inode")

        # A key changed behind the fold's back: the stored digests still agree, --deep does not.
        tampered = tmp_path / "tampered"
        copy_state(one.state_dir("a"), tampered)
        db = Rdict(str(tampered), Options(raw_mode=True))
        key = K.inode_key(ROOT_INODE)
        raw = db[key]
        assert isinstance(raw, bytes)
        attr = K.decode_attr(ROOT_INODE, raw)
        db[key] = K.encode_attr(_chown(attr))
        db.close()
        args = ["--state-dir", f"a={one.state_dir('a')}", "--state-dir", f"t={tampered}"]
        assert verify(one, *args)[0] == 0
        code, result = verify(one, *args, "--deep")
        assert code == 1
        assert [d["what"] for d in result["diffs"]] == ["attributes of inode 1"]

        text = run_cli(
            "verify", "vol", "--journal", one.journal_url, "-q", "--state-dir",
            f"a={one.state_dir('a')}", "--state-dir", f"b={two.state_dir('a')}", check=False,
        )  # fmt: skip
        assert text.returncode == 1 and "DIVERGENCE" in text.stdout and "x.csv" in text.stdout
    finally:
        one.close()
        two.close()


def _chown(attr: K.Attr) -> K.Attr:
    return K.Attr(
        attr.ino, attr.mode, 4242, attr.gid, attr.nlink, attr.size, attr.atime_ns,
        attr.mtime_ns, attr.ctime_ns, attr.rdev, attr.generation,
    )  # fmt: skip


def fsck(vol: OpsVolume, region: str, *args: str) -> tuple[int, dict[str, Any]]:
    out = run_cli(
        "fsck", vol.name, "--journal", vol.journal_url, "--region", region, "--json", "-q", *args,
        check=False,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_fsck_finds_and_repairs_corrupt_and_missing_blocks(store_url: str, tmp_path: Path) -> None:
    """Region b's store (a directory or S3) loses one block and damages another."""
    urls = {"a": (tmp_path / "sa").as_uri(), "b": store_url}
    vol = OpsVolume.create(f"sqlite://{tmp_path / 'log.db'}", "vol", tmp_path, urls)
    try:
        a_file = vol.mkfile(ROOT_INODE, b"from-a", data(3 * BS + 7, 1), region="a")
        b_file = vol.mkfile(ROOT_INODE, b"from-b", data(2 * BS + 9, 2), region="b")
        cut = vol.mkfile(ROOT_INODE, b"cut", data(3 * BS, 3), region="a")
        vol.submit(SetAttr(cut, size=BS // 2))  # now needs only its first block
        # Replicate every block both ways, as the replicators would have.
        for src, dst in (("a", "b"), ("b", "a")):
            for key in vol.stores[src].list("blocks/"):
                vol.stores[dst].put(key, vol.stores[src].get(key))
        cut_ref = vol.state().slices(cut, 0)[0]
        for region in ("a", "b"):
            for i in (1, 2):  # blocks hidden by the truncate: no reader needs them
                vol.stores[region].delete(block_key(cut_ref.slice_id, i))
        assert fsck(vol, "b") == (0, fsck(vol, "b")[1])

        a_ref = vol.state().slices(a_file, 0)[0]
        b_ref = vol.state().slices(b_file, 0)[0]
        corrupt_key = block_key(a_ref.slice_id, 2)
        raw = bytearray(vol.stores["b"].get(corrupt_key))
        raw[100] ^= 0x01
        vol.stores["b"].put(corrupt_key, bytes(raw))
        missing_key = block_key(b_ref.slice_id, 1)  # b's own write: a fault, not backlog
        vol.stores["b"].delete(missing_key)
        backlog_key = block_key(a_ref.slice_id, 0)  # a's write not copied yet: backlog
        vol.stores["b"].delete(backlog_key)

        code, result = fsck(vol, "b")
        assert code == 1 and result["ok"] is False
        assert (result["corrupt"], result["missing"], result["unreplicated"]) == (1, 1, 1)
        kinds = {p["key"]: p["kind"] for p in result["problems"]}
        assert kinds == {
            corrupt_key: "corrupt",
            missing_key: "missing",
            backlog_key: "unreplicated",
        }

        code, result = fsck(vol, "b", "--repair")
        assert code == 0 and result["repaired"] == 3
        assert fsck(vol, "b")[1]["problems"] == []
        for ino in (a_file, b_file):
            want = read_file(vol.state(), ino, {"a": vol.stores["a"], "b": vol.stores["a"]})
            assert read_file(vol.state(), ino, {"a": vol.stores["b"], "b": vol.stores["b"]}) == want
        code, quick = fsck(vol, "a", "--quick")
        assert code == 0 and quick["blocks"] == result["blocks"]

        # A block gone from every region cannot be repaired: fsck says so and fails.
        for region in ("a", "b"):
            vol.stores[region].delete(missing_key)
        code, result = fsck(vol, "a", "--repair")
        assert code == 1 and result["missing"] == 1 and result["repaired"] == 0
        assert "no repair" in result["problems"][0]["detail"]
    finally:
        vol.close()


def test_fsck_of_a_state_dir_and_a_copy_of_it(tmp_path: Path) -> None:
    """fsck reads a locked state directory read-only; a copy folds on like the original."""
    vol = OpsVolume.create(
        f"sqlite://{tmp_path / 'log.db'}", "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()}
    )
    try:
        churn(vol, 12, seed=5)
        head = vol.sync()
        code, result = fsck(vol, "a", "--state-dir", str(vol.state_dir("a")))
        assert code == 0 and result["offset"] == head and result["blocks"] > 0
        copy_state(vol.state_dir("a"), tmp_path / "copy")
        with State.open(tmp_path / "copy") as copy:
            assert copy.digest() == vol.state().digest()
            churn(vol, 3, seed=6)
            fold_range(vol.open_log(), copy)
            vol.sync()
            assert copy.digest() == vol.state().digest()
    finally:
        vol.close()


@pytest.mark.parametrize("flag", ["--state-dir", "--offset"])
def test_verify_usage_errors(flag: str, tmp_path: Path) -> None:
    vol = OpsVolume.create(
        f"sqlite://{tmp_path / 'log.db'}", "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()}
    )
    try:
        churn(vol, 3, seed=1)
        vol.sync()
        args = ["verify", "vol", "--journal", vol.journal_url, "-q"]
        # Without --state-dir, no region has published a digest here: one line, exit 1.
        if flag == "--offset":  # a region already past the offset cannot be compared there
            args += ["--state-dir", f"a={vol.state_dir('a')}", "--offset", "1"]
        out = run_cli(*args, check=False)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    finally:
        vol.close()


def replicate(vol: OpsVolume, region: str) -> None:
    """Run region's real `tidefs replicate --once`: it folds to the head and publishes its status."""
    run_cli(
        "replicate", vol.name, "--journal", vol.journal_url, "--region", region,
        "--state-dir", str(vol.tmp / f"replicator-{region}"), "--once", "--timeout", "60",
    )  # fmt: skip


def test_verify_from_the_status_log_alone(tmp_path: Path) -> None:
    """Two regions publish their digests; verify checks them with no state directory at hand.

    Region b's state is then damaged on its disk behind the fold's back; the
    next records its fold applies carry the damage into its digest, which it
    publishes, and verify names b, the offset, and the last offset b agreed at.
    """
    urls = {"a": (tmp_path / "sa").as_uri(), "b": (tmp_path / "sb").as_uri()}
    vol = OpsVolume.create(f"sqlite://{tmp_path / 'log.db'}", "vol", tmp_path, urls)
    try:
        out = run_cli("verify", "vol", "--journal", vol.journal_url, "-q", check=False)
        assert out.returncode == 1 and "no region of vol has published" in out.stderr

        churn(vol, 10, seed=1)
        replicate(vol, "b")
        b_offset = vol.sync()
        churn(vol, 6, seed=2)
        replicate(vol, "a")
        head = vol.sync()
        assert b_offset < head

        code, result = verify(vol)
        assert code == 0 and result["equal"] is True and result["source"] == "status"
        regions = {r["region"]: r for r in result["regions"]}
        assert {n: (r["status"], r["offset"]) for n, r in regions.items()} == {
            "a": ("ok", head),
            "b": ("ok", b_offset),
        }
        assert regions["a"]["digest"] == vol.state().digest_hex()
        assert result["offset"] == head

        # An older wrong report (a state since rebuilt) is listed, not a divergence.
        forged = {"applied_offset": 5, "digest_offset": 5, "digest": "00" * 32}
        pub = StatusPublisher(vol.journal_url, "vol", "a", lambda: forged)
        pub.publish()
        pub.stop()
        code, result = verify(vol)
        regions = {r["region"]: r for r in result["regions"]}
        assert code == 0 and regions["a"]["status"] == "ok"
        assert regions["a"]["earlier_mismatches"] == [5] and regions["a"]["offset"] == head

        # Damage b's own state while its replicator is stopped: root's owner changes.
        db = Rdict(str(vol.tmp / "replicator-b" / "state"), Options(raw_mode=True))
        key = K.inode_key(ROOT_INODE)
        raw = db[key]
        assert isinstance(raw, bytes)
        db[key] = K.encode_attr(_chown(K.decode_attr(ROOT_INODE, raw)))
        db.close()
        churn(vol, 3, seed=3)  # its first record changes the root directory
        replicate(vol, "b")
        replicate(vol, "a")
        head = vol.sync()

        code, result = verify(vol)
        assert code == 1 and result["equal"] is False
        regions = {r["region"]: r for r in result["regions"]}
        assert regions["a"]["status"] == "ok" and regions["a"]["offset"] == head
        b = regions["b"]
        assert b["status"] == "diverged" and b["offset"] == head
        assert b["replay_digest"] == vol.state().digest_hex() != b["digest"]
        assert (b["last_good"], b["first_bad"]) == (b_offset, head)

        text = run_cli("verify", "vol", "--journal", vol.journal_url, "-q", check=False)
        assert text.returncode == 1 and "DIVERGENCE: b" in text.stdout
        assert "--state-dir b=DIR" in text.stdout  # how to get the differing keys
        b_state = vol.tmp / "replicator-b" / "state"
        code, result = verify(vol, "--state-dir", f"b={b_state}", "--replay")
        assert code == 1 and "attributes of inode 1" in [d["what"] for d in result["diffs"]]
    finally:
        vol.close()


@pytest.mark.fuse
def test_verify_checks_live_mounts_from_their_status_reports(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """Two mounted regions publish digests while they serve; verify checks both from the journal."""
    stores = [(name, (tmp_path / f"store-{name}").as_uri()) for name in ("a", "b")]
    a = mount_factory(regions=stores, region="a")
    b = mount_factory(volume=a.volume, journal_url=a.journal_url, region="b")
    (a.path / "from-a").mkdir()
    (a.path / "from-a" / "x.txt").write_text("a")
    (b.path / "from-b.txt").write_text("b")
    for m in (a, b):
        run_cli("sync", str(m.path))
    with open_log(a.journal_url, a.volume) as lg:
        head = lg.head() - 1

    def published() -> bool:
        reports = read_digests(a.journal_url, a.volume)
        return all(reports.get(r, [(-1, "")])[-1][0] >= head for r in ("a", "b"))

    for _ in range(300):  # mounts publish every few seconds; bounded wait
        if published():
            break
        time.sleep(0.2)
    assert published(), "the mounts did not publish their digests"

    out = run_cli("verify", a.volume, "--journal", a.journal_url, "--json", "-q")
    code, result = out.returncode, json.loads(out.stdout)
    assert code == 0 and result["equal"] is True
    assert {r["region"]: (r["status"], r["offset"]) for r in result["regions"]} == {
        "a": ("ok", head),
        "b": ("ok", head),
    }
