"""O_APPEND in the fold: an append lands where the log puts it, and costs one small key.

`CommitSlice(append=True)` is placed at the end of the file as the fold finds
it at the command's log position, identically in every region; a slice that
crosses a chunk boundary is recorded once per chunk, the later parts showing
the same blocks from further on (`skip`). Every slice is one state key, so
recording a write never rewrites what earlier writes left.
"""

from __future__ import annotations

import errno as E
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidefs.journal import features
from tidefs.journal.commands import (
    ROOT_INODE,
    CommitSlice,
    CompactChunk,
    CreateVolume,
    Envelope,
    Mknod,
    Region,
    SetAttr,
    SliceRef,
    inode_for_offset,
)
from tidefs.replica import keys as K
from tidefs.replica.fold import fold_record
from tidefs.replica.state import State, StateError

CHUNK = 16
BLOCK = 4
T0 = 1_000_000_000_000
FILE = inode_for_offset(2)


def _volume() -> list[tuple[int, Envelope]]:
    create = CreateVolume("v", (Region("a", "file:///a"),), "a", chunk_size=CHUNK, block_size=BLOCK)
    return [
        (0, Envelope(create, "a", T0)),
        (1, Envelope(features.enable_all(), "a", T0)),  # appends are a feature of schema v2
        (2, Envelope(Mknod(ROOT_INODE, b"log", stat.S_IFREG | 0o644, 0, 0), "a", T0 + 1)),
    ]


def _append(sid: int, data: bytes) -> CommitSlice:
    return CommitSlice(FILE, 0, SliceRef(sid, 0, len(data), BLOCK, "a"), append=True)


class _Reader:
    """The fold's read access to a State's database."""

    def __init__(self, state: State) -> None:
        self.state = state

    def get(self, key: bytes) -> bytes | None:
        value = self.state._db.get(key)
        return None if value is None else bytes(value)

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.state._scan(lo, hi)


def _read(state: State, ino: int, blocks: dict[int, bytes]) -> bytes:
    """Reassemble a file from its slices and the bytes of each slice id (the blocks, joined)."""
    attr = state.getattr(ino)
    assert attr is not None
    out = bytearray(attr.size)
    for chunk in state.chunks(ino):
        for s in state.slices(ino, chunk):  # oldest first: later ones overlay
            at = chunk * CHUNK + s.offset
            out[at : at + s.length] = blocks[s.slice_id][s.skip : s.skip + s.length]
    return bytes(out)


def test_appends_land_in_log_order_whatever_the_writers_believed(tmp_path: Path) -> None:
    """Two regions' appends, interleaved in the log, follow one another: none overwrites."""
    lines = {10 + i: f"line {i:02d}\n".encode() for i in range(8)}  # 8 bytes each
    recs = _volume()
    for n, (sid, data) in enumerate(lines.items()):
        recs.append((3 + n, Envelope(_append(sid, data), "ab"[n % 2], T0 + 2 + n)))
    digests = []
    for name, batch in (("one", len(recs)), ("two", 1)):
        with State.open(tmp_path / name) as state:
            for i in range(0, len(recs), batch):
                assert all(o.ok for o in state.apply(recs[i : i + batch]).outcomes)
            assert _read(state, FILE, lines) == b"".join(lines.values())
            digests.append(state.digest())
    assert digests[0] == digests[1]


def test_an_append_across_a_chunk_boundary_is_split_with_a_skip(tmp_path: Path) -> None:
    blocks = {7: b"0123456789", 8: b"abcdefghijkl"}
    recs = [
        *_volume(),
        (3, Envelope(_append(7, blocks[7]), "a", T0 + 2)),
        (4, Envelope(_append(8, blocks[8]), "b", T0 + 3)),
    ]
    with State.open(tmp_path / "s") as state:
        assert all(o.ok for o in state.apply(recs).outcomes)
        assert state.slices(FILE, 0) == [
            SliceRef(7, 0, 10, BLOCK, "a"),
            SliceRef(8, 10, 6, BLOCK, "a", skip=0),
        ]
        assert state.slices(FILE, 1) == [SliceRef(8, 0, 6, BLOCK, "a", skip=6)]
        attr = state.getattr(FILE)
        assert attr is not None and attr.size == 22
        assert _read(state, FILE, blocks) == b"0123456789abcdefghijkl"
        # A truncate into the second part cuts it and keeps its skip.
        state.apply([(5, Envelope(SetAttr(FILE, size=19), "a", T0 + 4))])
        assert state.slices(FILE, 1) == [SliceRef(8, 0, 3, BLOCK, "a", skip=6)]
        assert _read(state, FILE, blocks) == b"0123456789abcdefghi"
        # Compaction of chunk 1 compares the slice ids it read, as for any slice.
        compact = CompactChunk(FILE, 1, (8,), SliceRef(9, 0, 3, BLOCK, "a"))
        [done] = state.apply([(6, Envelope(compact, "a", T0 + 5))]).outcomes
        assert done.ok
        assert state.slices(FILE, 1) == [SliceRef(9, 0, 3, BLOCK, "a")]
        assert state.recompute_digest() == state.digest()


def test_an_append_longer_than_what_is_left_of_several_chunks(tmp_path: Path) -> None:
    """The file ends 2 bytes short of a chunk boundary: a 16-byte append takes two chunks."""
    blocks = {1: b"x" * 14, 2: bytes(range(65, 81))}
    recs = [
        *_volume(),
        (3, Envelope(_append(1, blocks[1]), "a", T0 + 2)),
        (4, Envelope(_append(2, blocks[2]), "a", T0 + 3)),
    ]
    with State.open(tmp_path / "s") as state:
        state.apply(recs)
        assert [s.skip for c in state.chunks(FILE) for s in state.slices(FILE, c)] == [0, 0, 2]
        assert _read(state, FILE, blocks) == blocks[1] + blocks[2]


def test_an_append_names_no_place_of_its_own(tmp_path: Path) -> None:
    """chunk_index and offset must be 0: the place is the fold's to decide."""
    bad = [
        CommitSlice(FILE, 1, SliceRef(5, 0, 4, BLOCK, "a"), append=True),
        CommitSlice(FILE, 0, SliceRef(5, 2, 4, BLOCK, "a"), append=True),
        CommitSlice(FILE, 0, SliceRef(5, 0, CHUNK + 1, BLOCK, "a"), append=True),
    ]
    with State.open(tmp_path / "s") as state:
        state.apply(_volume())
        for i, cmd in enumerate(bad):
            [outcome] = state.apply([(3 + i, Envelope(cmd, "a", T0))]).outcomes
            assert outcome.errno == E.EINVAL
        assert state.chunks(FILE) == []


def test_a_commit_writes_one_small_key_not_the_chunks_slice_list(tmp_path: Path) -> None:
    """Writing a log line by line costs the same per line: no value grows with the chunk."""
    with State.open(tmp_path / "s") as state:
        state.apply(_volume())
        sizes = []
        for i in range(12):
            offset = 3 + i
            env = Envelope(_append(100 + i, b"z"), "a", T0 + offset)
            folded = fold_record(_Reader(state), offset - 1, offset, env)
            written = {k: v for k, v in folded.writes.items() if k[:1] == K.TAG_CHUNK}
            assert list(written) == [K.slice_key(FILE, 0, offset)]
            sizes.append(sum(len(v or b"") for v in written.values()))
            state.apply([(offset, env)])
        assert len(set(sizes)) == 1
        assert [s.slice_id for s in state.slices(FILE, 0)] == list(range(100, 112))


def test_a_state_of_the_previous_key_format_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    with State.open(tmp_path / "s") as state:
        state.apply(_volume())
        state._db.put(K.META_FORMAT, K.encode_u32(K.FORMAT_VERSION - 1))
    with pytest.raises(
        StateError,
        match=r"key format 2; this tidefs reads format 3: replay it into a new directory",
    ):
        State.open(tmp_path / "s")
