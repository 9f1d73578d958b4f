"""Block stores: where a region keeps its immutable blocks, chosen by URL.

Every region has one block store, named by the `store_url` of its `Region`:

- `file:///path/to/dir` — a local directory, the embedded default;
- `s3://bucket/prefix?endpoint=URL&region=R&timeout=S&create=1` — S3 or any
  S3-compatible store, through boto3.

Both implement `BlockStore`, a key → bytes map with the few operations that
tidefs needs, and both pass one contract suite (tests/test_store_contract.py).
The properties that the rest of tidefs relies on:

- `put` is atomic and durable: a reader sees the old object, or the whole new
  one, never a prefix of it — even after a crash — and once `put` returns the
  object survives a crash (invariant 5: a FUSE call acknowledges a write only
  after its blocks are stored). The directory store writes a temporary file
  in the same directory, fsyncs it, renames it over the key and fsyncs the
  directory; S3 gives both properties to every PUT.
- Every call either finishes or fails within a bounded time with
  `StoreUnavailable`; none hangs on an unreachable endpoint, because a mount
  blocked in a store call is a hung file system.
- Blocks are sealed (`tidefs.replica.blocks`) and verified on every read by
  `get_block`, so a damaged copy raises `CorruptBlockError`, never wrong bytes.
- Errors form one small hierarchy rooted at `StoreError`; backend exceptions
  (OSError, botocore) never leave this module.

Keys are '/'-separated relative names (`blocks/ab/…/00003`, `snapshots/…`);
no segment is empty, '.' or '..', or starts with '.', so that a key can never
escape the store's directory and never collides with a temporary file.

Stores are safe to share between threads: the directory store holds no state
that needs a lock beyond its cache of existing directories, and the S3 store
uses one boto3 client (thread-safe, unlike boto3 resources) with a connection
pool sized for parallel block fetches.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import os
import re
import secrets
import stat as stat_module
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from tidefs import private
from tidefs.journal.log import redact_url
from tidefs.replica.blocks import (
    HEADER_SIZE,
    CorruptBlockError,
    StoreError,
    block_header,
    check_header,
    check_payload,
    seal,
    unseal,
)

__all__ = [
    "BlockNotFound",
    "BlockStat",
    "BlockStore",
    "CorruptBlockError",
    "FileStore",
    "S3Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]

DEFAULT_TIMEOUT_S = 10.0
"""Default bound, in seconds, on one store call against an unreachable endpoint."""

S3_ATTEMPTS = 3
"""Tries of one S3 request (the first and two retries) within its timeout."""

S3_POOL_CONNECTIONS = 32
"""HTTP connections kept per S3 store: enough for the readahead and replicator fan-out."""

S3_EXPECT_CONTINUE_MIN = 2 << 20
"""Smallest upload body, in bytes, sent after an `Expect: 100-continue` handshake.

boto3 asks for the handshake on every upload: the request's headers go first,
and the body only once the server answered "100 Continue", which saves
sending a large body that the server rejects, at the price of one more round
trip. On a small block (the 4 KiB page an fsync commits) that round trip is
the whole saving's worth many times over: against the local test endpoint it
cost 3 ms of a 4 KiB put's 11 ms on average and put 10% of puts 10 ms
later. Below this size the body goes with the headers, as the AWS SDK for Go
does below its 2 MiB default.
"""

_DELETE_BATCH = 1000  # most keys one S3 DeleteObjects request accepts
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class StoreConfigError(StoreError):
    """A store URL or option is malformed, names an unknown scheme, or lacks credentials."""


class StoreUnavailable(StoreError):
    """The store could not be reached, read or written within its timeout.

    Unlike `BlockNotFound`, this says nothing about whether the object exists:
    the caller may retry later or try another region.
    """


class BlockNotFound(StoreError):
    """The store answered, and it holds no object under `key`."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object {key!r} in the block store")
        self.key = key


@dataclass(frozen=True, slots=True)
class BlockStat:
    """Size and modification time of a stored object, for gc's retention check."""

    size: int
    mtime_ns: int


def check_key(key: str) -> str:
    """Return `key` if it is a valid store key, else raise ValueError (a caller's bug)."""
    if not key or len(key) > 1024:
        raise ValueError(f"invalid store key {key!r}: empty or longer than 1024 characters")
    for segment in key.split("/"):
        if not segment or segment.startswith(".") or "\0" in segment:
            raise ValueError(
                f"invalid store key {key!r}: segments must be non-empty, contain no NUL "
                "and not start with '.'"
            )
    return key


class BlockStore(abc.ABC):
    """A region's store of immutable blocks and small metadata objects (snapshots)."""

    url: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there, atomically and durably."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object under `key`; raise BlockNotFound when there is none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether an object is stored under `key`."""

    @abc.abstractmethod
    def stat(self, key: str) -> BlockStat | None:
        """Return the size and modification time of `key`, or None when it is absent."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing an absent key is not an error (gc may repeat itself)."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in `keys`, as `delete` would; backends may batch."""
        for key in keys:
            self.delete(key)

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys that start with `prefix`, in ascending lexicographic order.

        `prefix` is a plain string prefix, as in S3: "blocks/a" matches
        "blocks/ab/..." as well as "blocks/a/...". Keys written or deleted during
        the iteration may or may not be seen.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store must not be used afterwards."""

    def put_block(self, key: str, payload: bytes | bytearray | memoryview) -> None:
        """Seal `payload` (header and checksum) and store it under `key`."""
        self.put(key, seal(payload))

    def get_block(self, key: str) -> bytes:
        """Return the verified payload of the block under `key`.

        Raises BlockNotFound when absent and CorruptBlockError when the stored
        copy fails verification.
        """
        return unseal(key, self.get(key))

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"


def open_store(url: str, **options: Any) -> BlockStore:
    """Open the block store at `url`: `file:///dir` or `s3://bucket[/prefix][?query]`.

    Options (keyword arguments win over the same query parameter):
    - `timeout` (both; seconds): bound on one call against an unreachable
      endpoint. The directory store accepts it so that callers can pass one
      set of options to any URL, and ignores it: local I/O has no timeout.
    - `endpoint`, `region`, `create_bucket` (`create=1` in the query),
      `addressing_style` (S3 only): see `S3Store`.

    Raises StoreConfigError for a malformed URL or an unknown scheme or option,
    and StoreUnavailable when the store cannot be reached or written.
    """
    if not isinstance(url, str) or not url:
        raise StoreConfigError(f"empty block store URL {redact_url(url)!r}")
    try:
        scheme = urlsplit(url).scheme
    except ValueError as e:
        raise StoreConfigError(f"malformed block store URL {redact_url(url)!r}: {e}") from e
    if scheme == "file":
        return FileStore.from_url(url, **options)
    if scheme == "s3":
        return S3Store.from_url(url, **options)
    raise StoreConfigError(
        f"unsupported block store URL {redact_url(url)!r}: expected file:///path/to/dir "
        "or s3://bucket/prefix?endpoint=URL&region=R"
    )


# --------------------------------------------------------------------------- directory


def _fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable (a rename, a new child)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore(BlockStore):
    """A block store in a local directory: one file per key, at `root/key`.

    A put writes `.<name>.<random>.tmp` beside the target, fsyncs it, renames
    it into place and fsyncs the directory, so that a crash leaves either the
    old object or the new one. A crash between the write and the rename
    leaves the temporary file behind: `list` and `get` never see it (its name
    starts with '.', which keys may not), and gc may remove such files once
    they are older than any put in progress could be.

    Directories are created on demand (and their parents fsynced, so that a
    durable file is also reachable after a crash) and removed by `delete` when
    it empties them, so that gc does not leave one empty directory per slice.
    """

    def __init__(self, root: str | os.PathLike[str], url: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.url = url if url is not None else self.root.as_uri()
        self._root = str(self.root)
        # Directories known to exist with a durable entry in their parent: saves a
        # mkdir and an fsync per put. Stale entries (a directory removed by another
        # process) are harmless: the put that trips over one drops it and retries.
        self._dirs: set[str] = {self._root}
        self._dirs_lock = threading.Lock()
        try:
            self._make_root()
            # Prove now, not at the first acknowledged write, that the directory
            # takes files: a read-only mount or a wrong owner fails here.
            probe = os.path.join(self._root, f".probe.{secrets.token_hex(8)}.tmp")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StoreUnavailable(
                f"block store directory {self._root} is not a writable directory: {e.strerror or e}"
            ) from e

    def _make_root(self) -> None:
        """Create the root and its missing parents, each one's entry made durable."""
        missing: list[str] = []
        path = self._root
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path, private.DIR_MODE)
                os.chmod(path, private.DIR_MODE)  # exactly 0700, whatever the umask
            except FileExistsError:  # a racing opener made it
                pass
            _fsync_dir(os.path.dirname(path))

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileStore:
        """Open the store of a `file:///absolute/path` URL, creating the directory."""
        unknown = set(options) - {"timeout"}
        if unknown:
            raise StoreConfigError(f"unknown option(s) for a file store: {sorted(unknown)}")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise StoreConfigError(
                f"file store URL {url!r} names host {parts.netloc!r}: only local "
                "directories are supported (file:///path)"
            )
        if parts.query or parts.fragment:
            raise StoreConfigError(f"file store URL {url!r} takes no query or fragment")
        path = unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise StoreConfigError(f"file store URL {url!r} must name an absolute path")
        # file:////data/x names /data/x: messages and paths then read /data/x, not //data/x.
        return cls("/" + path.lstrip("/"), url=url)

    def _path(self, key: str) -> str:
        return os.path.join(self._root, check_key(key))

    def _ensure_dir(self, path: str) -> None:
        """Create directory `path` and its missing parents, each entry durable."""
        if path in self._dirs:
            return
        parent = os.path.dirname(path)
        self._ensure_dir(parent)
        try:
            os.mkdir(path, private.DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(path):
                raise NotADirectoryError(20, "a key's prefix is an object", path) from None
        # Fsync the parent even when another thread made the directory first: it
        # may not have fsynced yet, and this put must not return before it has.
        _fsync_dir(parent)
        with self._dirs_lock:
            self._dirs.add(path)

    def _forget_dir(self, path: str) -> None:
        with self._dirs_lock:
            self._dirs.discard(path)

    def _forget_all_dirs(self) -> None:
        with self._dirs_lock:
            self._dirs = {self._root}

    def put(self, key: str, data: bytes) -> None:
        self._put_parts(key, (data,))

    def put_block(self, key: str, payload: bytes | bytearray | memoryview) -> None:
        # Header and payload go to the file as two writes: no joined copy.
        self._put_parts(key, (block_header(payload), payload))

    def _put_parts(self, key: str, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        path = self._path(key)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            for attempt in range(3):
                try:
                    self._ensure_dir(directory)
                    fd = os.open(
                        tmp,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        private.FILE_MODE,
                    )
                    break
                except FileNotFoundError:
                    # A concurrent delete removed an emptied directory that the
                    # cache still listed: forget them all and make them again.
                    self._forget_all_dirs()
                    if attempt == 2:
                        raise
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(directory)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreUnavailable(f"cannot write {path}: {e.strerror or e}") from e

    def _open(self, key: str) -> tuple[int, int, str]:
        """Open the object under `key` for reading: (fd, size, path)."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound(key) from None
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise StoreUnavailable(f"cannot read {path}: {e.strerror or e}") from e
        if not stat_module.S_ISREG(st.st_mode):  # a directory: a prefix of keys
            os.close(fd)
            raise BlockNotFound(key)
        return fd, st.st_size, path

    @staticmethod
    def _read_at(fd: int, size: int, offset: int) -> bytes:
        """Read `size` bytes at `offset` into one buffer (fewer only at end of file)."""
        # Objects are replaced by rename, never written in place, so the size
        # is final: one read of exactly that size, no intermediate buffers.
        data = os.pread(fd, size, offset)
        if 0 < len(data) < size:  # a short read is legal; finish it
            chunks = [data]
            done = len(data)
            while done < size:
                chunk = os.pread(fd, size - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
            data = b"".join(chunks)
        return data

    def get(self, key: str) -> bytes:
        fd, size, path = self._open(key)
        try:
            return self._read_at(fd, size, 0)
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e.strerror or e}") from e
        finally:
            os.close(fd)

    def get_block(self, key: str) -> bytes:
        # Header first, then the payload straight into the buffer that is
        # returned: one copy from the page cache, as for a raw get.
        fd, size, path = self._open(key)
        try:
            header = self._read_at(fd, min(size, HEADER_SIZE), 0)
            length = check_header(key, header, size)
            payload = self._read_at(fd, length, HEADER_SIZE)
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e.strerror or e}") from e
        finally:
            os.close(fd)
        if len(payload) != length:
            raise CorruptBlockError(key, f"truncated while reading ({len(payload)} of {length})")
        check_payload(key, header, payload)
        return payload

    def _stat(self, key: str) -> os.stat_result | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot stat {path}: {e.strerror or e}") from e
        return st if stat_module.S_ISREG(st.st_mode) else None

    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def stat(self, key: str) -> BlockStat | None:
        st = self._stat(key)
        return None if st is None else BlockStat(st.st_size, st.st_mtime_ns)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a prefix of other keys, not an object
        except OSError as e:
            raise StoreUnavailable(f"cannot delete {path}: {e.strerror or e}") from e
        # Remove the directories this delete emptied (the slice's, typically),
        # up to the root. A racing put recreates what it needs.
        directory = os.path.dirname(path)
        while directory != self._root:
            self._forget_dir(directory)
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the deepest directory that the prefix fully names.
        base = prefix.rpartition("/")[0]
        if base:
            try:
                check_key(base)
            except ValueError:
                return
        yield from self._walk(base, prefix)

    def _walk(self, rel: str, prefix: str) -> Iterator[str]:
        directory = os.path.join(self._root, rel) if rel else self._root
        try:
            with os.scandir(directory) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StoreUnavailable(f"cannot list {directory}: {e.strerror or e}") from e
        # Sort a directory as "name/" so that a depth-first walk yields keys in
        # the same order as a sort of the full keys ("a-b" < "a/c"), like S3.
        entries.sort(key=lambda entry: entry[0] + "/" if entry[1] else entry[0])
        for name, is_dir in entries:
            if name.startswith("."):
                continue  # temporary files of puts in progress or crashed
            key = f"{rel}/{name}" if rel else name
            if is_dir:
                # Descend only where keys could match the prefix.
                if key.startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(key, prefix)
            elif key.startswith(prefix):
                yield key


# --------------------------------------------------------------------------- S3

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_S3_QUERY = {"endpoint", "region", "timeout", "create", "addressing_style"}
_S3_OPTIONS = {"endpoint", "region", "timeout", "create_bucket", "addressing_style"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_CODES = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise StoreConfigError(f"option {name}={value!r} is not a boolean (use 1 or 0)")


def _parse_timeout(value: object) -> float:
    try:
        timeout = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise StoreConfigError(f"option timeout={value!r} is not a number of seconds") from None
    if not 0 < timeout < 86400:
        raise StoreConfigError(f"option timeout={value!r} must be positive seconds")
    return timeout


class S3Store(BlockStore):
    """A block store in an S3 bucket (or any S3-compatible endpoint), under a key prefix.

    Credentials come from boto3's usual chain (environment variables, shared
    config and credentials files, profiles, instance metadata). Each call is
    bounded: every try gets `timeout / S3_ATTEMPTS` seconds to connect and the
    same between two reads of the response, with boto3's standard retry mode
    (which backs off milliseconds between tries of connection errors), so an
    unreachable endpoint fails with StoreUnavailable after about `timeout`
    seconds. A response body of a large block may take longer, as long as bytes
    keep arriving.

    The bucket must exist when the store is opened (a typo would otherwise
    surface as missing blocks), unless `create_bucket` is set.

    `exists` and `stat` use HEAD, whose 404 has no body: a bucket deleted while
    the store is open reads there as an absent key, while `get`, `put` and
    `list` report it as StoreUnavailable.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        create_bucket: bool = False,
        addressing_style: str | None = None,
        url: str | None = None,
    ) -> None:
        import boto3
        import botocore.config

        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise StoreConfigError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValueError as e:
                raise StoreConfigError(f"invalid S3 key prefix {prefix!r}: {e}") from None
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StoreConfigError(
                    f"invalid S3 endpoint {redact_url(endpoint)!r}: expected http(s)://host"
                )
            if "@" in parts.netloc:
                # A store URL is written into the log, forever: no credentials in it.
                raise StoreConfigError(
                    f"S3 endpoint {redact_url(endpoint)!r} names a user: give credentials as "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)"
                )
        if addressing_style is None:
            # S3-compatible servers (MinIO, Ceph, local test servers) are reached by
            # IP or a single host name: the bucket belongs in the path, not the host.
            addressing_style = "path" if endpoint else "auto"
        if addressing_style not in ("auto", "path", "virtual"):
            raise StoreConfigError(f"invalid addressing_style {addressing_style!r}")

        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = endpoint
        self.timeout = timeout
        query = f"?endpoint={endpoint}" if endpoint else ""
        self.url = url if url is not None else f"s3://{bucket}/{prefix}{query}"

        per_try = timeout / S3_ATTEMPTS
        config = botocore.config.Config(
            connect_timeout=per_try,
            read_timeout=per_try,
            retries={"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
            max_pool_connections=S3_POOL_CONNECTIONS,
            s3={"addressing_style": addressing_style},
            # Uploads carry a checksum that S3 verifies before it acknowledges
            # the put (a damaged upload must fail, not be found damaged after
            # the write was acknowledged); downloads are verified by us.
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_required",
        )
        try:
            # A session of our own: boto3's default session is shared global state
            # and creating clients from it is not thread-safe.
            session = boto3.session.Session(region_name=region)
            self.region = session.region_name or "us-east-1"
            self._client: Any = session.client(
                "s3", region_name=self.region, endpoint_url=endpoint, config=config
            )
            # Runs after boto3's own handlers of the event, which add the header.
            self._client.meta.events.register_last("before-call.s3", no_expect_for_small_body)
        except Exception as e:
            raise StoreConfigError(
                f"cannot configure S3 client for {redact_url(self.url)}: {e}"
            ) from e
        try:
            self._check_bucket(create_bucket)
        except BaseException:
            self._client.close()
            raise

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Store:
        """Open the store of an `s3://bucket/prefix?endpoint=URL&region=R&timeout=S&create=1` URL."""
        unknown = set(options) - _S3_OPTIONS
        if unknown:
            raise StoreConfigError(f"unknown option(s) for an S3 store: {sorted(unknown)}")
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as e:
            raise StoreConfigError(f"malformed S3 store URL {shown!r}: {e}") from e
        if not parts.netloc:
            raise StoreConfigError(f"S3 store URL {shown!r} names no bucket (s3://bucket/prefix)")
        if "@" in parts.netloc:
            raise StoreConfigError(
                f"S3 store URL {shown!r} names credentials: a store URL is written into the "
                "log, so give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
            )
        if ":" in parts.netloc:
            raise StoreConfigError(
                f"S3 store URL {shown!r}: put the endpoint in ?endpoint=, not in the bucket"
            )
        if parts.fragment:
            raise StoreConfigError(f"S3 store URL {shown!r} takes no fragment")
        bad = set(query) - _S3_QUERY
        if bad:
            raise StoreConfigError(f"unknown S3 store URL parameter(s) {sorted(bad)} in {shown!r}")
        params: dict[str, Any] = {}
        for name, values in query.items():
            if len(values) != 1:
                raise StoreConfigError(f"S3 store URL parameter {name!r} given twice in {shown!r}")
            params["create_bucket" if name == "create" else name] = values[0]
        params.update(options)
        timeout = _parse_timeout(params.pop("timeout", DEFAULT_TIMEOUT_S))
        create = _parse_bool("create_bucket", params.pop("create_bucket", False))
        return cls(
            parts.netloc,
            unquote(parts.path),
            endpoint=params.get("endpoint") or None,
            region=params.get("region") or None,
            timeout=timeout,
            create_bucket=create,
            addressing_style=params.get("addressing_style") or None,
            url=url,
        )

    def _check_bucket(self, create: bool) -> None:
        """Fail now, with a clear message, if the bucket is absent or unreachable."""
        where = f" at {self.endpoint}" if self.endpoint else ""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except Exception as e:
            code = _error_code(e)
            if code not in ("404", "NoSuchBucket", "NotFound"):
                self._raise(e, f"check bucket {self.bucket!r}{where}")
            if not create:
                raise StoreUnavailable(
                    f"S3 bucket {self.bucket!r} does not exist{where}; create it, "
                    "or open the store with create=1"
                ) from None
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except Exception as e:
            if _error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                self._raise(e, f"create bucket {self.bucket!r}{where}")

    def _raise(self, e: Exception, doing: str, key: str | None = None) -> NoReturn:
        """Translate a boto3 exception into the store hierarchy."""
        import botocore.exceptions as bce

        code = _error_code(e)
        if key is not None and code in _MISSING_CODES:
            raise BlockNotFound(key) from None
        if isinstance(e, bce.NoCredentialsError | bce.PartialCredentialsError):
            raise StoreConfigError(
                f"no AWS credentials for {redact_url(self.url)}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from e
        if code == "NoSuchBucket":
            raise StoreUnavailable(
                f"cannot {doing}: S3 bucket {self.bucket!r} does not exist"
            ) from e
        if code in _CREDENTIAL_CODES:
            raise StoreUnavailable(
                f"cannot {doing}: access denied ({code}) to {redact_url(self.url)}"
            ) from e
        if isinstance(e, bce.ClientError | bce.BotoCoreError):
            raise StoreUnavailable(f"cannot {doing} in {redact_url(self.url)}: {e}") from e
        raise e

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            self._raise(e, f"put {key!r}")

    def get(self, key: str) -> bytes:
        try:
            # Other objects (snapshots) have no checksum of their own: ask S3 for
            # the one it stored at upload and let botocore verify it.
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
            )
            body = response["Body"]
            try:
                # Read the whole body at once: one buffer of the known length.
                data: bytes = body.read()
            finally:
                body.close()
        except Exception as e:
            self._raise(e, f"get {key!r}", key)
        return data

    def get_block(self, key: str) -> bytes:
        # The block's own checksum covers it end to end, so S3's is not asked
        # for; reading the header, then exactly the payload, returns the body's
        # buffer itself instead of a copy of its tail.
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            try:
                size = int(response["ContentLength"])
                header = body.read(min(size, HEADER_SIZE))
                length = check_header(key, header, size)
                payload: bytes = body.read(length)
                if len(payload) < length:
                    chunks = [payload]
                    done = len(payload)
                    while done < length:
                        chunk = body.read(length - done)
                        if not chunk:
                            break
                        chunks.append(chunk)
                        done += len(chunk)
                    payload = b"".join(chunks)
                body.read()  # the end: makes botocore check the content length
            finally:
                body.close()
        except CorruptBlockError:
            raise
        except Exception as e:
            self._raise(e, f"get {key!r}", key)
        if len(payload) != length:
            raise CorruptBlockError(key, f"truncated while reading ({len(payload)} of {length})")
        check_payload(key, header, payload)
        return payload

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            response: dict[str, Any] = self._client.head_object(
                Bucket=self.bucket, Key=self._key(key)
            )
        except Exception as e:
            if _error_code(e) in _MISSING_CODES:
                return None
            self._raise(e, f"stat {key!r}")
        return response

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def stat(self, key: str) -> BlockStat | None:
        head = self._head(key)
        if head is None:
            return None
        modified: datetime.datetime = head["LastModified"]
        mtime_ns = (modified - _EPOCH) // datetime.timedelta(microseconds=1) * 1000
        return BlockStat(int(head["ContentLength"]), mtime_ns)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _error_code(e) in _MISSING_CODES:
                return
            self._raise(e, f"delete {key!r}")

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: list[dict[str, str]] = []
        for key in keys:
            batch.append({"Key": self._key(key)})
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        try:
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        except Exception as e:
            self._raise(e, f"delete {len(batch)} objects")
        errors = [err for err in response.get("Errors", []) if err.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            raise StoreUnavailable(
                f"cannot delete {len(errors)} objects in {redact_url(self.url)}, e.g. "
                f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )

    def list(self, prefix: str = "") -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"][strip:]
        except Exception as e:
            self._raise(e, f"list {prefix!r}")

    def close(self) -> None:
        self._client.close()


def no_expect_for_small_body(params: dict[str, Any], **_: Any) -> None:
    """Drop boto3's `Expect: 100-continue` from uploads below `S3_EXPECT_CONTINUE_MIN`.

    A `before-call.s3` handler of a boto3 client (registered last, after the
    handler that adds the header); the benchmark's raw puts use it too.
    """
    headers = params.get("headers")
    if not headers or "Expect" not in headers:
        return
    from botocore.utils import determine_content_length

    size = determine_content_length(params.get("body"))
    if size is not None and size < S3_EXPECT_CONTINUE_MIN:
        del headers["Expect"]


def _error_code(e: BaseException) -> str:
    """Return the S3 error code of a botocore ClientError ('' for anything else)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
