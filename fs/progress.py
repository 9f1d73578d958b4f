"""Progress reporting for long CLI operations.

On a terminal a single line is redrawn in place; otherwise (CI logs, pipes) a
plain line is printed at most every few seconds, so logs stay readable. Output
goes to stderr so that `--json` on stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIN_RATE_INTERVAL_S = 1.0
"""A rate is shown once it is measured over at least this long: over the first
microseconds a count divided by the time is noise (millions per second)."""


class Progress:
    """A progress bar for `done` out of `total` units of `what`."""

    def __init__(
        self, total: int, what: str, *, stream: TextIO | None = None, interval: float = 2.0
    ) -> None:
        self.total = max(total, 0)
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else interval
        self.started = time.monotonic()
        self._last = 0.0
        self.done = 0
        self._base: tuple[int, float] | None = None
        """(done, time) of the first update: the rate counts from there, since a bar
        may start part way (a phase that reports its first figure when already begun)."""
        self._drawn: int | None = None
        """`done` of the last plain line, so that `finish` does not print it twice."""

    def update(self, done: int) -> None:
        """Report that `done` units are complete (redraws at most every interval)."""
        self.done = done
        now = time.monotonic()
        if self._base is None:
            self._base = (done, now)
        if now - self._last >= self.interval or done >= self.total:
            self._last = now
            self._draw(final=False)

    def finish(self) -> None:
        """Draw the final state and end the line."""
        self._draw(final=True)

    def rate(self) -> float | None:
        """Units per second since the first update, or None while measured over too short a time."""
        base_done, base_time = self._base if self._base is not None else (0, self.started)
        elapsed = time.monotonic() - base_time
        if elapsed < MIN_RATE_INTERVAL_S:
            return None
        return max(self.done - base_done, 0) / elapsed

    def _draw(self, *, final: bool) -> None:
        rate = self.rate()
        speed = "" if rate is None else f", {rate:,.0f}/s"
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        if self.tty:
            width = 30
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r[{bar}] {frac:6.1%} {self.done}/{self.total} {self.what}"
            line += "" if rate is None else f" ({rate:,.0f}/s)"
            self.stream.write("\x1b[2K" + line + ("\n" if final else ""))
        else:
            if final and self._drawn == self.done:
                return  # the last update already printed this very line
            self._drawn = self.done
            self.stream.write(f"{self.what}: {self.done}/{self.total} ({frac:.1%}{speed})\n")
        self.stream.flush()
