"""gc deletes only blocks that no state inside the retention window, or behind any region, needs.

The property test writes random histories (creates, writes, overwrites,
truncates, unlinks, snapshots, a lagging second region, and gc runs at
controlled times) and checks after every gc that every block of every slice
live at any protected offset is still stored, and at the end that gc did
collect what nothing needs. The CLI tests cover the dry run, the region whose
offset is unknown, blocks whose command never landed, and SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.test_snapshot import (
    BS,
    CHUNK,
    OpsVolume,
    data,
    kill_during,
    run_cli,
    timed_run,
)
from tidefs.journal.commands import ROOT_INODE, CommitSlice, Mknod, Reclaim, SetAttr, Unlink
from tidefs.replica.blocks import block_key, parse_block_key
from tidefs.replica.fetch import blocks_needed
from tidefs.replica.gc import apply_gc, plan_gc
from tidefs.replica.replica import fold_range
from tidefs.replica.restore import window_start
from tidefs.replica.snapshot import create_snapshot
from tidefs.replica.state import State
from tidefs.replica.status import StatusPublisher

T0 = 1_700_000_000_000_000_000
SECOND = 1_000_000_000
RETENTION_S = 30

ops = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 3 * BS)),
    st.tuples(st.just("write"), st.integers(0, 10**6), st.integers(0, 2 * CHUNK), st.integers(1, 2 * BS)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.integers(0, 2 * CHUNK)),
    st.tuples(st.just("unlink"), st.integers(0, 10**6)),
    st.tuples(st.just("tick"), st.integers(1, 2 * RETENTION_S)),
    st.tuples(st.just("sync_b"), st.floats(0, 1)),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("gc")),
)  # fmt: skip


def live_blocks(state: State) -> set[str]:
    """The keys of every block that the state's live slices show."""
    return {
        block_key(ref.slice_id, i)
        for _ino, _chunk, ref in state.iter_live_slices()
        for i in range(blocks_needed(ref))
    }


def stored(vol: OpsVolume, region: str = "a") -> set[str]:
    return set(vol.stores[region].list("blocks/"))


def slice_ids(keys: set[str]) -> set[int]:
    return {parse_block_key(k)[0] for k in keys}


def live_slices(state: State) -> set[int]:
    """Every slice id the state references (gc keeps all blocks of each, cut or not)."""
    return {ref.slice_id for _ino, _chunk, ref in state.iter_live_slices()}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(ops, min_size=5, max_size=30))
@example([("create", BS), ("sync_b", 1.0), ("truncate", 0, 0), ("tick", 99), ("gc",)])
@example([("create", BS), ("truncate", 0, 0), ("sync_b", 1.0), ("gc",)])
@example([("create", BS), ("snapshot",), ("unlink", 0), ("gc",), ("tick", 99), ("gc",)])
def test_gc_never_deletes_a_block_needed_inside_the_window(history: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="tidefs-gc-test-") as tmp_name:
        tmp = Path(tmp_name)
        urls = {"a": (tmp / "sa").as_uri(), "b": (tmp / "sb").as_uri()}
        vol = OpsVolume.create(
            f"sqlite://{tmp / 'log.db'}", "vol", tmp, urls, retention_s=RETENTION_S, timestamp_ns=T0
        )
        try:
            run_history(vol, tmp, history)
        finally:
            vol.close()


def run_history(vol: OpsVolume, tmp: Path, history: list[tuple[Any, ...]]) -> None:
    clock = T0
    needed: dict[int, set[str]] = {0: set()}  # offset -> blocks the state there shows
    files: list[int] = []
    lg = vol.open_log()
    b = State.open(tmp / "state-b")
    try:

        def submit(command: object) -> None:
            nonlocal clock
            clock += SECOND
            out = vol.replica("a").submit(command, timestamp_ns=clock)  # type: ignore[arg-type]
            assert out.ok, (command, out)
            offset = vol.state("a").applied_offset()
            needed[offset] = live_blocks(vol.state("a"))

        def gc(now: int) -> None:
            applied = {"a": vol.state("a").applied_offset(), "b": b.applied_offset()}
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                plan = plan_gc(
                    lg, dict(vol.stores), volume="vol", applied=applied, work_dir=work, now_ns=now,
                    mtime_cutoff_ns=time.time_ns() + 3600 * SECOND,
                )  # fmt: skip
            assert plan.blocked is None
            apply_gc(vol.stores, plan)
            first = window_start(lg, RETENTION_S, now)
            protect = min(first - 1, applied["b"])
            have = stored(vol)
            for offset, keys in needed.items():
                if offset >= protect:
                    assert keys <= have, f"gc deleted {sorted(keys - have)[:3]} needed at {offset}"
            assert live_blocks(b) <= have

        for op in history:
            kind = op[0]
            if kind == "create" or (not files and kind in ("write", "truncate", "unlink")):
                clock += SECOND
                name = b"f%d" % len(needed)
                out = vol.replica("a").submit(
                    Mknod(ROOT_INODE, name, 0o100644, 0, 0), timestamp_ns=clock
                )
                files.append(out.inode)
                needed[vol.state("a").applied_offset()] = live_blocks(vol.state("a"))
                if kind == "create" and op[1]:
                    ref = vol.upload("a", data(op[1], len(needed)))
                    submit(CommitSlice(files[-1], 0, ref))
            elif kind == "write":
                ino = files[op[1] % len(files)]
                pos, size = op[2], op[3]
                chunk, within = divmod(pos, CHUNK)
                size = min(size, CHUNK - within)
                submit(CommitSlice(ino, chunk, vol.upload("a", data(size, len(needed)), within)))
            elif kind == "truncate":
                submit(SetAttr(files[op[1] % len(files)], size=op[2]))
            elif kind == "unlink":
                ino = files.pop(op[1] % len(files))
                name = next(n for _c, n, i in vol.state("a").readdir(ROOT_INODE) if i == ino)
                submit(Unlink(ROOT_INODE, name))
                submit(Reclaim(ino))  # as a mount does once no one holds the file open
            elif kind == "tick":
                clock += op[1] * SECOND
            elif kind == "sync_b":
                head = vol.state("a").applied_offset()
                fold_range(
                    lg, b, to_offset=b.applied_offset() + int(op[1] * (head - b.applied_offset()))
                )
            elif kind == "snapshot":
                create_snapshot(lg, vol.stores, volume="vol", region="a", work_dir=tmp)
            elif kind == "gc":
                gc(clock)

        # Once the window has passed and b caught up, gc keeps exactly what the head shows.
        fold_range(lg, b)
        clock += (RETENTION_S + 10) * SECOND
        gc(clock)
        assert slice_ids(stored(vol)) == live_slices(vol.state("a"))
    finally:
        b.close()


def test_gc_cli_dry_run_apply_unknown_regions_and_grace(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'log.db'}"
    urls = {"a": (tmp_path / "sa").as_uri(), "b": (tmp_path / "sb").as_uri()}
    vol = OpsVolume.create(url, "vol", tmp_path, urls, retention_s=1)
    try:
        f = vol.mkfile(ROOT_INODE, b"f", data(3 * BS, 1))
        vol.write(f, 0, data(3 * BS, 2))
        dropped = vol.state().slices(f, 0)
        vol.submit(SetAttr(f, size=0))  # both slices leave the state
        vol.write(f, 0, data(BS, 3))
        overwritten = {block_key(ref.slice_id, i) for ref in dropped for i in range(3)}
        g = vol.mkfile(ROOT_INODE, b"g", data(2 * BS, 4))
        gone = {block_key(ref.slice_id, i) for ref in vol.state().slices(g, 0) for i in range(2)}
        vol.submit(Unlink(ROOT_INODE, b"g"))
        vol.submit(Reclaim(g))
        vol.sync("a")
        time.sleep(1.2)  # the retention window passes
        day_ago = time.time() - 86400
        for key in stored(vol):  # the blocks written so far are a day old
            os.utime(tmp_path / "sa" / key, (day_ago, day_ago))
        stray = vol.upload("a", data(BS, 5))  # uploaded now, its command never appended
        stray_key = block_key(stray.slice_id, 0)
        vol.submit(SetAttr(f, mtime=1))  # one record inside the window
        live = live_blocks(vol.state())
        base = ["gc", "vol", "--journal", url, "-q", "--json"]

        # Region b published nothing: nothing may go.
        out = json.loads(run_cli(*base, "--state-dir", f"a={vol.state_dir('a')}").stdout)
        assert out["blocked"] and "b" in out["blocked"] and out["garbage_blocks"] == 0
        refused = run_cli(*base, "--apply", "--state-dir", f"a={vol.state_dir('a')}", check=False)
        assert refused.returncode == 1 and "published no applied offset" in refused.stderr

        # b publishes its offset through the status log; a is named by its directory.
        b = vol.replica("b")
        vol.sync("b")
        StatusPublisher(url, "vol", "b", lambda: {"applied_offset": b.applied}).publish()
        args = [*base, "--state-dir", f"a={vol.state_dir('a')}"]
        out = json.loads(run_cli(*args, "--grace", "2d").stdout)
        assert out["blocked"] is None and out["garbage"] == []
        assert out["young_kept"] == len(overwritten | gone | {stray_key})
        out = json.loads(run_cli(*args).stdout)  # the default grace: an hour
        assert out["young_kept"] == 1
        args += ["--grace", "1h"]
        out = json.loads(run_cli(*args).stdout)
        assert out["blocked"] is None and out["dry_run"]
        assert {g["key"] for g in out["garbage"]} == overwritten | gone
        assert stored(vol) >= overwritten | gone | {stray_key}  # a dry run deletes nothing
        out = json.loads(run_cli(*args, "--grace", "0").stdout)
        assert {g["key"] for g in out["garbage"]} == overwritten | gone | {stray_key}

        out = json.loads(run_cli(*args, "--apply").stdout)
        assert out["applied_deletes"] == len(overwritten | gone)
        assert stored(vol) == live | {stray_key}
        # Without -q, --apply shows its progress on stderr; stdout stays JSON.
        loud = run_cli(*[a for a in args if a != "-q"], "--apply", "--grace", "0s")
        assert json.loads(loud.stdout)["applied_deletes"] == 1
        assert "blocks deleted: 1/1" in loud.stderr, loud.stderr
        assert stored(vol) == live
        text = run_cli("gc", "vol", "--journal", url, "--state-dir", f"a={vol.state_dir('a')}")
        assert "no garbage" in text.stdout
    finally:
        vol.close()


def test_gc_survives_sigkill(tmp_path: Path) -> None:
    """gc killed while deleting, then run again, deletes all the garbage and nothing else."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    vol = OpsVolume.create(url, "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()}, retention_s=1)
    try:
        rng = random.Random(3)
        files = [vol.mkfile(ROOT_INODE, b"f%d" % i, data(BS, i)) for i in range(10)]
        for i in range(120):  # three blocks each
            vol.write(rng.choice(files), rng.randrange(0, CHUNK - 3 * BS), data(3 * BS, 100 + i))
        for i, f in enumerate(files):  # drop every slice so far, then write one more
            vol.submit(SetAttr(f, size=0))
            vol.write(f, 0, data(BS, 1000 + i))
        vol.sync()
        time.sleep(1.2)
        vol.submit(SetAttr(files[0], mtime=1))
        live = live_blocks(vol.state())
        before = stored(vol)
        garbage = before - live
        assert len(garbage) > 300
        args = ["gc", "vol", "--journal", url, "-q", "--apply", "--grace", "0"]
        args += ["--state-dir", f"a={vol.state_dir('a')}", "--work-dir", str(tmp_path)]
        took = timed_run(
            "gc", "vol", "--journal", url, "-q", "--state-dir", f"a={vol.state_dir('a')}"
        )
        killed = 0
        for attempt in range(4):
            if attempt % 2 == 0:
                # Kill once this run has deleted a few blocks.
                count = len(stored(vol))
                target = rng.randrange(1, 40)

                def deleting(c: int = count, t: int = target) -> bool:
                    return len(stored(vol)) <= c - t

                code = kill_during(args, 60.0, deleting)
            else:
                code = kill_during(args, rng.uniform(0.2, 0.8) * took)
            killed += code is None
            assert live <= stored(vol)
        assert killed >= 3 and len(stored(vol)) < len(before)  # killed while deleting
        run_cli(*args)
        assert slice_ids(stored(vol)) == live_slices(vol.state())
        assert live <= stored(vol)
    finally:
        vol.close()
