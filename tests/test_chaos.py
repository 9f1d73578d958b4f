"""A short run of every chaos scenario, and the checker catching what it must catch.

Each scenario mounts a fresh volume in two regions, runs the recorded
workload, injects its fault, heals it and checks the invariants: nothing
acknowledged lost, nothing duplicated, no wrong bytes read, equal digests,
every block in every region (see `chaos/`). The scenarios share one Kafka
broker and one S3 endpoint (`chaos.harness.Services`). Longer runs are
`python -m chaos run --seconds N`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.checker import check
from chaos.harness import Services
from chaos.history import (
    APPEND_LOG,
    FAIL,
    OK,
    UNKNOWN,
    History,
    Lineage,
    Op,
    append_line,
    op_id_of,
    value,
)
from chaos.proxy import DROP, REFUSE, TcpProxy
from chaos.scenarios import SCENARIOS, Context, Scenario, run_scenario
from tests.harness.mount import fuse_available

SECONDS = 4.0
"""Workload time per scenario in the suite: a third before, during and after the fault."""


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with Services(tmp_path_factory.mktemp("chaos-services")) as s:
        yield s


def _param(name: str) -> object:
    """Every fault on the Kafka journal in the default tier; the SQLite variants are slow."""
    marks = [pytest.mark.fuse, pytest.mark.s3]
    if SCENARIOS[name].journal == "kafka":
        marks.append(pytest.mark.kafka)
    else:
        marks.append(pytest.mark.slow)
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.timeout(600)  # a loaded 2-core machine: set-up, fault, heal and convergence
@pytest.mark.parametrize("name", [_param(n) for n in SCENARIOS])
def test_scenario_keeps_the_invariants(name: str, services: Services, tmp_path: Path) -> None:
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    result = run_scenario(SCENARIOS[name], services, tmp_path, seconds=SECONDS)
    if result.skipped:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} cannot run: {result.skipped}")
        pytest.skip(result.skipped)
    v = result.verdict
    assert v.problems == [], f"seed {result.seed}: {v.problems}\n" + "\n".join(result.notes)
    assert result.convergence_s is not None
    assert len(set(result.digests.values())) == 1, result.digests
    assert v.acknowledged > 0 and v.reads > 0, "the workload must have run"
    assert v.reads_wrong == 0 and v.lost == 0


@pytest.mark.fuse
@pytest.mark.s3
def test_a_run_that_loses_or_invents_a_write_fails(services: Services, tmp_path: Path) -> None:
    """The pipeline is not vacuous: files removed or added behind the workload's back fail it."""
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")

    def lose_a_write(ctx: Context) -> None:
        history = ctx.workload.history
        acked = [op for op in history.writes("a") if op.kind == "put" and op.status == OK]
        assert acked, "the workload acknowledged nothing before the fault"
        victim = acked[0].path
        with contextlib.suppress(FileNotFoundError):  # a later rename may have moved it
            os.unlink(ctx.cluster.path("b") / victim)
        # And a value that no operation of the history wrote.
        (ctx.cluster.path("b") / "w-a" / "phantom").write_bytes(value("z1"))

    def nothing(ctx: Context) -> None:
        pass

    saboteur = Scenario("saboteur", "a write lost on purpose", lose_a_write, nothing, "sqlite")
    result = run_scenario(saboteur, services, tmp_path, seconds=3)
    assert not result.ok
    assert any("phantom" in p for p in result.verdict.problems), result.verdict.problems
    assert result.verdict.lost > 0


# -- the checker itself: a history it must reject --------------------------------------


def _op(history: History, lineage: Lineage, op: Op, status: str) -> None:
    if op.kind == "put":
        lineage.put(op.path, op.op_id)
    elif op.kind == "rename":
        lineage.move(op.path, op.target)
    history.invoke(op).status = status


def _history() -> tuple[History, Lineage]:
    h, lin = History(), Lineage()
    _op(h, lin, Op("a1", "a", "put", "w-a/f1"), OK)
    _op(h, lin, Op("a2", "a", "put", "w-a/f2"), OK)
    _op(h, lin, Op("a3", "a", "rename", "w-a/f2", "w-a/r3"), OK)
    _op(h, lin, Op("a4", "a", "put", "w-a/f4"), UNKNOWN)
    _op(h, lin, Op("a5", "a", "put", "w-a/f5"), FAIL)
    _op(h, lin, Op("a6", "a", "unlink", "w-a/f1"), UNKNOWN)
    return h, lin


def test_checker_accepts_every_outcome_of_unknown_operations() -> None:
    h, lin = _history()
    for tree in (
        {"w-a/r3": "a2"},
        {"w-a/r3": "a2", "w-a/f1": "a1", "w-a/f4": "a4"},
        {"w-a/r3": "a2", "w-a/f1": "a1"},
    ):
        assert check(h, lin, {"a": tree}).problems == []


def test_checker_rejects_lost_duplicated_and_phantom_writes() -> None:
    h, lin = _history()
    lost = {"w-a/f1": "a1"}  # the acknowledged rename's result is missing
    dup = {"w-a/r3": "a2", "w-a/f2": "a2"}  # the renamed value still at its source too
    phantom = {"w-a/r3": "a2", "w-a/f5": "a5"}  # a failed put appeared
    for tree in (lost, dup, phantom):
        v = check(h, lin, {"a": tree})
        assert v.problems and v.lost > 0, tree


def test_checker_rejects_wrong_bytes_read() -> None:
    h, lin = _history()
    read = h.invoke(Op("a-read1", "a", "read", "w-a/f1"))
    read.status, read.seen = OK, "a2"  # a2 was never at w-a/f1
    v = check(h, lin, {"a": {"w-a/r3": "a2"}})
    assert v.reads_wrong == 1


def test_checker_rejects_a_stale_read_at_the_writing_region() -> None:
    h, lin = _history()
    put = h.ops[0]  # a1 at w-a/f1, acknowledged
    put.end = put.start + 1
    for region, seen, stale in (("a", "", True), ("a", "a1", False), ("b", "", False)):
        h2 = History(ops=[put])
        read = h2.invoke(Op(f"{region}-read", region, "read", "w-a/f1"))
        read.start, read.end = put.end + 1, put.end + 2
        read.status, read.seen = OK, seen
        v = check(h2, lin, {})
        assert (v.reads_wrong == 1) == stale, (region, seen)


def _appends() -> History:
    h = History()
    for op_id, region, status in (
        ("a-append1", "a", OK),
        ("b-append1", "b", OK),
        ("a-append2", "a", UNKNOWN),
        ("b-append2", "b", FAIL),
        ("a-append3", "a", OK),
    ):
        h.invoke(Op(op_id, region, "append", APPEND_LOG)).status = status
    return h


def test_checker_accepts_appends_in_any_interleaving_with_unknown_ones_or_not() -> None:
    h = _appends()
    for log in (
        [b"a-append1", b"b-append1", b"a-append3"],
        [b"b-append1", b"a-append1", b"a-append2", b"a-append3"],
    ):
        data = b"".join(append_line(x.decode()) for x in log)
        assert check(h, Lineage(), {}, {"a": data, "b": data}).problems == []


def test_checker_rejects_lost_duplicated_reordered_phantom_or_diverging_appends() -> None:
    h = _appends()
    bad = [
        ["a-append1", "a-append3"],  # b's acknowledged line lost
        ["a-append1", "b-append1", "a-append3", "a-append1"],  # a line twice
        ["a-append3", "b-append1", "a-append1"],  # a's lines out of its order
        ["a-append1", "b-append1", "b-append2", "a-append3"],  # a failed append appeared
    ]
    for log in bad:
        data = b"".join(append_line(x) for x in log)
        v = check(h, Lineage(), {}, {"a": data, "b": data})
        assert v.problems and v.lost > 0, log
    good = b"".join(append_line(x) for x in ("a-append1", "b-append1", "a-append3"))
    other = b"".join(append_line(x) for x in ("b-append1", "a-append1", "a-append3"))
    assert check(h, Lineage(), {}, {"a": good, "b": other}).problems


def test_values_are_traceable() -> None:
    data = value("b17")
    assert op_id_of(data) == "b17"
    assert op_id_of(data[:-1] + bytes([data[-1] ^ 1])) is None
    assert op_id_of(b"\0" * len(data)) is None


# -- the proxy: cuts exactly the processes it is told to ---------------------------------


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback echo server."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(4096):
            conn.sendall(data)


def _roundtrip(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"ping")
        return s.recv(4)


def test_proxy_cuts_only_the_processes_named(echo_port: int) -> None:
    proxy = TcpProxy(echo_port).start()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _roundtrip(proxy.port) == b"ping"
        proxy.cut(DROP, pids=[other.pid])  # another process: this one still gets through
        assert _roundtrip(proxy.port) == b"ping"
        proxy.cut(DROP, pids=[os.getpid()])  # this process: answers never come
        with pytest.raises(OSError):
            _roundtrip(proxy.port)
        proxy.cut(REFUSE)  # everyone: reset at once
        with pytest.raises(OSError):
            _roundtrip(proxy.port)
        proxy.heal()
        assert _roundtrip(proxy.port) == b"ping"
    finally:
        other.kill()
        other.wait()
        proxy.close()
