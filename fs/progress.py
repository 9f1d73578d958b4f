"""Progress reporting for long CLI operations.

On a terminal a single line is redrawn in place; otherwise (CI logs, pipes) a
plain line is printed at most every few seconds, so logs stay readable. Output
goes to stderr so that `--json` on stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


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

    def update(self, done: int) -> None:
        """Report that `done` units are complete (redraws at most every interval)."""
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval or done >= self.total:
            self._last = now
            self._draw(final=False)

    def finish(self) -> None:
        """Draw the final state and end the line."""
        self._draw(final=True)

    def _draw(self, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        if self.tty:
            width = 30
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r[{bar}] {frac:6.1%} {self.done}/{self.total} {self.what} ({rate:,.0f}/s)"
            self.stream.write(line + ("\n" if final else ""))
        else:
            self.stream.write(
                f"{self.what}: {self.done}/{self.total} ({frac:.1%}, {rate:,.0f}/s)\n"
            )
        self.stream.flush()
