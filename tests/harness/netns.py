"""A remote region on one machine: a network namespace behind a delayed link.

To test (and measure) mirroring across a wide-area link without a second
machine, a region's S3 endpoint runs inside a network namespace of its own,
reached from the test's namespace over a veth pair whose two ends each delay
every packet by `delay_ms` (`tc qdisc ... netem delay`): a round trip costs
twice that, as between two regions.

Creating namespaces and qdiscs needs root (CAP_NET_ADMIN) and a kernel with
the netem qdisc (module sch_netem). Where either is refused, `NetnsUnavailable`
carries the tool's own error line, and the fixture skips with it. Everything
created is removed by `close()` (the fixture's finalizer), also after a
partial setup: deleting the namespace deletes the veth pair with it.

Fixtures:
- `delayed_netns` (function): a `DelayedNamespace` with 30 ms one-way delay.
- `delayed_s3` (function): an `NetnsS3Server` (moto) running inside it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.s3 import FAKE_AWS_ENV, S3Server

CROSS_REGION_DELAY_MS = 30
"""One-way delay of the test link: a round trip of 60 ms, as between distant regions."""

_subnets = itertools.count(1)


class NetnsUnavailable(Exception):
    """This machine refuses to make the namespace, the link, or the delay (the message says why)."""


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {why[-1] if why else proc.returncode}")


class DelayedNamespace:
    """A network namespace reachable at `ns_ip` over a veth pair delayed `delay_ms` each way."""

    def __init__(self, delay_ms: float = CROSS_REGION_DELAY_MS) -> None:
        self.delay_ms = delay_ms
        tag = secrets.token_hex(3)
        self.name = f"tidefs-{tag}"
        self.host_dev = f"tfh{tag}"
        self.ns_dev = f"tfn{tag}"
        # A /30 of its own in 10.231.0.0/16: two namespaces of one run never share one.
        n = (secrets.randbelow(16384) + next(_subnets)) % 16384
        third, fourth = divmod(n * 4, 256)
        self.host_ip = f"10.231.{third}.{fourth + 1}"
        self.ns_ip = f"10.231.{third}.{fourth + 2}"
        self._created = False

    def create(self) -> DelayedNamespace:
        """Make the namespace, the link and the delays; raise NetnsUnavailable, leaving nothing."""
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"`{tool}` not found (Debian package iproute2)")
        try:
            _run("ip", "netns", "add", self.name)
            self._created = True
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _run("ip", "link", "set", self.ns_dev, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            inside = ("ip", "netns", "exec", self.name)
            _run(*inside, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
            _run(*inside, "ip", "link", "set", self.ns_dev, "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            if self.delay_ms > 0:
                delay = f"{self.delay_ms:g}ms"
                _run("tc", "qdisc", "add", "dev", self.host_dev, "root", "netem", "delay", delay)
                _run(
                    *inside,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    self.ns_dev,
                    "root",
                    "netem",
                    "delay",
                    delay,
                )
        except BaseException:
            self.close()
            raise
        return self

    def command(self, argv: list[str]) -> list[str]:
        """Return `argv` prefixed to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        """Remove the link and the namespace (idempotent; quiet about what is already gone)."""
        subprocess.run(
            ["ip", "link", "del", self.host_dev], capture_output=True, check=False, timeout=30
        )
        if self._created:
            subprocess.run(
                ["ip", "netns", "del", self.name], capture_output=True, check=False, timeout=30
            )
            self._created = False

    def __enter__(self) -> DelayedNamespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetnsS3Server(S3Server):
    """A moto S3 server inside a `DelayedNamespace`, reached at its `ns_ip`."""

    def __init__(self, netns: DelayedNamespace, port: int = 5000) -> None:
        super().__init__(host=netns.ns_ip, port=port)
        self.netns = netns

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(FAKE_AWS_ENV)
        argv = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.netns.command(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"moto server in {self.netns.name} not ready on {self.endpoint}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)


class DelayProxy:
    """A TCP forwarder on loopback that delays every byte `delay_ms` in each direction.

    The fallback where netem is refused (and a tool for benchmarks): a
    client of `port` reaches `target` as if across a link with that one-way
    delay. It models latency only: bytes keep their order and are released
    `delay_ms` after they arrived, with no bandwidth cap and no loss. The
    delay may be changed while it runs; it applies to bytes arriving after.
    """

    def __init__(self, target: tuple[str, int], delay_ms: float = 0.0, *, port: int = 0) -> None:
        import socket
        import threading

        self.target = target
        self.delay_ms = delay_ms
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[Any] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="tidefs-delay-accept", daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        import queue
        import socket
        import threading

        pending: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def deliver() -> None:
            while True:
                due, data = pending.get()
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            pending.put((time.monotonic() + self.delay_ms / 1000, data))
            if not data:
                return

    def close(self) -> None:
        """Stop accepting and cut every forwarded connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()


def open_delayed_namespace(delay_ms: float) -> DelayedNamespace:
    """Create a delayed namespace or skip the calling test with the machine's reason."""
    try:
        return DelayedNamespace(delay_ms).create()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot delay traffic between regions here: {exc}")


@pytest.fixture
def delayed_netns() -> Iterator[DelayedNamespace]:
    """A network namespace behind a link delayed 30 ms each way; removed afterwards."""
    ns = open_delayed_namespace(CROSS_REGION_DELAY_MS)
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def delayed_s3(delayed_netns: DelayedNamespace, s3_env: dict[str, str]) -> Iterator[Any]:
    """A moto S3 endpoint inside `delayed_netns` (a remote region's store)."""
    server = NetnsS3Server(delayed_netns)
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.close()
