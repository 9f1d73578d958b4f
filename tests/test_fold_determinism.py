"""The fold is deterministic, exactly-once and crash-atomic (invariants 1-3).

- Separate state directories folding the same records in different batch
  sizes hold the same digest at every offset they share, and the same keys.
- Re-delivered records change nothing; a retried request id takes effect once.
- The incremental digest equals a recomputation from every live key, and
  changes whenever a key or value does.
- A fold process killed with SIGKILL at random moments always restarts from
  an exact offset whose digest is the uninterrupted fold's digest there, and
  reaches the same final state.
"""

from __future__ import annotations

import functools
import pickle
import random
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tidefs.journal.commands import (
    ROOT_INODE,
    CommitSlice,
    CompactChunk,
    CreateVolume,
    Envelope,
    Link,
    Mkdir,
    Mknod,
    Noop,
    Outcome,
    Reclaim,
    Region,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    SliceRef,
    Symlink,
    Unlink,
    inode_for_offset,
)
from tidefs.replica import keys as K
from tidefs.replica.state import State, StateError, StateLockedError

CHUNK = 64
BLOCK = 16
WINDOW = 40  # small, so that outcome trimming happens many times in these runs
T0 = 1_700_000_000_000_000_000
Records = list[tuple[int, Envelope]]


@functools.lru_cache(maxsize=8)
def records(n: int, seed: int, *, gaps: bool = False) -> Records:
    """A reproducible mix of mostly valid commands, some invalid, some retried.

    Commands are chosen against a scratch state that folds them as they are
    made, so that most name something that exists. With `gaps`, offsets skip
    values now and then, as Kafka's do.
    """
    rng = random.Random(seed)
    out: Records = []
    dirs = [ROOT_INODE]
    files: list[int] = []
    names = [b"a", b"b", b"c", b"d", b"e", b"f", b"g"]
    offset = -1
    with tempfile.TemporaryDirectory() as tmp, State.open(tmp, outcome_window=WINDOW) as scratch:

        def live(inodes: list[int]) -> list[int]:
            inodes[:] = [i for i in inodes if scratch.getattr(i) is not None]
            return inodes

        def pick_dir() -> int:
            return rng.choice(live(dirs)) if rng.random() < 0.95 else rng.choice(files or dirs)

        def pick_file() -> int:
            return rng.choice(live(files) or dirs) if rng.random() < 0.95 else 10**6

        def pick_entry() -> tuple[int, bytes]:
            parent = pick_dir()
            listed = [n for _c, n, _i in scratch.readdir(parent)]
            return parent, rng.choice(listed) if listed and rng.random() < 0.85 else rng.choice(
                names
            )

        create = CreateVolume(
            "v", (Region("r", "file:///r"),), "r", chunk_size=CHUNK, block_size=BLOCK
        )
        while len(out) < n:
            offset += rng.choice((1, 1, 1, 2, 5)) if gaps and out else 1
            t = T0 + offset * 1_000
            r = rng.random()
            rid = rng.randbytes(16)
            cmd: Any
            if not out:
                cmd = create
            elif r < 0.05:
                _o, old = rng.choice(out)  # a retry: the same command and request id again
                cmd, rid = old.command, old.request_id
            elif r < 0.15:
                cmd = Mkdir(pick_dir(), rng.choice(names), 0o755, 1000, 1000)
            elif r < 0.32:
                cmd = Mknod(pick_dir(), rng.choice(names), stat.S_IFREG | 0o644, 1000, 1000)
            elif r < 0.50:
                off = rng.randrange(CHUNK)
                s = SliceRef(rng.getrandbits(62), off, rng.randint(1, CHUNK - off), BLOCK, "r")
                if rng.random() < 0.3:  # an append: the fold places (and maybe splits) it
                    cmd = CommitSlice(pick_file(), 0, replace(s, offset=0), append=True)
                else:
                    cmd = CommitSlice(pick_file(), rng.randrange(3), s)
            elif r < 0.60:
                flags = rng.choice((0, 0, 0, 1, 2))
                cmd = Rename(*pick_entry(), *pick_entry(), flags)
            elif r < 0.65:
                cmd = Unlink(*pick_entry())
            elif r < 0.69:
                cmd = Rmdir(*pick_entry())
            elif r < 0.73:
                cmd = Link(pick_file(), pick_dir(), rng.choice(names))
            elif r < 0.76:
                cmd = Symlink(pick_dir(), rng.choice(names), b"t" * rng.randint(1, 9), 0, 0)
            elif r < 0.84:
                cmd = SetAttr(pick_file(), size=rng.choice((None, 0, 10, 70, 150)), mode=0o600)
            elif r < 0.89:
                cmd = SetXattr(pick_file(), b"user.x", rng.randbytes(4), rng.choice((0, 1, 2)))
            elif r < 0.93:
                orphans = scratch.orphans()
                cmd = Reclaim(rng.choice(orphans) if orphans else pick_file())
            elif r < 0.97:
                ino = pick_file()
                now = scratch.slices(ino, 0)
                expected = tuple(x.slice_id for x in now) if rng.random() < 0.8 else (1,)
                cmd = CompactChunk(
                    ino, 0, expected, SliceRef(rng.getrandbits(62), 0, 8, BLOCK, "r")
                )
            else:
                cmd = Noop("tick")
            rec = (offset, Envelope(cmd, "r", t, rid))
            [outcome] = scratch.apply([rec]).outcomes
            if outcome.ok and outcome.offset == offset and isinstance(cmd, Mkdir):
                dirs.append(outcome.inode)
            if outcome.ok and outcome.offset == offset and isinstance(cmd, Mknod):
                files.append(outcome.inode)
            out.append(rec)
    return out


def fold(path: Path, recs: Records, batch: int) -> dict[int, bytes]:
    """Fold `recs` in batches of `batch`; return the digest after each batch, by offset."""
    digests: dict[int, bytes] = {}
    with State.open(path, outcome_window=WINDOW) as state:
        for i in range(0, len(recs), batch):
            result = state.apply(recs[i : i + batch])
            assert result.applied_offset == recs[min(i + batch, len(recs)) - 1][0]
            digests[state.applied_offset()] = state.digest()
    return digests


def snapshot(path: Path) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Return (applied offset, digest, every live key and value) of a closed state directory."""
    with State.open(path, read_only=True) as state:
        dump = list(state.dump())
        assert state.digest() == K.digest_of(dump), "incremental digest != recomputed digest"
        return state.applied_offset(), state.digest(), dump


@pytest.mark.parametrize("gaps", [False, True], ids=["dense", "gaps"])
def test_batch_sizes_agree_at_every_common_offset(tmp_path: Path, gaps: bool) -> None:
    recs = records(1500, seed=7, gaps=gaps)
    runs = {b: fold(tmp_path / f"b{b}", recs, b) for b in (1, 7, 100, len(recs))}
    ones = runs[1]
    assert len(ones) == len(recs)
    for size, digests in runs.items():
        for offset, digest in digests.items():
            assert digest == ones[offset], f"batch size {size} differs at offset {offset}"
    dumps = [snapshot(tmp_path / f"b{b}") for b in runs]
    assert all(d == dumps[0] for d in dumps)
    # The mix really exercised the fold: some of everything, trimming included.
    with State.open(tmp_path / "b1", read_only=True) as state:
        live = dumps[0][2]
        tags = {k[:1] for k, _v in live}
        assert {K.TAG_DIRENT, K.TAG_CHUNK, K.TAG_XATTR, K.TAG_SYMLINK} <= tags
        gens = {K.read_u64(k, 1) for k, _v in live if k[:1] == K.TAG_OUTCOME}
        last = recs[-1][0] // WINDOW
        assert gens <= {last, last - 1}  # older outcome generations were dropped
        assert state.outcome(recs[0][1].request_id) is None
        assert state.outcome(recs[-1][1].request_id) is not None


def test_every_single_record_keeps_the_digest_exact(tmp_path: Path) -> None:
    """After each record, the incremental digest equals one recomputed from scratch."""
    recs = records(400, seed=3)
    with State.open(tmp_path / "s", outcome_window=WINDOW) as state:
        for rec in recs:
            state.apply([rec])
            assert state.digest() == state.recompute_digest(), f"after offset {rec[0]}"


def test_redelivered_records_change_nothing(tmp_path: Path) -> None:
    recs = records(600, seed=11)
    with State.open(tmp_path / "s", outcome_window=WINDOW) as state:
        state.apply(recs[:500])
        before = (state.applied_offset(), state.digest(), list(state.dump()))
        rng = random.Random(5)
        for _ in range(20):
            i = rng.randrange(500)
            result = state.apply(recs[i : i + rng.randint(1, 50)][: 500 - i])
            assert result.skipped == len(result.outcomes)
            assert not result.changed_inodes and not result.changed_entries
        assert (state.applied_offset(), state.digest(), list(state.dump())) == before
        # A batch that straddles the applied offset applies only what is new.
        result = state.apply(recs[450:600])
        assert result.skipped == 50 and result.applied_offset == recs[599][0]
    fold(tmp_path / "ref", recs, 600)
    assert snapshot(tmp_path / "s") == snapshot(tmp_path / "ref")


def test_a_retried_request_takes_effect_once(tmp_path: Path) -> None:
    create = CreateVolume("v", (Region("r", "u"),), "r", chunk_size=CHUNK, block_size=BLOCK)
    mkdir = Envelope(Mkdir(ROOT_INODE, b"d", 0o755, 0, 0), "r", T0, b"m" * 16)
    f = inode_for_offset(1)
    write = Envelope(CommitSlice(f, 0, SliceRef(9, 0, 4, BLOCK, "r")), "r", T0, b"w" * 16)
    with State.open(tmp_path / "s", outcome_window=WINDOW) as state:
        state.apply([(0, Envelope(create, "r", T0))])
        state.apply([(1, Envelope(Mknod(1, b"f", 0o644, 0, 0), "r", T0))])
        first = state.apply([(2, mkdir), (3, write)]).outcomes
        assert first == [Outcome(0, inode_for_offset(2), 2), Outcome(0, 0, 3)]
        digest = state.digest()
        # Retried at later offsets, in one batch and alone: the stored outcomes come back.
        again = state.apply([(4, mkdir), (5, write)]).outcomes
        assert again == first
        assert [n for _c, n, _i in state.readdir(ROOT_INODE)].count(b"d") == 1
        assert state.slices(f, 0) == [SliceRef(9, 0, 4, BLOCK, "r")]
        assert state.getattr(f).size == 4  # type: ignore[union-attr]
        assert state.digest() == digest  # a recognised retry changes no key at all
        assert state.outcome(mkdir.request_id) == first[0]
        # Two windows later the outcome is gone and a retry is a new command.
        late_offset = 2 * WINDOW + 1  # offset 2 * WINDOW opened generation 2: 0 went
        noops = [(o, Envelope(Noop(), "r", T0)) for o in range(6, late_offset)]
        state.apply(noops)
        assert state.outcome(mkdir.request_id) is None
        late = state.apply([(late_offset, mkdir)]).outcomes[0]
        assert late.errno != 0 and late.offset == late_offset  # EEXIST: it ran again


def test_a_record_delivered_twice_in_one_batch_gets_its_outcome_twice(tmp_path: Path) -> None:
    create = CreateVolume("v", (Region("r", "u"),), "r")
    mkdir = Envelope(Mkdir(ROOT_INODE, b"d", 0o755, 0, 0), "r", T0)
    with State.open(tmp_path / "s", outcome_window=4) as state:
        # Offset 4 opens a new outcome generation inside the batch.
        batch = [(0, Envelope(create, "r", T0))]
        batch += [(o, Envelope(Noop(), "r", T0)) for o in (1, 2, 3)]
        result = state.apply([*batch, (4, mkdir), (4, mkdir), (2, batch[2][1])])
        assert result.outcomes[4] == result.outcomes[5] == Outcome(0, inode_for_offset(4), 4)
        assert result.outcomes[6] == Outcome(0, 0, 2) and result.skipped == 2


def test_the_digest_sees_every_key_and_value(tmp_path: Path) -> None:
    fold(tmp_path / "s", records(300, seed=2), 50)
    _offset, digest, dump = snapshot(tmp_path / "s")
    assert digest == K.digest_of(dump)
    rng = random.Random(1)
    for i in rng.sample(range(len(dump)), 40):
        key, value = dump[i]
        changed_value = [*dump[:i], (key, value + b"\0"), *dump[i + 1 :]]
        changed_key = [*dump[:i], (key + b"\0", value), *dump[i + 1 :]]
        moved_byte = [*dump[:i], (key[:-1], key[-1:] + value), *dump[i + 1 :]]
        dropped = dump[:i] + dump[i + 1 :]
        for variant in (changed_value, changed_key, moved_byte, dropped):
            assert K.digest_of(variant) != digest
    # Order of keys does not matter; the empty state has the all-zero digest.
    assert K.digest_of(reversed(dump)) == digest
    assert K.digest_of([]) == K.EMPTY_DIGEST


def test_states_that_differ_have_different_digests(tmp_path: Path) -> None:
    recs = records(200, seed=4)
    fold(tmp_path / "a", recs, 200)
    chmod = [(recs[-1][0] + 1, Envelope(SetAttr(ROOT_INODE, mode=0o700), "r", T0, b"c" * 16))]
    fold(tmp_path / "b", recs + chmod, 201)
    with State.open(tmp_path / "a", outcome_window=WINDOW) as state:
        # The same offset and request id, but another mode: the digests must part.
        other = [(chmod[0][0], Envelope(SetAttr(ROOT_INODE, mode=0o711), "r", T0, b"c" * 16))]
        state.apply(other)
    assert snapshot(tmp_path / "a")[1] != snapshot(tmp_path / "b")[1]


# -- crash atomicity --------------------------------------------------------------------

CHILD = """
import pickle, sys
from tidefs.replica.state import State
records = pickle.load(open(sys.argv[1], "rb"))
batch = int(sys.argv[3])
with State.open(sys.argv[2], outcome_window=int(sys.argv[4])) as state:
    applied = state.applied_offset()
    todo = [r for r in records if r[0] > applied]
    print(applied, flush=True)
    for i in range(0, len(todo), batch):
        state.apply(todo[i : i + batch])
        print(state.applied_offset(), flush=True)
print("done", flush=True)
"""


def test_a_killed_fold_restarts_at_an_exact_offset_and_converges(tmp_path: Path) -> None:
    recs = records(6000, seed=13)
    reference = fold(tmp_path / "ref", recs, 1)
    final = snapshot(tmp_path / "ref")
    data = tmp_path / "records.pickle"
    data.write_bytes(pickle.dumps(recs))
    target = tmp_path / "crashed"
    argv = [sys.executable, "-c", CHILD, str(data), str(target), "3", str(WINDOW)]
    rng = random.Random(99)
    starts: list[int] = []
    kills = 0
    for _attempt in range(6):
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        starts.append(int(child.stdout.readline()))
        if kills < 5:
            # Let it fold a while, then kill it wherever it happens to be.
            for _ in range(rng.randint(1, 150)):
                child.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.005))
        if kills < 5 and child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            kills += 1
            # Whatever the moment, the state is exactly as it was after some offset.
            offset, digest, dump = snapshot(target)
            assert offset == -1 or digest == reference[offset]
            assert K.digest_of(dump) == digest
            continue
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0 and out.strip().endswith("done")
        break
    assert kills == 5, "a run finished before it could be killed"
    assert starts == sorted(starts)  # no restart ever went back
    assert len(set(starts)) > 3 and starts[-1] < recs[-1][0]
    assert snapshot(target) == final


# -- the state directory ----------------------------------------------------------------


def test_a_checkpoint_folds_on_to_the_same_state(tmp_path: Path) -> None:
    """A snapshot (RocksDB checkpoint) plus the rest of the log equals the whole log."""
    recs = records(600, seed=21)
    fold(tmp_path / "ref", recs, 100)
    with State.open(tmp_path / "live", outcome_window=WINDOW) as state:
        state.apply(recs[:250])
        state.checkpoint(tmp_path / "snap")
    with State.open(tmp_path / "snap", outcome_window=WINDOW) as restored:
        assert restored.applied_offset() == recs[249][0]
        restored.apply(recs)  # the first 250 are skipped as re-delivered
    assert snapshot(tmp_path / "snap") == snapshot(tmp_path / "ref")


def test_one_writer_per_state_directory(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with State.open(path) as state:
        with pytest.raises(StateLockedError, match="already open for writing"):
            State.open(path)
        probe = (
            "import sys\n"
            "from tidefs.replica.state import State, StateLockedError\n"
            "try:\n"
            "    State.open(sys.argv[1])\n"
            "except StateLockedError as exc:\n"
            "    print('locked', exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.startswith("locked") and str(path) in out.stdout
        # Readers are not locked out, and see what was applied when they opened.
        state.apply(records(5, seed=1))
        with State.open(path, read_only=True) as reader:
            assert reader.applied_offset() == 4 and reader.volume() is not None
            with pytest.raises(StateError):
                reader.apply(records(6, seed=1))
    with State.open(path) as again:  # closing released the lock
        assert again.applied_offset() == 4
    with pytest.raises(StateError):
        State.open(tmp_path / "missing", read_only=True)
