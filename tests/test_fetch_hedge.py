"""A cold mirror's reads: after local misses in a row, local and home are asked at once.

What users rely on: every read still returns the right bytes, a block the
mirror holds is still served by the mirror (no egress for it), and a block
no region holds is still reported as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidefs.journal.commands import SliceRef
from tidefs.replica.blocks import block_key, new_slice_id
from tidefs.replica.fetch import HEDGE_AFTER_MISSES, BlockFetcher, BlockNotInAnyRegion
from tidefs.replica.store import open_store

BS = 1 << 20


def test_cold_mirror_reads_stay_correct_and_prefer_a_local_copy(tmp_path: Path) -> None:
    stores = {r: open_store((tmp_path / f"store-{r}").as_uri()) for r in "ab"}
    refs = [SliceRef(new_slice_id(), 0, 1000, BS, "a") for _ in range(HEDGE_AFTER_MISSES + 3)]
    payloads = [os.urandom(1000) for _ in refs]
    for ref, payload in zip(refs, payloads, strict=True):
        stores["a"].put_block(block_key(ref.slice_id, 0), payload)
    try:
        with BlockFetcher("b", stores, timeout=5.0, write_back=False) as fetcher:
            cold = HEDGE_AFTER_MISSES + 1  # the last of these is asked of both at once
            assert [fetcher.get(ref, 0) for ref in refs[:cold]] == payloads[:cold]
            assert fetcher.stats().fallback_reads == cold

            # Copied to the mirror meanwhile: served by the mirror although both were asked.
            local = refs[cold]
            stores["b"].put_block(block_key(local.slice_id, 0), payloads[cold])
            assert fetcher.get(local, 0) == payloads[cold]
            stats = fetcher.stats()
            assert (stats.local_reads, stats.fallback_reads) == (1, cold)

            # Missing again, then a block that no region holds: still said so.
            for ref in refs[:HEDGE_AFTER_MISSES]:
                fetcher.get(ref, 0)
            with pytest.raises(BlockNotInAnyRegion):
                fetcher.get(SliceRef(new_slice_id(), 0, 10, BS, "a"), 0)
            assert fetcher.get(refs[-1], 0) == payloads[-1]
    finally:
        for store in stores.values():
            store.close()
