"""The log, replay and digest commands, run as a user runs them: the real CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidefs.journal import codec
from tidefs.journal.commands import (
    CommitSlice,
    CreateVolume,
    Envelope,
    Mkdir,
    Mknod,
    Region,
    Rename,
    SliceRef,
)
from tidefs.journal.log import open_log

TIDEFS = [sys.executable, "-m", "tidefs.fs.cli"]
T0 = 1_700_000_000_000_000_000


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*TIDEFS, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tidefs {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def history() -> list[Envelope]:
    """A small volume history: a tree, a file written twice, a rename."""
    cmds = [
        CreateVolume(name="vol", regions=(Region("a", "file:///tmp/a"),), primary="a"),
        Mkdir(parent=1, name=b"data", mode=0o40755, uid=0, gid=0),
        Mknod(parent=3, name=b"x.csv", mode=0o100644, uid=0, gid=0),
        CommitSlice(inode=4, chunk_index=0, slice=SliceRef(11, 0, 100, 4096, "a")),
        Rename(parent=3, name=b"x.csv", new_parent=1, new_name=b"y.csv"),
        CommitSlice(inode=4, chunk_index=0, slice=SliceRef(12, 50, 100, 4096, "a")),
    ]
    return [
        Envelope(command=c, origin="a", timestamp_ns=T0 + i * 1_000_000_000)
        for i, c in enumerate(cmds)
    ]


@pytest.fixture
def filled_journal(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    with open_log(url, "vol") as lg:
        for env in history():
            lg.append(codec.encode(env), env.timestamp_ns)
    return url


def test_log_json_lists_every_record_decoded(filled_journal: str) -> None:
    out = run("log", "vol", "--journal", filled_journal, "--json").stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["offset"] for r in rows] == list(range(6))
    assert [r["command"] for r in rows] == [
        "CreateVolume", "Mkdir", "Mknod", "CommitSlice", "Rename", "CommitSlice",
    ]  # fmt: skip
    assert rows[4]["fields"]["new_name"] == "y.csv"
    assert rows[3]["fields"]["slice"]["length"] == 100
    assert all(r["region"] == "a" for r in rows)


def test_log_from_and_limit(filled_journal: str) -> None:
    out = run("log", "vol", "--journal", filled_journal, "--from", "2", "--limit", "2", "--json")
    assert [json.loads(line)["offset"] for line in out.stdout.splitlines()] == [2, 3]
    text = run("log", "vol", "--journal", filled_journal).stdout
    assert "Rename" in text and "y.csv" in text


def test_replay_then_digest_agree_and_rewind_to_an_offset(
    filled_journal: str, tmp_path: Path
) -> None:
    full = json.loads(
        run(
            "replay",
            "vol",
            "--journal",
            filled_journal,
            "--state-dir",
            str(tmp_path / "s1"),
            "--json",
        ).stdout
    )
    assert full["offset"] == 5
    dig = json.loads(run("digest", "--state-dir", str(tmp_path / "s1"), "--json").stdout)
    assert dig == {"offset": 5, "digest": full["digest"], "volume": "vol"}

    # Point in time: rewind to before the rename, by offset and by time.
    by_offset = json.loads(
        run("replay", "vol", "--journal", filled_journal, "--state-dir", str(tmp_path / "s2"),
            "--to-offset", "3", "--json").stdout
    )  # fmt: skip
    assert by_offset["offset"] == 3
    assert by_offset["digest"] != full["digest"]
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((T0 + 3_500_000_000) / 1e9))
    by_time = json.loads(
        run("replay", "vol", "--journal", filled_journal, "--state-dir", str(tmp_path / "s3"),
            "--to-time", when, "--json").stdout
    )  # fmt: skip
    assert by_time == by_offset

    # Folding the rest of the log onto the rewound state reaches the full digest.
    rest = json.loads(
        run(
            "replay",
            "vol",
            "--journal",
            filled_journal,
            "--state-dir",
            str(tmp_path / "s2"),
            "--json",
        ).stdout
    )
    assert rest["digest"] == full["digest"]


def test_replay_refuses_to_go_backwards(filled_journal: str, tmp_path: Path) -> None:
    state = str(tmp_path / "s")
    run("replay", "vol", "--journal", filled_journal, "--state-dir", state, "-q")
    proc = run("replay", "vol", "--journal", filled_journal, "--state-dir", state,
               "--to-offset", "2", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "empty directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_replay_stops_at_a_record_from_the_future(filled_journal: str, tmp_path: Path) -> None:
    with open_log(filled_journal, "vol") as lg:
        lg.append(b"\xc3\x01" + bytes(8) + b"\x00", T0)
    state = str(tmp_path / "s")
    proc = run("replay", "vol", "--journal", filled_journal, "--state-dir", state, check=False)
    assert proc.returncode == 1
    assert "offset 6" in proc.stderr
    dig = json.loads(run("digest", "--state-dir", state, "--json").stdout)
    assert dig["offset"] == 5  # everything before the bad record, nothing after


@pytest.mark.parametrize(
    "args, message",
    [
        (["log", "vol", "--journal", "mysql://x/y"], "unsupported journal URL"),
        (["digest", "--state-dir", "/nonexistent/tidefs/state"], "no state directory"),
        (["replay", "vol", "--journal", "sqlite:///log.db", "--state-dir", "s", "--to-time", "soon"], "ISO 8601"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    proc = run(*args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_and_usage_errors() -> None:
    assert "replay" in run("--help").stdout
    assert run("log", check=False).returncode == 2


def test_a_missing_volume_is_named_and_fails(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    """`status`, `log` and `top` of a volume never formatted: one line naming it, exit 1.

    Nothing is created on the way: no SQLite file where none was, no Kafka topic.
    """
    with open_log(journal_url, journal_volume) as lg:
        for env in history():
            lg.append(codec.encode(env), env.timestamp_ns)
    missing = journal_volume + "-missing"
    for command in ("status", "log", "top"):
        proc = run(command, missing, "--journal", journal_url, check=False)
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"no volume {missing!r}" in lines[0], proc.stderr
    assert run("status", journal_volume, "--journal", journal_url).returncode == 0

    if journal_url.startswith("sqlite:"):
        nowhere = tmp_path / "none.db"
        proc = run("log", "vol", "--journal", f"sqlite://{nowhere}", check=False)
        assert proc.returncode == 1 and "no volume 'vol'" in proc.stderr
        assert f"{nowhere} does not exist" in proc.stderr
        assert not nowhere.exists()
    else:
        from confluent_kafka.admin import AdminClient

        topics = AdminClient({"bootstrap.servers": journal_url.removeprefix("kafka://")})
        assert f"tidefs.{missing}.log" not in topics.list_topics(timeout=30).topics


def _option(args: list[str]) -> str:
    """The option an argument list gets wrong: its last one."""
    return [a.split("=")[0] for a in args if a.startswith("--")][-1]


@pytest.mark.parametrize(
    "args",
    [
        ["mount", "vol", "mnt", "--journal", "sqlite:///TMP/x.db", "--region", "a", "--metrics-port", "99999"],
        ["mount", "vol", "mnt", "--journal", "sqlite:///TMP/x.db", "--region", "a", "--store-timeout", "0"],
        ["replicate", "vol", "--journal", "sqlite:///TMP/x.db", "--region", "a", "--metrics-port", "0"],
        ["replicate", "vol", "--journal", "sqlite:///TMP/x.db", "--region", "a", "--concurrency", "0"],
        ["log", "vol", "--journal", "sqlite:///TMP/x.db", "--limit", "-3"],
        ["log", "vol", "--journal", "sqlite:///TMP/x.db", "--from", "-5"],
        ["sync", "mnt", "--timeout", "-1"],
        ["umount", "mnt", "--timeout", "-1"],
        ["top", "vol", "--journal", "sqlite:///TMP/x.db", "--interval", "0"],
        ["top", "vol", "--journal", "sqlite:///TMP/x.db", "--interval", "nan"],
        ["top", "vol", "--journal", "sqlite:///TMP/x.db", "--iterations", "0"],
        ["replay", "vol", "--journal", "sqlite:///TMP/x.db", "--state-dir", "s", "--to-offset", "-1"],
        ["format", "vol", "--journal", "sqlite:///TMP/x.db", "--region", "a=file:///TMP/s", "--retention=-1d"],
        ["format", "vol", "--journal", "sqlite:///TMP/x.db", "--region", "a=file:///TMP/s", "--block-size", "inf"],
        ["restore", "vol", "--journal", "sqlite:///TMP/x.db", "--path", "/a", "--to", "/b", "--offset", "-1"],
        ["fsck", "vol", "--journal", "sqlite:///TMP/x.db", "--region", "a", "--jobs", "0"],
        ["gc", "vol", "--journal", "sqlite:///TMP/x.db", "--show", "-1"],
    ],
    ids=lambda args: args[0] + _option(args),
)  # fmt: skip
def test_out_of_range_arguments_are_usage_errors(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each is refused by the parser, naming the option (the last one), exit 2, touching nothing."""
    monkeypatch.chdir(tmp_path)
    # TMP is a directory that does not exist: even a parser that let the value through
    # would create nothing on its way to failing.
    proc = run(*(a.replace("/TMP/", f"{tmp_path}/j/") for a in args), check=False)
    assert proc.returncode == 2, proc.stderr
    option = _option(args)
    assert f"error: argument {option}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_log_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`tidefs log | head -1`: no "Broken pipe" message, the exit status of a tool SIGPIPE ends."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    with open_log(url, "vol") as lg:
        envs = history()
        lg.append_many([(codec.encode(env), env.timestamp_ns) for env in envs])
        more = [
            Envelope(Mkdir(parent=1, name=b"d%05d" % i, mode=0o40755, uid=0, gid=0), "a", T0)
            for i in range(3000)  # far more than a pipe's buffer holds
        ]
        lg.append_many([(codec.encode(env), env.timestamp_ns) for env in more])
    proc = subprocess.Popen(
        [*TIDEFS, "log", "vol", "--journal", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert b"CreateVolume" in first
    proc.stdout.close()  # what `head -1` does once it has its line
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert err == "" and code == 128 + 13, (code, err)

    shell = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {' '.join(TIDEFS)} log vol --journal {url} | head -1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shell.stderr == "" and shell.stdout.count("\n") == 1
    assert shell.returncode == 141  # as `seq 1 1000000 | head -1` under pipefail


def test_urls_with_four_slashes_name_plain_paths(tmp_path: Path) -> None:
    """sqlite:////dir/log.db and file:////dir are /dir/...: messages never print //dir."""
    from tidefs.replica.store import FileStore

    missing = tmp_path / "nodir" / "log.db"
    proc = run(
        "replay", "vol", "--journal", f"sqlite:///{missing}", "--state-dir",
        str(tmp_path / "s"), check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and f"journal directory {missing.parent} does not exist" in (
        proc.stderr
    )
    assert "//" not in proc.stderr.replace("sqlite:///", ""), proc.stderr
    store = FileStore.from_url(f"file:///{tmp_path / 'store'}")
    try:
        assert str(store.root) == str(tmp_path / "store")
    finally:
        store.close()
