"""The `tidefs` command line as a user runs it: a process of its own, its output captured."""

from __future__ import annotations

import os
import subprocess
import sys

TIDEFS = [sys.executable, "-m", "tidefs.fs.cli"]


def tidefs_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `tidefs *args` with `env` added to this environment; never raises on its exit code.

    Its stdin is empty, so a command that would wait for input fails instead.
    """
    return subprocess.run(
        [*TIDEFS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
