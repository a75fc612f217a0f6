"""Block manager: refcounts, prefix-cache keys, LRU eviction, integrity checking."""

import os
import subprocess
import sys

import pytest

from folio.cluster.block_manager import BlockManager, hash_blocks


def test_hash_chain_names_whole_prefix():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1], "same block tokens after a different prefix must not share a key"
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a, "partial block gets no key"

    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_hash_keys_are_wide_and_the_same_in_every_process():
    """Python's hash() collides on purpose-built inputs (hash(-1) == hash(-2)); the
    keys are 128-bit digests, and a process with another hash seed computes the same
    ones (prefix-affinity routing compares keys computed apart)."""
    [a], [b] = hash_blocks([-1, 5], 2), hash_blocks([-2, 5], 2)
    assert a != b and len(a) == 16
    code = "from folio.cluster.block_manager import hash_blocks; print(hash_blocks(list(range(40)), 16)[1].hex())"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert other == hash_blocks(list(range(40)), 16)[1].hex()


def test_allocate_free_refcount_and_integrity():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    x = bm.allocate(3)
    y = bm.allocate(2)
    assert bm.num_free == 3 and len(set(x + y)) == 5
    bm.check_integrity([x, y])
    with pytest.raises(AssertionError):
        bm.check_integrity([x])  # y's blocks are held but not listed: a leak
    bm.free(x)
    bm.free(y)
    assert bm.num_free == 8
    bm.check_integrity()
    with pytest.raises(RuntimeError):
        bm.allocate(9)


def test_cached_blocks_survive_free_and_are_revived():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    keys = hash_blocks([1, 2, 3, 4], 2)
    blocks = bm.allocate(2)
    for b, k in zip(blocks, keys):
        bm.cache(b, k)
    bm.free(blocks)
    assert bm.num_free == 4
    hit = bm.cached_prefix(keys)
    assert hit == blocks
    assert bm.can_allocate(2, reuse=hit) and not bm.can_allocate(3, reuse=hit)
    bm.take(hit)
    assert bm.num_free == 2
    bm.check_integrity([hit])
    bm.free(hit)


def test_lru_eviction_takes_least_recently_freed_first():
    bm = BlockManager(3, 1, enable_prefix_caching=True)
    a, b, c = bm.allocate(3)
    for blk, key in ((a, 101), (b, 102), (c, 103)):
        bm.cache(blk, key)
    bm.free([a])
    bm.free([c])
    bm.free([b])
    (fresh,) = bm.allocate(1)
    assert fresh == a and bm.cached_prefix([101]) == []
    assert bm.cached_prefix([103]) == [c] and bm.cached_prefix([102]) == [b]


def test_free_releases_tail_first_so_prefix_outlives_suffix():
    bm = BlockManager(4, 1, enable_prefix_caching=True)
    seq = bm.allocate(4)
    for i, blk in enumerate(seq):
        bm.cache(blk, 200 + i)
    bm.free(seq)
    bm.allocate(1)
    assert bm.cached_prefix([200, 201, 202]) == seq[:3], "the last block should be evicted first"


def test_double_free_is_caught():
    bm = BlockManager(2, 1, enable_prefix_caching=True)
    b = bm.allocate(1)
    bm.free(b)
    with pytest.raises(AssertionError):
        bm.free(b)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(2, 1, enable_prefix_caching=False)
    b = bm.allocate(1)
    bm.cache(b[0], 5)
    bm.free(b)
    assert bm.cached_prefix([5]) == []
