"""Services and regions of a chaos run: a Kafka broker, S3 endpoints, proxies, mounts.

`Services` are shared by every scenario of a run (a broker's JVM takes seconds
to start): one Kafka broker and one moto S3 server, each behind a `TcpProxy`
so that a scenario can cut a region off from them or take them down.
`Cluster` is one scenario's volume in two regions:

- region a (primary): its block store is a bucket on the S3 endpoint, reached
  by everyone through the S3 proxy;
- region b: its block store is a directory (so that a block can be corrupted
  in place), its cache may be a small tmpfs, and its replicator may run as a
  `tidefs replicate` process of its own.

Both regions mount the volume with the test harness's `TidefsMount` (a
`python -m tidefs.fs.mount` subprocess, the same daemon as `tidefs mount`).
With the Kafka journal every region reaches the broker through the Kafka
proxy, on a listener that advertises the proxy's port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.proxy import TcpProxy
from tests.harness.kafka import KafkaBroker, locate_kafka
from tests.harness.mount import TEST_BLOCK_SIZE, TEST_CHUNK_SIZE, TidefsMount, fuse_available
from tests.harness.s3 import FAKE_AWS_ENV, S3Server
from tidefs.fs.mount import sync_mount
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import Region
from tidefs.journal.log import open_log
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import blocks_needed
from tidefs.replica.state import State, StateError
from tidefs.replica.store import StoreError, open_store

REGIONS = ("a", "b")
MOUNT_OPTIONS = ["--flush-interval", "1", "--compact-threshold", "8", "--compact-delay", "0.5"]


class Unavailable(Exception):
    """A service a scenario needs cannot run on this machine; the message says why."""


def tidefs_cli() -> str:
    """The `tidefs` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("tidefs")
    return str(exe) if exe.exists() else "tidefs"


class Services:
    """The broker and S3 endpoint of a run, each behind a proxy; started on first use."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker: KafkaBroker | None = None
        self.kafka_proxy: TcpProxy | None = None
        self.s3: S3Server | None = None
        self.s3_proxy: TcpProxy | None = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> Services:
        # Mounts, replicators and this process reach the S3 endpoint with fake keys.
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            self._saved_env[name] = os.environ.pop(name)
        for name, val in FAKE_AWS_ENV.items():
            self._saved_env.setdefault(name, None)
            os.environ[name] = val
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kafka(self) -> str:
        """Start the broker (once) and return the journal URL through its proxy."""
        if self.broker is None:
            try:
                libs, java = locate_kafka()
            except Exception as exc:
                raise Unavailable(str(exc)) from exc
            proxy = TcpProxy(target_port=0)
            broker = KafkaBroker(
                libs,
                self.workdir / "kafka",
                java=java,
                proxied_port=proxy.port,
                heap="384m",
                ready_timeout=180.0,  # a restart on a loaded 2-core machine can take minutes
            )
            assert broker.proxied_listen_port is not None
            proxy.target = ("127.0.0.1", broker.proxied_listen_port)
            proxy.start()
            self.kafka_proxy = proxy
            broker.start()
            self.broker = broker
        assert self.kafka_proxy is not None
        if not self.broker.running:
            self.broker.start()
        return f"kafka://127.0.0.1:{self.kafka_proxy.port}"

    def s3_bucket_url(self) -> str:
        """Start the S3 endpoint (once), make a fresh bucket, return its store URL via the proxy."""
        if self.s3 is None:
            server = S3Server()
            server.start()
            self.s3 = server
            self.s3_proxy = TcpProxy(target_port=server.port).start()
        assert self.s3_proxy is not None
        bucket = self.s3.create_bucket()
        return (
            f"s3://{bucket}/tidefs?endpoint=http://127.0.0.1:{self.s3_proxy.port}&region=us-east-1"
        )

    def close(self) -> None:
        for proxy in (self.kafka_proxy, self.s3_proxy):
            if proxy is not None:
                proxy.close()
        if self.broker is not None:
            self.broker.stop()
        if self.s3 is not None:
            self.s3.close()
        for name, val in self._saved_env.items():
            if val is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = val
        self._saved_env.clear()


@dataclass
class Cluster:
    """One volume mounted in regions a and b for one scenario."""

    root: Path
    services: Services
    journal: str  # "kafka" or "sqlite"
    separate_replicator: bool = False
    cache_size: str | None = None  # a tmpfs of this size as region b's cache directory
    volume: str = field(default_factory=lambda: f"chaos{uuid.uuid4().hex[:10]}")
    journal_url: str = ""
    store_urls: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, TidefsMount] = field(default_factory=dict)
    replicator: subprocess.Popen[bytes] | None = None
    _tmpfs: list[Path] = field(default_factory=list)

    # -- set-up and tear-down ------------------------------------------------------

    def start(self) -> None:
        if not fuse_available():
            raise Unavailable("no /dev/fuse or fusermount3")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.journal == "kafka":
            self.journal_url = self.services.kafka()
        else:
            self.journal_url = f"sqlite://{self.root / 'journal.db'}"
        self.store_urls = {
            "a": self.services.s3_bucket_url(),
            "b": (self.root / "store-b").as_uri(),
        }
        format_volume(
            self.journal_url,
            self.volume,
            [Region(name, self.store_urls[name]) for name in REGIONS],
            "a",
            chunk_size=TEST_CHUNK_SIZE,
            block_size=TEST_BLOCK_SIZE,
        )
        for region in REGIONS:
            extra = list(MOUNT_OPTIONS)
            if region == "b" and self.separate_replicator:
                extra.append("--no-replicate")
            m = TidefsMount(self.root, self.volume, self.journal_url, region, extra)
            self.mounts[region] = m
        if self.cache_size is not None:
            self._mount_tmpfs(self.mounts["b"].cache_dir, self.cache_size)
        for m in self.mounts.values():
            m.start()
        if self.separate_replicator:
            self.start_replicator()

    def _mount_tmpfs(self, path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise Unavailable(
                f"cannot mount a tmpfs as a cache disk: {result.stderr.decode().strip()}"
            )
        self._tmpfs.append(path)

    def stop(self) -> None:
        self.stop_replicator()
        for m in self.mounts.values():
            with contextlib.suppress(Exception):
                m.stop()
            # A mount whose daemon died answers ENOTCONN, which ismount() misses.
            subprocess.run(
                ["fusermount3", "-u", "-z", str(m.path)], capture_output=True, check=False
            )
        for path in self._tmpfs:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        self._tmpfs.clear()

    def path(self, region: str) -> Path:
        return self.mounts[region].path

    def pids(self, region: str) -> list[int]:
        """The processes of `region`: its mount, and its replicator when separate."""
        out = []
        m = self.mounts[region]
        if m.proc is not None:
            out.append(m.proc.pid)
        if region == "b" and self.replicator is not None:
            out.append(self.replicator.pid)
        return out

    # -- the stand-alone replicator of region b -----------------------------------

    def start_replicator(self) -> None:
        log = (self.root / "replicator-b.log").open("ab")
        try:
            self.replicator = subprocess.Popen(
                [
                    tidefs_cli(),
                    "replicate",
                    self.volume,
                    "--journal",
                    self.journal_url,
                    "--region",
                    "b",
                    "--state-dir",
                    str(self.root / "replicator-b"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def kill_replicator(self) -> None:
        proc, self.replicator = self.replicator, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def stop_replicator(self) -> None:
        proc, self.replicator = self.replicator, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    # -- mounts ---------------------------------------------------------------------

    def kill_mount(self, region: str) -> None:
        """SIGKILL a region's mount daemon, whatever it is doing (folding, writing)."""
        m = self.mounts[region]
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(30)

    def restart_mount(self, region: str) -> None:
        """Clean up after a killed mount (lazy unmount) and mount the region again."""
        m = self.mounts[region]
        if m.proc is not None and m.proc.poll() is not None:
            m.proc = None
            # A dead FUSE daemon leaves a mount whose stat fails (ENOTCONN), which
            # os.path.ismount takes for "not a mount": detach it regardless.
            subprocess.run(
                ["fusermount3", "-u", "-z", str(m.path)], capture_output=True, check=False
            )
        m.stop()
        m.start()

    # -- convergence ------------------------------------------------------------------

    def sync(self, timeout: float = 30.0) -> bool:
        """`tidefs sync` every mount; True when all returned 0."""
        return all(sync_mount(str(m.path), timeout=timeout) == 0 for m in self.mounts.values())

    def converged(self) -> tuple[bool, str, dict[str, str]]:
        """Whether every region applied the whole log, with equal digests and every block local.

        Returns (converged, why not, region -> digest). States are opened
        read-only beside the running mounts.
        """
        with open_log(self.journal_url, self.volume) as lg:
            target = lg.head() - 1
        digests: dict[str, str] = {}
        offsets: dict[str, int] = {}
        missing: dict[str, int] = {}
        for region, m in self.mounts.items():
            try:
                state = State.open(m.state_dir, read_only=True)
            except StateError as exc:
                return False, f"state of {region}: {exc}", digests
            try:
                offsets[region] = state.applied_offset()
                digests[region] = state.digest_hex()
                refs = [ref for _ino, _chunk, ref in state.iter_live_slices()]
            finally:
                state.close()
            missing[region] = self._missing_blocks(region, refs)
        if any(off != target for off in offsets.values()):
            return False, f"applied offsets {offsets}, log head {target}", digests
        if len(set(digests.values())) != 1:
            return False, f"digests differ at offset {target}: {digests}", digests
        if any(missing.values()):
            return False, f"blocks missing or corrupt in the region's own store: {missing}", digests
        return True, "", digests

    def _missing_blocks(self, region: str, refs: list[Any]) -> int:
        """How many blocks of `refs` the region's own store lacks or holds corrupt."""
        store = open_store(self.store_urls[region])
        bad = 0
        try:
            for ref in refs:
                for i in range(blocks_needed(ref)):
                    try:
                        store.get_block(block_key(ref.slice_id, i))
                    except StoreError:
                        bad += 1
        finally:
            store.close()
        return bad


def block_files(store_dir: Path) -> list[Path]:
    """The block files of a directory store, largest first."""
    files = [p for p in store_dir.rglob("*") if p.is_file() and "blocks" in p.parts]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate()` until true or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
