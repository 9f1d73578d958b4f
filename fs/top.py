"""`tidefs top`: a live terminal view of every region of a volume, refreshed every second.

It reads what `tidefs status` reads (each mount's newest report in the
`<volume>.status` log, lag computed against the metadata log's head now), so
it needs nothing but the journal URL: no metrics endpoint has to be reachable.
A region with several mounts (hosts) has a row per mount. The fallback rate
is the change of a mount's fallback reads between two refreshes. Plain ANSI
escapes, no curses; `q` (or Ctrl-C) quits.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import TextIO

from tidefs.journal.log import JournalError, Log, open_log
from tidefs.replica.status import MountKey, RegionStatus, read_mounts

CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
BOLD, RED, RESET = "\x1b[1m", "\x1b[31m", "\x1b[0m"

STALE_AFTER_S = 10.0
"""A report older than this is flagged: the region may be down (its figures are frozen)."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"  # pragma: no cover - the loop returns


def render(
    volume: str,
    regions: dict[MountKey, RegionStatus],
    rates: dict[MountKey, float],
    *,
    now_ns: int,
    error: str | None = None,
) -> str:
    """Return one screen: a header and a row per mount of every region."""
    lines = [
        f"{BOLD}tidefs top{RESET} - volume {volume} - "
        f"{time.strftime('%H:%M:%S', time.localtime(now_ns / 1e9))} - q quits",
        "",
        f"{BOLD}{'REGION':<14}{'OFFSET':>10}{'LAG REC':>9}{'LAG S':>8}{'BACKLOG':>9}"
        f"{'BYTES':>10}{'OLDEST S':>9}{'FALLBK/S':>9}{'P99 APPLY':>10}{'REPORT':>8}"
        f"  {'HOST':<16}MOUNT{RESET}",
    ]
    if not regions:
        lines.append(f"no region of volume {volume} has published its status yet")
    for key, st in sorted(regions.items()):
        age = max(0.0, (now_ns - st.published_ns) / 1e9)
        stale = age > STALE_AFTER_S
        row = (
            f"{st.region:<14}{st.applied_offset:>10}{st.lag_records:>9}{st.lag_seconds:>8.1f}"
            f"{st.backlog_blocks:>9}{_size(st.backlog_bytes):>10}{st.backlog_oldest_s:>9.1f}"
            f"{rates.get(key, 0.0):>9.1f}{st.apply_delay_p99_s * 1000:>8.1f}ms"
            f"{age:>7.0f}s  {st.host or '-':<16}{st.mount_id or '-'}"
        )
        lines.append(f"{RED}{row}{RESET}" if stale else row)
    if error:
        lines += ["", f"{RED}{error}{RESET}"]
    return "\r\n".join(lines) + "\r\n"


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[bool]:
    """Read keys one at a time without echo, if `fd` is a terminal; restore it afterwards."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, seconds: float) -> bool:
    """Wait up to `seconds` for a key; True if it was q (or the input closed)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 64)
            if not key or b"q" in key.lower():
                return True


def run_top(
    journal_url: str,
    volume: str,
    *,
    interval: float = 1.0,
    iterations: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Show every region of `volume` until `q` (or `iterations` refreshes); return the exit code."""
    out = out or sys.stdout
    try:
        mlog: Log = open_log(journal_url, volume)
    except JournalError as exc:
        print(f"tidefs top: {exc}", file=sys.stderr)
        return 1
    stdin = sys.stdin.fileno() if sys.stdin is not None and not sys.stdin.closed else None
    previous: dict[MountKey, tuple[int, int]] = {}
    rates: dict[MountKey, float] = {}
    regions: dict[MountKey, RegionStatus] = {}
    shown = 0
    try:
        with _cbreak(stdin) if stdin is not None else contextlib.nullcontext(False) as keys:
            out.write(HIDE_CURSOR)
            while iterations is None or shown < iterations:
                error = None
                try:
                    regions = read_mounts(journal_url, volume, metadata_log=mlog)
                except JournalError as exc:
                    error = f"cannot read the journal: {exc} (showing the last figures)"
                now = time.time_ns()
                for key, st in regions.items():
                    prev = previous.get(key)
                    if prev is not None and st.published_ns > prev[1]:
                        dt = (st.published_ns - prev[1]) / 1e9
                        rates[key] = max(0, st.fallback_reads - prev[0]) / dt
                    if prev is None or st.published_ns > prev[1]:
                        previous[key] = (st.fallback_reads, st.published_ns)
                out.write(CLEAR + render(volume, regions, rates, now_ns=now, error=error))
                out.flush()
                shown += 1
                if iterations is not None and shown >= iterations:
                    break
                if _wait_for_quit(stdin if keys else None, interval):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        out.write(SHOW_CURSOR + "\r\n")
        out.flush()
        mlog.close()
    return 0
