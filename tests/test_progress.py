"""Progress lines: a rate only once it means something, and each plain line once."""

from __future__ import annotations

import io

import pytest

from tidefs.fs import progress
from tidefs.fs.progress import Progress


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def test_no_rate_over_a_near_zero_interval(clock: Clock) -> None:
    """A phase whose first figure is already large must not show millions per second."""
    out = io.StringIO()
    bar = Progress(2_000_000, "records folded", stream=out)
    clock.now += 1e-6
    bar.update(1_000_000)  # the first report of a phase that began earlier
    assert out.getvalue() == "records folded: 1000000/2000000 (50.0%)\n"
    clock.now += 2.5
    bar.update(1_500_000)  # 500,000 more in 2.5 s, counted from the first report
    assert out.getvalue().splitlines()[-1] == "records folded: 1500000/2000000 (75.0%, 200,000/s)"


def test_a_completed_plain_bar_prints_its_last_line_once(clock: Clock) -> None:
    out = io.StringIO()
    bar = Progress(3, "records", stream=out)
    clock.now += 0.001
    bar.update(3)
    bar.finish()
    assert out.getvalue() == "records: 3/3 (100.0%)\n"
    empty = io.StringIO()
    Progress(0, "records", stream=empty).finish()
    assert empty.getvalue() == "records: 0/0 (100.0%)\n"
