"""A time set explicitly after a write wins, as on Linux: cp -p, cp -a, tar -x, touch.

Writes are buffered in the mount and committed later (fsync, close, a timer),
and the commit of written bytes marks mtime. A `utimensat`/`futimens` that
comes after the write but before its commit must still be the last word on
the file's times: make, rsync and backup tools compare them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.mount import TidefsMount

pytestmark = pytest.mark.fuse

T_2001 = 981_158_400 * 10**9  # 2001-02-03 00:00:00 UTC
T_1999 = 915_148_800 * 10**9 + 123_456_789


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "TZ": "UTC"})


def mtimes(paths: list[Path]) -> list[int]:
    return [os.stat(p).st_mtime_ns for p in paths]


def test_touch_after_write_on_an_open_file_wins(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "held"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"data\n")  # buffered: not committed before the close
        run("touch", "-d", "2001-02-03", str(p))
        assert os.stat(p).st_mtime_ns == T_2001
        os.write(fd, b"more\n")  # a write after the time set marks mtime again
        assert os.stat(p).st_mtime_ns > T_2001
        os.utime(fd, ns=(T_1999, T_1999))  # futimens
        assert os.stat(p).st_mtime_ns == T_1999
    finally:
        os.close(fd)
    assert os.stat(p).st_mtime_ns == T_1999
    assert p.read_bytes() == b"data\nmore\n"
    tidefs_mount.remount()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (T_1999, T_1999)
    assert p.read_bytes() == b"data\nmore\n"


def test_cp_preserve_and_tar_keep_times(tidefs_mount: TidefsMount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "s").write_bytes(b"data\n")
    (src / "big").write_bytes(os.urandom(300_000))  # several blocks
    (src / "empty").write_bytes(b"")
    for name in ("s", "big", "empty"):
        os.utime(src / name, ns=(T_1999, T_2001))
    names = ["s", "big", "empty"]
    mnt = tidefs_mount.path

    run("cp", "-p", str(src / "s"), str(mnt / "x"))
    run("cp", "-a", str(src), str(mnt / "a"))
    run("tar", "-cf", str(tmp_path / "t.tar"), "-C", str(src), ".")
    (mnt / "t").mkdir()
    run("tar", "-xf", str(tmp_path / "t.tar"), "-C", str(mnt / "t"))

    def check() -> None:
        assert os.stat(mnt / "x").st_mtime_ns == T_2001
        for d in ("a", "t"):
            assert mtimes([mnt / d / n for n in names]) == [T_2001] * 3, d
            for n in names:
                assert (mnt / d / n).read_bytes() == (src / n).read_bytes()

    check()
    tidefs_mount.remount()
    check()
