"""S3 endpoint fixture: moto's server in its own process, on loopback.

tidefs tests talk to a real S3 endpoint over HTTP, never to a mocked client
library, so the store code under test is the code that runs in production.
The endpoint is moto's standalone server (`python -m moto.server`), started
with the test interpreter on a free loopback port.

The server runs in a separate process so that chaos tests can stop it (the
endpoint becomes unreachable) and start it again on the same port. Moto keeps
everything in memory: a restarted server has no buckets and no objects. Tests
that restart it must expect that, e.g. by creating their bucket again.

Fixtures:
- `s3_server` (session): the shared `S3Server`; restarted on demand if a test
  left it stopped.
- `s3_env` (function): fake credentials and region in the environment of the
  test process (AWS_ACCESS_KEY_ID=testing, AWS_DEFAULT_REGION=us-east-1, ...),
  with every other AWS_* variable removed and shared config files and
  instance metadata disabled, so that neither a developer's real AWS setup
  reaches the tests nor the fake one outlives the test.
- `s3_store_url` (function): a fresh bucket per test, as
  `s3://bucket/tidefs?endpoint=http://127.0.0.1:PORT&region=us-east-1`.
- `store_url` (function, parametrized "file" and "s3"): a store URL of either
  backend, so that any module's tests run against both. The s3 variant carries
  the `s3` marker; any test that uses `s3_server` or `s3_store_url` directly
  gets the marker too (see `pytest_collection_modifyitems`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
"""The AWS environment of a test that uses the S3 endpoint: fake keys, nothing else."""

REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class S3Server:
    """An S3 server process on loopback that can be stopped and started again.

    The port is chosen once, so that URLs handed out before a `stop()` point at
    the server again after `start()` (with its state lost: it is in-memory).
    The server is moto's (the tests' endpoint) or, given `gofakes3=BINARY`,
    gofakes3's in-memory backend: an S3 server in Go whose requests cost a
    fraction of moto's, for benchmarks that measure what tidefs adds to a PUT.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, gofakes3: str | None = None
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.gofakes3 = gofakes3
        self.name = "gofakes3" if gofakes3 else "moto"
        self._proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="tidefs-moto-", suffix=".log")
        os.close(fd)

    @property
    def endpoint(self) -> str:
        """The endpoint URL, e.g. http://127.0.0.1:PORT."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it answers HTTP (or raise after `timeout`)."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(FAKE_AWS_ENV)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a ^C at the terminal is for pytest, not for moto
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} server exited with {self._proc.returncode} on {self.endpoint}:\n"
                    f"{self.log_tail()}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} server on {self.endpoint} not ready after {timeout} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def command(self) -> list[str]:
        if self.gofakes3:
            return [self.gofakes3, "-backend", "memory", "-host", f"{self.host}:{self.port}"]
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is serving
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its buckets and objects are gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> None:
        """Stop and start again on the same port, with empty state."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its log."""
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def client(self) -> Any:
        """Return a boto3 S3 client for this server with explicit fake credentials."""
        import boto3
        import botocore.config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"total_max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"tidefs-{secrets.token_hex(6)}"
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name

    def drop_bucket(self, name: str) -> None:
        """Delete a bucket and its objects; quiet if the server or the bucket is gone."""
        if not self.running:
            return
        client = self.client()
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=name):
                objects = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
                if objects:
                    client.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
            client.delete_bucket(Bucket=name)
        except Exception:
            pass  # best effort: a chaos test may have restarted the server
        finally:
            client.close()

    def store_url(self, bucket: str, prefix: str = "tidefs") -> str:
        """Return the tidefs store URL of `bucket`/`prefix` on this server."""
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&region={REGION}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's moto S3 server on loopback."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.close()


def use_fake_aws_env(env: pytest.MonkeyPatch) -> None:
    """Through `env`: the fake AWS credentials and region, and no other AWS_* variable."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        env.delenv(name)
    for name, value in FAKE_AWS_ENV.items():
        env.setenv(name, value)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake AWS credentials and region for this test only; no other AWS_* variable."""
    use_fake_aws_env(monkeypatch)
    return dict(FAKE_AWS_ENV)


@pytest.fixture
def s3_store_url(s3_server: S3Server, s3_env: dict[str, str]) -> Iterator[str]:
    """A store URL for a fresh bucket on the shared server; the bucket is dropped afterwards."""
    s3_server.start()  # a previous chaos test may have left it stopped
    bucket = s3_server.create_bucket()
    try:
        yield s3_server.store_url(bucket)
    finally:
        s3_server.drop_bucket(bucket)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A block store URL of each backend: a fresh directory, then a fresh S3 bucket."""
    if request.param == "file":
        return str((tmp_path / "store").as_uri())
    url: str = request.getfixturevalue("s3_store_url")
    return url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the S3 endpoint directly with `s3`."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "s3_server" in names or "s3_store_url" in names:
            item.add_marker(pytest.mark.s3)
