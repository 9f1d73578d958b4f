"""One contract for every block store backend, and the block format it carries.

Each contract test runs against a fresh directory (`file`) and a fresh bucket
on the local S3 endpoint (`s3`) through the `store_url` fixture; what one
backend does, the other must do too. The backend-specific tests below them
cover what only one backend can get wrong: unreachable endpoints, missing
buckets, unwritable directories.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.s3 import S3Server, free_port
from tidefs.replica.blocks import (
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    block_key,
    new_slice_id,
    parse_block_key,
    seal,
    slice_prefix,
    unseal,
)
from tidefs.replica.store import (
    BlockNotFound,
    BlockStore,
    CorruptBlockError,
    FileStore,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    open_store,
)

# A generous bound on failing against an unreachable endpoint: this is a test
# that the call returns at all, not a timing test.
UNREACHABLE_BOUND_S = 60.0


@pytest.fixture
def store(store_url: str) -> Iterator[BlockStore]:
    with open_store(store_url) as s:
        yield s


def pattern(size: int, seed: int) -> bytes:
    """Return `size` bytes that differ from every other (size, seed) pair."""
    unit = seed.to_bytes(8, "big") + bytes(range(256))
    return (unit * (size // len(unit) + 1))[:size]


def rewrite_stored(store: BlockStore, key: str, change: Callable[[bytes], bytes]) -> None:
    """Damage a stored object behind the store's back: through the directory for a
    file store, through a raw put of the changed bytes for S3."""
    if isinstance(store, FileStore):
        path = store.root / key
        path.write_bytes(change(path.read_bytes()))
    else:
        store.put(key, change(store.get(key)))


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("size", [0, 1, 4096, MAX_BLOCK_SIZE], ids=["empty", "1B", "4KiB", "4MiB"])
def test_block_round_trip(store: BlockStore, size: int) -> None:
    key = block_key(new_slice_id(), 0)
    payload = pattern(size, size)
    store.put_block(key, payload)
    assert store.get_block(key) == payload
    assert store.get(key) == seal(payload)


@pytest.mark.parametrize("size", [0, 7, MAX_BLOCK_SIZE + HEADER_SIZE])
def test_raw_round_trip(store: BlockStore, size: int) -> None:
    data = pattern(size, 3)
    store.put("snapshots/volume/00000042", data)
    assert store.get("snapshots/volume/00000042") == data


def test_get_missing_raises_block_not_found(store: BlockStore) -> None:
    key = block_key(new_slice_id(), 3)
    with pytest.raises(BlockNotFound) as info:
        store.get(key)
    assert info.value.key == key
    with pytest.raises(BlockNotFound):
        store.get_block(key)
    assert isinstance(info.value, StoreError)


def test_a_prefix_of_keys_is_not_an_object(store: BlockStore) -> None:
    key = block_key(new_slice_id(), 0)
    store.put_block(key, b"x")
    parent = key.rpartition("/")[0]
    with pytest.raises(BlockNotFound):
        store.get(parent)
    assert not store.exists(parent)
    assert store.stat(parent) is None


def test_exists_and_stat(store: BlockStore) -> None:
    key = block_key(new_slice_id(), 1)
    assert not store.exists(key)
    assert store.stat(key) is None
    before = time.time_ns()
    store.put_block(key, b"abc")
    assert store.exists(key)
    st = store.stat(key)
    assert st is not None
    assert st.size == HEADER_SIZE + 3
    # S3 keeps whole seconds; allow for that and for a little clock skew.
    assert before - 5 * 10**9 <= st.mtime_ns <= time.time_ns() + 5 * 10**9


def test_delete_is_idempotent(store: BlockStore) -> None:
    key = block_key(new_slice_id(), 0)
    store.put_block(key, b"gone soon")
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(BlockNotFound):
        store.get(key)
    store.delete(key)
    store.delete(block_key(new_slice_id(), 9))  # never existed


def test_delete_leaves_siblings_and_put_after_delete_works(store: BlockStore) -> None:
    sid = new_slice_id()
    store.put_block(block_key(sid, 0), b"0")
    store.put_block(block_key(sid, 1), b"1")
    store.delete(block_key(sid, 0))
    assert store.get_block(block_key(sid, 1)) == b"1"
    store.delete(block_key(sid, 1))
    assert list(store.list(slice_prefix(sid))) == []
    store.put_block(block_key(sid, 2), b"2")  # the slice's directory may be gone now
    assert store.get_block(block_key(sid, 2)) == b"2"


def test_delete_many(store: BlockStore) -> None:
    sid = new_slice_id()
    keys = [block_key(sid, i) for i in range(5)]
    for key in keys:
        store.put_block(key, key.encode())
    store.delete_many([*keys[:3], block_key(new_slice_id(), 0)])
    assert list(store.list(slice_prefix(sid))) == keys[3:]
    store.delete_many([])


def test_list_with_prefix(store: BlockStore) -> None:
    keys = ["a/b/1", "a/b/2", "a/c", "a-c", "ab/x", "b", "snapshots/v/1"]
    for key in reversed(keys):
        store.put(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("")) == sorted(keys)
    assert list(store.list("a/")) == ["a/b/1", "a/b/2", "a/c"]
    assert list(store.list("a")) == sorted(["a/b/1", "a/b/2", "a/c", "a-c", "ab/x"])
    assert list(store.list("a/b")) == ["a/b/1", "a/b/2"]
    assert list(store.list("a/b/")) == ["a/b/1", "a/b/2"]
    assert list(store.list("a/b/1")) == ["a/b/1"]
    assert list(store.list("snap")) == ["snapshots/v/1"]
    assert list(store.list("zzz")) == []
    assert list(store.list("a/zzz/")) == []


def test_list_block_keys_of_slices(store: BlockStore) -> None:
    sids = [new_slice_id() for _ in range(3)]
    for sid in sids:
        for i in range(3):
            store.put_block(block_key(sid, i), b"")
    for sid in sids:
        assert list(store.list(slice_prefix(sid))) == [block_key(sid, i) for i in range(3)]
    everything = list(store.list("blocks/"))
    assert everything == sorted(block_key(sid, i) for sid in sids for i in range(3))
    assert sorted({parse_block_key(k)[0] for k in everything}) == sorted(sids)


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "./a", "a/../b", "..", ".hidden", "a/.tmp", "a\0b"]
)
def test_invalid_keys_are_rejected(store: BlockStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)


def test_put_is_atomic_under_concurrent_readers(store: BlockStore) -> None:
    """Writers replace one key with whole versions while readers check each read.

    Blocks are immutable in tidefs, but a put interrupted by a crash must still
    leave the old object or the new one; a reader racing the put is the
    observable face of the same property.
    """
    key = block_key(new_slice_id(), 0)
    size = 1 << 20
    versions = {seed: pattern(size, seed) for seed in range(8)}
    store.put_block(key, versions[0])
    stop = threading.Event()
    seen: set[int] = set()
    errors: list[BaseException] = []
    write_errors: list[BaseException] = []
    writes = [0]

    def write(seed: int) -> None:
        while not stop.is_set():
            try:
                store.put_block(key, versions[seed])
                writes[0] += 1
            except StoreUnavailable as e:
                write_errors.append(e)

    def read() -> None:
        try:
            while not stop.is_set():
                payload = store.get_block(key)  # verifies length and checksum
                seed = int.from_bytes(payload[:8], "big")
                assert payload == versions[seed]
                seen.add(seed)
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=write, args=(s,)) for s in range(1, 5)]
    threads += [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert seen, "readers read nothing"
    assert writes[0] > 0
    if isinstance(store, FileStore):
        assert not write_errors, write_errors[0]
    # On S3 a writer may fail: moto's server races when two PUTs replace the
    # same key at once and answers 500 (real S3 does not; tidefs never writes
    # one block twice at once). A failed put is reported, never half-applied,
    # which is what the readers above checked.


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[:-1] + bytes([d[-1] ^ 0x01]), id="last-payload-byte"),
        pytest.param(
            lambda d: d[:HEADER_SIZE] + b"\xff" + d[HEADER_SIZE + 1 :], id="first-payload-byte"
        ),
        pytest.param(lambda d: b"X" + d[1:], id="magic"),
        pytest.param(lambda d: d[:5] + b"\x01" + d[6:], id="flags"),
        pytest.param(lambda d: d[:-1], id="truncated-by-one"),
        pytest.param(lambda d: d[: len(d) // 2], id="truncated-half"),
        pytest.param(lambda d: d[: HEADER_SIZE - 1], id="truncated-header"),
        pytest.param(lambda d: b"", id="empty-object"),
        pytest.param(lambda d: d + b"\0", id="trailing-byte"),
    ],
)
def test_damaged_block_is_detected(store: BlockStore, damage: Callable[[bytes], bytes]) -> None:
    key = block_key(new_slice_id(), 0)
    store.put_block(key, pattern(64 << 10, 5))
    rewrite_stored(store, key, damage)
    with pytest.raises(CorruptBlockError) as info:
        store.get_block(key)
    assert info.value.key == key
    assert isinstance(info.value, StoreError)


def test_sixteen_threads_put_and_get_distinct_blocks(store: BlockStore) -> None:
    sid = new_slice_id()
    size = 512 << 10

    def work(i: int) -> None:
        key = block_key(sid, i)
        payload = pattern(size, i)
        store.put_block(key, payload)
        assert store.get_block(key) == payload
        assert store.exists(key)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(64)))
    assert list(store.list(slice_prefix(sid))) == [block_key(sid, i) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        payloads = list(pool.map(lambda i: store.get_block(block_key(sid, i)), range(64)))
    assert payloads == [pattern(size, i) for i in range(64)]


def test_close_is_idempotent_and_store_is_a_context_manager(store_url: str) -> None:
    with open_store(store_url) as store:
        store.put("k", b"v")
        assert repr(store).startswith(type(store).__name__)
    store.close()


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "url",
    [
        "",
        "dir/without/scheme",
        "/abs/path/without/scheme",
        "ftp://host/dir",
        "kafka://localhost:9092",
        "file://remotehost/dir",
        "file:relative/dir",
        "file:///tmp/x?fsync=0",
        "s3://",
        "s3:///prefix-without-bucket",
        "s3://Bad_Bucket/p",
        "s3://ab/p",
        "s3://bucket:9000/p",
        "s3://user@bucket/p",
        "s3://bucket/p?unknown=1",
        "s3://bucket/p?timeout=soon",
        "s3://bucket/p?timeout=-1",
        "s3://bucket/p?timeout=1&timeout=2",
        "s3://bucket/p?create=maybe",
        "s3://bucket/p?endpoint=not-a-url",
        "s3://bucket/p?endpoint=ftp://127.0.0.1:1",
        "s3://bucket/p?addressing_style=sideways",
        "s3://bucket/./p",
        "s3://bucket/p#fragment",
    ],
)
def test_malformed_urls_raise_config_error(url: str) -> None:
    with pytest.raises(StoreConfigError):
        open_store(url)


def test_unknown_options_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError):
        open_store(tmp_path.as_uri(), create_bucket=True)
    with pytest.raises(StoreConfigError):
        open_store("s3://bucket/p", fsync=False)


# --------------------------------------------------------------------------- directory


def test_file_store_creates_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b c" / "store"
    with open_store(root.as_uri(), timeout=1) as store:
        store.put_block("blocks/00/0000000000000100/00000", b"x")
    assert (root / "blocks/00/0000000000000100/00000").is_file()
    with open_store(f"file://localhost{tmp_path / 'other'}") as store:
        assert list(store.list()) == []


def test_file_store_under_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"not a directory")
    target = regular / "store"
    with pytest.raises(StoreUnavailable) as info:
        open_store(target.as_uri())
    assert str(target) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_file_store_in_read_only_directory_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir(mode=0o500)
    try:
        with pytest.raises(StoreUnavailable) as info:
            open_store(root.as_uri())
        assert str(root) in str(info.value)
    finally:
        root.chmod(0o700)


def test_file_store_ignores_leftovers_of_a_crashed_put(tmp_path: Path) -> None:
    """A crash between writing the temporary file and renaming it leaves a dot
    file: never listed, never read as a key, and the key is still absent."""
    store = open_store(tmp_path.as_uri())
    key = block_key(new_slice_id(), 0)
    path = tmp_path / key
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.0123456789abcdef.tmp").write_bytes(seal(b"half")[:7])
    assert list(store.list()) == []
    assert not store.exists(key)
    with pytest.raises(BlockNotFound):
        store.get(key)
    store.put_block(key, b"whole")
    assert list(store.list()) == [key]
    assert store.get_block(key) == b"whole"


def test_file_store_puts_leave_no_temporary_files(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    for i in range(4):
        store.put_block(block_key(7, i), pattern(1000, i))
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(names) == [f"{i:05d}" for i in range(4)]


# --------------------------------------------------------------------------- S3


def test_s3_missing_bucket_is_a_clear_error(s3_server: S3Server, s3_env: dict[str, str]) -> None:
    url = s3_server.store_url("tidefs-no-such-bucket")
    with pytest.raises(StoreUnavailable) as info:
        open_store(url)
    assert "tidefs-no-such-bucket" in str(info.value)
    assert "create=1" in str(info.value)


def test_s3_create_bucket_option(s3_server: S3Server, s3_env: dict[str, str]) -> None:
    bucket = f"tidefs-created-{os.getpid()}-{new_slice_id() % 10**6}"
    try:
        with open_store(s3_server.store_url(bucket) + "&create=1") as store:
            store.put("k", b"v")
        with open_store(s3_server.store_url(bucket), create_bucket=True) as store:
            assert store.get("k") == b"v"
    finally:
        s3_server.drop_bucket(bucket)


def test_s3_prefixes_isolate_stores_in_one_bucket(
    s3_server: S3Server, s3_env: dict[str, str], s3_store_url: str
) -> None:
    bucket = s3_store_url.split("/")[2]
    with (
        open_store(s3_server.store_url(bucket, "region-a")) as a,
        open_store(s3_server.store_url(bucket, "region-b/nested")) as b,
    ):
        a.put("blocks/k", b"a")
        b.put("blocks/k", b"b")
        assert a.get("blocks/k") == b"a"
        assert b.get("blocks/k") == b"b"
        assert list(a.list()) == ["blocks/k"]
        assert list(b.list()) == ["blocks/k"]


def test_s3_closed_port_is_unavailable_within_bound(s3_env: dict[str, str]) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_store(f"s3://tidefs-x/p?endpoint=http://127.0.0.1:{port}&timeout=3")
    assert time.monotonic() - start < UNREACHABLE_BOUND_S


def test_s3_silent_endpoint_is_unavailable_within_bound(s3_env: dict[str, str]) -> None:
    """An endpoint that accepts connections and never answers must time out, not hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            open_store(f"s3://tidefs-x/p?endpoint=http://127.0.0.1:{port}&timeout=1.5")
        elapsed = time.monotonic() - start
    assert 0.3 < elapsed < UNREACHABLE_BOUND_S


def test_s3_endpoint_going_away_and_coming_back(s3_env: dict[str, str]) -> None:
    """Stop the endpoint under an open store: calls fail, bounded; after a restart
    moto has lost its state, which reads as an unavailable bucket, not as
    missing blocks."""
    server = S3Server()
    server.start()
    try:
        bucket = server.create_bucket()
        store = open_store(server.store_url(bucket) + "&timeout=3")
        key = block_key(new_slice_id(), 0)
        store.put_block(key, b"before")
        server.stop()
        for call in (lambda: store.get_block(key), lambda: store.put_block(key, b"x")):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - start < UNREACHABLE_BOUND_S
        with pytest.raises(StoreUnavailable):
            list(store.list())
        server.start()
        with pytest.raises(StoreUnavailable, match="does not exist"):
            store.get_block(key)
        server.create_bucket(bucket)
        store.put_block(key, b"after")
        assert store.get_block(key) == b"after"
        store.close()
    finally:
        server.close()


def test_s3_missing_credentials_are_a_config_error(
    s3_server: S3Server, s3_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreConfigError, match="credentials"):
        open_store(s3_store_url)


# --------------------------------------------------------------------------- block format


def test_seal_layout() -> None:
    sealed = seal(b"payload")
    assert len(sealed) == HEADER_SIZE + 7
    assert sealed[:4] == b"TDFB"
    assert sealed[HEADER_SIZE:] == b"payload"
    assert int.from_bytes(sealed[12:16], "big") == zlib.crc32(b"payload", zlib.crc32(sealed[:12]))
    assert unseal("k", sealed) == b"payload"
    assert unseal("k", bytearray(sealed)) == b"payload"
    assert unseal("k", memoryview(sealed)) == b"payload"


def test_seal_rejects_oversized_payload() -> None:
    seal(bytes(MAX_BLOCK_SIZE))
    with pytest.raises(ValueError):
        seal(bytes(MAX_BLOCK_SIZE + 1))


def test_every_single_bit_flip_is_detected() -> None:
    sealed = seal(pattern(48, 1))
    for i in range(len(sealed)):
        for bit in range(8):
            damaged = bytearray(sealed)
            damaged[i] ^= 1 << bit
            with pytest.raises(CorruptBlockError):
                unseal("k", damaged)


def test_every_truncation_and_extension_is_detected() -> None:
    sealed = seal(pattern(40, 2))
    for n in range(len(sealed)):
        with pytest.raises(CorruptBlockError):
            unseal("k", sealed[:n])
    with pytest.raises(CorruptBlockError):
        unseal("k", sealed + b"\0")


def test_block_keys_round_trip_and_spread() -> None:
    sid = 0x0123456789ABCDEF
    assert block_key(sid, 3) == "blocks/ef/0123456789abcdef/00003"
    assert slice_prefix(sid) == "blocks/ef/0123456789abcdef/"
    assert block_key(sid, 3).startswith(slice_prefix(sid))
    for sid, index in [(1, 0), (2**64 - 1, 99999), (2**63, 100000), (255, 12)]:
        assert parse_block_key(block_key(sid, index)) == (sid, index)
    ids = [new_slice_id() for _ in range(2000)]
    assert all(0 < i < 2**63 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({block_key(i, 0).split("/")[1] for i in ids}) > 200  # of 256 prefixes


@pytest.mark.parametrize(
    "key",
    [
        "blocks/ef/0123456789abcdef/3",
        "blocks/ee/0123456789abcdef/00003",
        "blocks/EF/0123456789ABCDEF/00003",
        "blocks/ef/123456789abcdef/00003",
        "blocks/ef/0123456789abcdef/000003",
        "blocks/ef/0123456789abcdef/00003/",
        "snapshots/ef/0123456789abcdef/00003",
        "blocks/ef/0123456789abcdef",
    ],
)
def test_parse_block_key_rejects_foreign_keys(key: str) -> None:
    with pytest.raises(ValueError):
        parse_block_key(key)


def test_block_key_rejects_out_of_range() -> None:
    for sid, index in [(-1, 0), (2**64, 0), (1, -1)]:
        with pytest.raises(ValueError):
            block_key(sid, index)
