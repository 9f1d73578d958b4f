"""The readahead window of an open file under the kernel's out-of-order read requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tidefs.fs.data import DataPath, OpenFile

MIB = 1 << 20


class _Planner(SimpleNamespace):
    """The parts of a DataPath that `_readahead` uses; it records each range it plans."""

    def __init__(self) -> None:
        super().__init__(block_size=4 * MIB, readahead_max=32 * MIB, planned=[])

    def _plan_read(self, ino: int, lo: int, hi: int) -> list[Any]:
        self.planned.append((lo, hi))
        return []


def _read(dp: _Planner, of: OpenFile, off: int, size: int = MIB) -> None:
    DataPath._readahead(dp, of, off, off + size, 1 << 30)  # type: ignore[arg-type]


def test_out_of_order_sequential_requests_keep_the_window() -> None:
    # The kernel sends several 1 MiB requests of one sequential read at once,
    # and worker threads take them in any order: the window must keep growing
    # and keep reading ahead of the furthest request, or a cold streaming read
    # waits for every block.
    dp, of = _Planner(), OpenFile(fh=1, ino=7, flags=0)
    for off in (0, 1, 3, 2, 5, 4, 6, 8, 7, 9):
        _read(dp, of, off * MIB)
    assert of.ra_window == 32 * MIB
    assert of.ra_next == 10 * MIB
    assert dp.planned[-1] == (10 * MIB, 42 * MIB)
    # Every request after the first planned ahead of the furthest one seen.
    assert len(dp.planned) == 9
    assert all(lo >= 2 * MIB for lo, _ in dp.planned)


def test_a_far_away_read_resets_the_window() -> None:
    # Random access must not pay for readahead it does not use.
    dp, of = _Planner(), OpenFile(fh=1, ino=7, flags=0)
    for off in range(4):
        _read(dp, of, off * MIB)
    planned = len(dp.planned)
    _read(dp, of, 900 * MIB)
    assert of.ra_window == 0
    assert len(dp.planned) == planned
