"""`tidefs region add` validates names; `tidefs region remove` undoes a region; every region shows.

A region added by mistake (`region add v1 'c d=file:///x'` used to be accepted)
could not be undone, did not show in `status` or `verify`, and blocked `gc`
forever. Names are now checked as `format` checks them, a region can be
removed once no live block has its only copy there, and `status`, `verify` and
`gc` list every region of the volume, one that never published included.
Everything goes through the real CLI on a real log (both journals) and real
directory stores.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.mount import MountFactory
from tests.test_snapshot import BS, TIDEFS, OpsVolume, data, ops_volume, run_cli
from tidefs.journal.commands import ROOT_INODE
from tidefs.journal.log import open_log
from tidefs.replica.replica import fold_range
from tidefs.replica.status import StatusPublisher, digest_fields, knowledge_fields

__all__ = ["ops_volume"]  # the fixture, imported for these tests


@pytest.mark.parametrize(
    "spec", ["c d=file:///x", " c=file:///x", "c/d=file:///x", "c:d=file:///x", "é=file:///x"]
)
def test_region_names_are_checked_as_format_checks_them(spec: str, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'log.db'}"
    run_cli("format", "v1", "--journal", url, "--region", f"a={(tmp_path / 'a').as_uri()}")
    added = run_cli("region", "add", "v1", spec, "--journal", url, check=False)
    assert added.returncode == 2, added
    assert "invalid region name" in added.stderr and "Traceback" not in added.stderr
    with open_log(url, "v1") as lg:
        assert lg.head() == 2  # CreateVolume and EnableFeatures: nothing appended
    formatted = run_cli("format", "v2", "--journal", url, "--region", spec, check=False)
    assert formatted.returncode == 2 and "invalid region name" in formatted.stderr
    unknown = run_cli("region", "rename", "v1", "c", "--journal", url, check=False)
    assert unknown.returncode == 2 and "expected add or remove" in unknown.stderr


def publish(vol: OpsVolume, region: str) -> None:
    """Publish `region`'s status as its mount would, then its last report as it unmounts."""
    state = vol.state(region)
    publisher = StatusPublisher(
        vol.journal_url,
        vol.name,
        region,
        lambda: {
            "applied_offset": state.applied_offset(),
            **digest_fields(state),
            **knowledge_fields(),
        },
    )
    publisher.publish()
    publisher.stop(final=True)


def test_region_remove_undoes_a_region_and_every_region_is_listed(
    ops_volume: Callable[..., OpsVolume], tmp_path: Path
) -> None:
    vol = ops_volume()
    journal = vol.journal_url
    cli = ["--journal", journal, "-q"]
    d = vol.mkdir(ROOT_INODE, b"data")
    payload = data(3 * BS + 5, 1)
    vol.mkfile(d, b"only-in-b", payload, region="b")  # blocks in b's store alone
    c_url = (tmp_path / "store-c").as_uri()
    run_cli("region", "add", vol.name, f"c={c_url}", *cli)
    vol.sync("a")
    vol.sync("b")
    publish(vol, "a")
    publish(vol, "b")

    # c never published: status, verify and gc all name it.
    status = json.loads(run_cli("status", vol.name, *cli[:2], "--json").stdout)
    assert sorted(status) == ["a", "b", "c"]
    assert status["c"]["published"] is False and status["a"]["published"] is True
    text = run_cli("status", vol.name, *cli[:2]).stdout
    assert "c" in text and "never published" in text
    verify = json.loads(run_cli("verify", vol.name, *cli, "--json").stdout)
    rows = {r["region"]: r for r in verify["regions"]}
    assert sorted(rows) == ["a", "b", "c"] and verify["equal"]
    assert rows["c"]["status"] == "unchecked" and "never published" in rows["c"]["detail"]
    gc = json.loads(run_cli("gc", vol.name, *cli, "--json").stdout)
    assert gc["regions"] == ["a", "b", "c"] and "c" in gc["blocked"]
    assert "tidefs region remove" in gc["blocked"]

    # The volume was made without features (a bare CreateVolume): remove says how to enable it.
    refused = run_cli("region", "remove", vol.name, "c", *cli, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"tidefs upgrade {vol.name}" in refused.stderr
    run_cli("upgrade", vol.name, *cli)

    for name, why in (("a", "is the primary"), ("nosuch", "has no region 'nosuch'")):
        refused = run_cli("region", "remove", vol.name, name, *cli, check=False)
        assert refused.returncode == 1 and why in refused.stderr, refused
    # b holds the only copy of live blocks: refused, with the command that copies them.
    with open_log(journal, vol.name) as lg:
        head = lg.head()
    refused = run_cli("region", "remove", vol.name, "b", *cli, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused
    assert "live block(s) have their only copy in region b" in refused.stderr
    assert "tidefs replicate" in refused.stderr and "tidefs sync --data" in refused.stderr
    with open_log(journal, vol.name) as lg:
        assert lg.head() == head  # nothing appended

    # c holds nothing: it goes, and with it what blocked gc.
    removed = json.loads(run_cli("region", "remove", vol.name, "c", *cli, "--json").stdout)
    assert removed["removed"] == "c"
    vol.sync("a")
    vol.sync("b")
    publish(vol, "a")
    publish(vol, "b")
    assert [r.name for r in vol.state("a").volume().regions] == ["a", "b"]  # type: ignore[union-attr]
    status = json.loads(run_cli("status", vol.name, *cli[:2], "--json").stdout)
    assert sorted(status) == ["a", "b"]
    gc = json.loads(run_cli("gc", vol.name, *cli, "--json").stdout)
    assert gc["blocked"] is None and gc["regions"] == ["a", "b"]

    # The command the refusal named copies b's blocks to a; then b can go.
    run_cli(
        "replicate", vol.name, "--journal", journal, "--region", "a", "--once",
        "--state-dir", str(tmp_path / "replicate-a"), "--timeout", "120",
    )  # fmt: skip
    # While a process of b still runs, what it writes could have its only copy there: refused.
    running = StatusPublisher(
        journal, vol.name, "b", lambda: {"applied_offset": 0}, host="h2", mount_id="b9"
    )
    running.publish()
    refused = run_cli("region", "remove", vol.name, "b", *cli, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused
    assert "mount b9 on host h2" in refused.stderr and "tidefs umount" in refused.stderr
    running.stop(final=True)
    run_cli("region", "remove", vol.name, "b", *cli)
    vol.sync("a")
    assert [r.name for r in vol.state("a").volume().regions] == ["a"]  # type: ignore[union-attr]
    fsck = json.loads(run_cli("fsck", vol.name, *cli, "--region", "a", "--json").stdout)
    assert fsck["ok"] and fsck["blocks"] == 4


def test_a_badly_named_region_an_older_tidefs_added_can_be_removed(tmp_path: Path) -> None:
    """The log may already hold `AddRegion('c d')`: it shows everywhere and can be undone."""
    from tidefs.journal.commands import AddRegion, Region
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import State

    url = f"sqlite://{tmp_path / 'log.db'}"
    cli = ["--journal", url, "-q"]
    run_cli("format", "v1", *cli[:2], "--region", f"a={(tmp_path / 'a').as_uri()}")
    with open_log(url, "v1") as lg, State.open(tmp_path / "s") as state:
        a = Replica(lg, state, "a")
        assert a.submit(AddRegion(Region("c d", (tmp_path / "x").as_uri()))).ok
    status = json.loads(run_cli("status", "v1", *cli[:2], "--json").stdout)
    assert sorted(status) == ["a", "c d"] and not status["c d"]["published"]
    gc = json.loads(
        run_cli("gc", "v1", *cli, "--json", "--state-dir", f"a={tmp_path / 's'}").stdout
    )
    assert "c d" in gc["blocked"] and gc["regions"] == ["a", "c d"]

    removed = json.loads(run_cli("region", "remove", "v1", "c d", *cli, "--json").stdout)
    assert removed["removed"] == "c d"
    status = json.loads(run_cli("status", "v1", *cli[:2], "--json").stdout)
    assert sorted(status) == ["a"]
    with open_log(url, "v1") as lg, State.open(tmp_path / "s") as state:
        fold_range(lg, state)
    gc = json.loads(
        run_cli("gc", "v1", *cli, "--json", "--state-dir", f"a={tmp_path / 's'}").stdout
    )
    assert gc["blocked"] is None and gc["regions"] == ["a"]


def test_a_mount_and_a_replicator_of_a_removed_region_stop_changing_it(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """Once the fold removes its region, a mount refuses changes (EROFS) and still serves reads.

    `region remove` refuses while the mount runs; a RemoveRegion appended anyway
    (by an older tidefs, or with the mount silent) stops it with one log line, and
    a `tidefs replicate` of that region exits with one line.
    """
    from tidefs.journal.commands import RemoveRegion
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import State

    stores = [(n, (tmp_path / f"store-{n}").as_uri()) for n in ("a", "b")]
    m = mount_factory(regions=stores, region="b")
    (m.path / "dir").mkdir()
    (m.path / "dir" / "kept").symlink_to("target")  # metadata only: no block in b alone
    cli = ["--journal", m.journal_url]
    refused = run_cli("region", "remove", m.volume, "b", *cli, check=False)
    assert refused.returncode == 1 and "still runs 1 process(es)" in refused.stderr, refused

    replicate = subprocess.Popen(
        [*TIDEFS, "replicate", m.volume, *cli, "--region", "b",
         "--state-dir", str(tmp_path / "replicate-b")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # until the replicator has published beside the mount
            status = json.loads(run_cli("status", m.volume, *cli, "--json").stdout)
            if len(status.get("b", {}).get("mounts", [])) == 2:
                break
            assert time.monotonic() < deadline and replicate.poll() is None
            time.sleep(0.5)
        with open_log(m.journal_url, m.volume) as lg, State.open(tmp_path / "s") as state:
            fold_range(lg, state)
            assert Replica(lg, state, "a").submit(RemoveRegion("b")).ok
        _out, err = replicate.communicate(timeout=60)
    finally:
        if replicate.poll() is None:
            replicate.kill()
            replicate.wait()
    assert replicate.returncode == 0, err
    assert err.count("\n") == 1 and "region b was removed from volume" in err, err

    deadline = time.monotonic() + 30
    while "was removed from volume" not in m.log_tail(200):
        assert time.monotonic() < deadline, m.log_tail(200)
        time.sleep(0.2)
    with pytest.raises(OSError) as refused_write:
        (m.path / "new").write_bytes(b"x")
    assert refused_write.value.errno == errno.EROFS
    with pytest.raises(OSError) as refused_mkdir:
        (m.path / "dir" / "sub").mkdir()
    assert refused_mkdir.value.errno == errno.EROFS
    assert os.readlink(m.path / "dir" / "kept") == "target"  # reads still served
    assert m.log_tail(400).count("was removed from volume") == 1
