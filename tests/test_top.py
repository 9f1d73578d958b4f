"""`tidefs top` under a real pseudo-terminal: both regions on screen, lag shown, `q` quits."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tidefs.journal.commands import ROOT_INODE, CreateVolume, Mkdir, Region
from tidefs.journal.log import open_log
from tidefs.replica.replica import Replica
from tidefs.replica.state import State
from tidefs.replica.status import StatusPublisher

REGIONS = (Region("east", "file:///unused-east"), Region("west", "file:///unused-west"))
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def read_until(fd: int, proc: subprocess.Popen[bytes], pattern: re.Pattern[bytes]) -> bytes:
    """Read the terminal until the screen (without escapes) matches `pattern` or 60 s pass."""
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if pattern.search(ANSI.sub(b"", out)):
                return out
    raise AssertionError(f"screen never matched {pattern.pattern!r}:\n{ANSI.sub(b'', out)!r}")


def test_top_shows_every_region_and_quits_on_q(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    reps = {
        name: Replica(open_log(url, "vol"), State.open(tmp_path / name), name)
        for name in ("east", "west")
    }
    try:
        east, west = reps["east"], reps["west"]
        east.submit(CreateVolume(name="vol", regions=REGIONS, primary="east"))
        west.wait_applied(0, timeout=30)
        for i in range(7):  # west does not fold these: it is 7 records behind
            east.submit(Mkdir(ROOT_INODE, b"d%d" % i, 0o40755, 0, 0))
        west_pub = StatusPublisher(url, "vol", "west", lambda: {"applied_offset": 0})
        west_pub.publish()
        # east has read nothing from another region yet; its fold's apply delay p99 is 250 ms.
        east_report: dict[str, Any] = {
            "applied_offset": 7,
            "fallback_reads": 0,
            "apply_delay_p99_s": 0.25,
        }
        east_pub = StatusPublisher(url, "vol", "east", east_report.copy)
        east_pub.publish()
    finally:
        for rep in reps.values():
            rep.state.close()
            rep.log.close()

    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidefs.fs.cli", "top", "vol", "--journal", url],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        start_new_session=True,
    )
    os.close(secondary)
    try:
        screen = read_until(primary, proc, re.compile(rb"east.*\n.*west", re.S))
        text = ANSI.sub(b"", screen).decode()
        rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
        assert rows["east"][1:3] == ["7", "0"], text  # offset 7, no lag
        assert rows["west"][1:3] == ["0", "7"], text  # offset 0, 7 records behind
        # The fallback rate and the apply delay p99 of each region are on the screen.
        assert "FALLBK/S" in text and "P99 APPLY" in text, text
        assert rows["east"][7:9] == ["0.0", "250.0ms"], text
        # A newer report with 40 more fallback reads: east's fallback rate becomes positive.
        east_report["fallback_reads"] = 40
        east_pub.publish()
        screen = read_until(primary, proc, re.compile(rb"east +7 +0 .* [1-9][0-9.]* +250\.0ms"))
        text = ANSI.sub(b"", screen).decode()
        rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
        assert float(rows["east"][7]) > 0, text
        os.write(primary, b"q")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
        east_pub.stop()
        west_pub.stop()
