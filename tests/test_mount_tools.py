"""Ordinary tools on a mount, on each store backend: git, tar, sqlite3, pandas.

These are the workloads the file system exists for, and each leans on a
different corner of POSIX: git on renames, hard links-free atomic replaces and
fsync; tar on modes, times, symlinks and many small files; sqlite on
overwrites in place, fsync ordering and locks; pandas/pyarrow on large
buffered writes and seeks. Every test checks its result after a remount too.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.harness.mount import TidefsMount, snapshot

pytestmark = pytest.mark.fuse


def run(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_git(store_mount: TidefsMount) -> None:
    repo = store_mount.path / "repo"
    repo.mkdir()
    run("git", "init", "-q", "-b", "main", cwd=repo)
    (repo / "README").write_text("hello\n")
    (repo / "src").mkdir()
    for i in range(20):
        (repo / "src" / f"m{i}.py").write_text(f"x = {i}\n" * (i + 1))
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", "first", cwd=repo)
    run("git", "checkout", "-q", "-b", "feature", cwd=repo)
    (repo / "README").write_text("changed on a branch\n")
    (repo / "src" / "m3.py").unlink()
    run("git", "commit", "-q", "-am", "second", cwd=repo)
    run("git", "checkout", "-q", "main", cwd=repo)
    assert (repo / "README").read_text() == "hello\n"
    assert (repo / "src" / "m3.py").exists()
    run("git", "checkout", "-q", "feature", cwd=repo)
    assert (repo / "README").read_text() == "changed on a branch\n"
    run("git", "gc", "-q", cwd=repo)
    store_mount.remount()
    assert run("git", "status", "--porcelain", cwd=repo) == ""
    run("git", "fsck", "--strict", cwd=repo)
    assert run("git", "log", "--format=%s", cwd=repo).split() == ["second", "first"]


def make_tree(base: Path) -> None:
    rng = random.Random(4)
    base.mkdir()
    for d in range(5):
        sub = base / f"dir{d}" / "deeper"
        sub.mkdir(parents=True)
        for f in range(15):
            (sub / f"file{f}").write_bytes(rng.randbytes(rng.randrange(0, 5000)))
        os.chmod(sub / "file0", 0o751)
    (base / "large").write_bytes(rng.randbytes(3 << 20))
    os.symlink("dir0/deeper/file1", base / "link")
    os.link(base / "large", base / "hardlink")
    os.utime(base / "dir1", ns=(10**18, 10**18))


def test_tar_extract_and_create(store_mount: TidefsMount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    archive = tmp_path / "a.tar"
    run("tar", "-cf", str(archive), "-C", str(tmp_path), "src", cwd=tmp_path)
    run("tar", "-xpf", str(archive), "-C", str(store_mount.path), cwd=tmp_path)
    assert snapshot(store_mount.path / "src") == snapshot(src)
    assert os.stat(store_mount.path / "src" / "dir1").st_mtime_ns == 10**18
    store_mount.remount()
    # and the other way: archive from the mount, extract locally
    back = tmp_path / "back"
    back.mkdir()
    run("tar", "-cf", str(tmp_path / "b.tar"), "-C", str(store_mount.path), "src", cwd=tmp_path)
    run("tar", "-xpf", str(tmp_path / "b.tar"), "-C", str(back), cwd=tmp_path)
    assert snapshot(back / "src") == snapshot(src)


def test_sqlite_transactions(store_mount: TidefsMount) -> None:
    path = store_mount.path / "db.sqlite"
    db = sqlite3.connect(path)
    db.execute("create table t (id integer primary key, v text)")
    for batch in range(10):
        with db:
            db.executemany(
                "insert into t (v) values (?)", [(f"row {batch}-{i}" * 5,) for i in range(200)]
            )
    try:
        with db:
            db.execute("delete from t")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    with db:
        db.execute("update t set v = 'changed' where id % 7 = 0")
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()
    store_mount.remount()
    db = sqlite3.connect(path)
    assert db.execute("select count(*) from t").fetchone() == (2000,)
    assert db.execute("select count(*) from t where v = 'changed'").fetchone() == (285,)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    # WAL mode too: another file, shared memory, checkpoints
    db.execute("pragma journal_mode=wal")
    with db:
        db.execute("create table w (x)")
        db.executemany("insert into w values (?)", [(i,) for i in range(1000)])
    db.execute("pragma wal_checkpoint(truncate)")
    assert db.execute("select sum(x) from w").fetchone() == (499500,)
    db.close()


def test_pandas_csv_and_parquet(store_mount: TidefsMount) -> None:
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "a": rng.integers(0, 1 << 40, 50_000),
            "b": rng.random(50_000),
            "c": [f"s{i % 977}" for i in range(50_000)],
        }
    )
    csv = store_mount.path / "data.csv"
    parquet = store_mount.path / "data.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(parquet)
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), df)
    smaller = df.iloc[::3].reset_index(drop=True)
    smaller.to_parquet(parquet)  # overwrite with a shorter file
    smaller.to_csv(csv, index=False)
    store_mount.remount()
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), smaller)
    pd.testing.assert_frame_equal(pd.read_csv(csv), smaller)
