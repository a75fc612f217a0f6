"""Paged KV blocks of one replica, owned by the head.

Blocks are reference-counted. A full block whose tokens are computed gets a
prefix-cache key: a hash chain over its tokens and all tokens before it, so
one key names one exact prefix. A block whose refcount drops to zero goes to
the back of the free queue but keeps its key; it can be revived by a cache
hit until allocation reaches it at the front (LRU eviction). Every operation
is O(1) per block touched.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

BlockHash = bytes


def hash_block(parent: Optional[BlockHash], tokens: Sequence[int]) -> BlockHash:
    """Key of a full block: chained over its parent's key, so equal keys mean equal prefixes.

    A cryptographic hash (128-bit BLAKE2b), because a collision would hand one
    user's cached K/V to another prompt: Python's hash() is 64 bits and easy to
    collide on purpose. About a microsecond per block.
    """
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def salt_root(salt: Optional[str]) -> Optional[BlockHash]:
    """The parent key of a salted request's first block: its chain, and so every
    key in it, differs from any other salt's (and from no salt's)."""
    if salt is None:
        return None
    return hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=16, person=b"folio-cache-salt").digest()


def hash_blocks(
    token_ids: Sequence[int], block_size: int, start: int = 0, parent: Optional[BlockHash] = None
) -> list[BlockHash]:
    """Keys of the full blocks of token_ids from block index `start` on."""
    out: list[BlockHash] = []
    for b in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size])
        out.append(parent)
    return out


def reusable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a sequence a prefix hit may cover. The last token is always
    computed, because its logits are sampled, so a hit covers at most num_tokens - 1."""
    return (num_tokens - 1) // block_size


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: Optional[BlockHash] = None  # set once full and computed


class BlockManager:
    """Free queue, refcounts and the prefix cache for one replica's pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, oldest first. Cached ones among them stay hittable.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    # ---------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0

    def cached_prefix(self, keys: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of `keys` (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        out = []
        for k in keys:
            bid = self._cached.get(k)
            if bid is None:
                break
            out.append(bid)
        return out

    def can_allocate(self, n: int, reuse: Sequence[int] = ()) -> bool:
        """Whether n new blocks fit after taking `reuse` (hits that may sit in the free queue)."""
        revived = sum(1 for b in reuse if self.blocks[b].ref_count == 0)
        return n <= len(self._free) - revived

    # ---------------------------------------------------------------- mutations
    def take(self, block_ids: Iterable[int]) -> None:
        """Reference cached blocks (a prefix-cache hit)."""
        for b in block_ids:
            blk = self.blocks[b]
            if blk.ref_count == 0:
                del self._free[b]
            blk.ref_count += 1

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {n}, have {len(self._free)}")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            blk = self.blocks[b]
            if blk.key is not None:
                if self._cached.get(blk.key) == b:
                    del self._cached[blk.key]
                blk.key = None
            blk.ref_count = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference each. Freed in reverse so a sequence's tail evicts first."""
        for b in reversed(block_ids):
            blk = self.blocks[b]
            blk.ref_count -= 1
            assert blk.ref_count >= 0, f"block {b} freed twice"
            if blk.ref_count == 0:
                self._free[b] = None

    def cache(self, block_id: int, key: BlockHash) -> None:
        """Publish a full, computed block under its prefix key."""
        if not self.enable_prefix_caching:
            return
        blk = self.blocks[block_id]
        if blk.key is not None:
            return
        if key in self._cached:
            return  # another block already holds this prefix; this one stays private
        blk.key = key
        self._cached[key] = block_id

    # ---------------------------------------------------------------- checking
    def check_integrity(self, held: Iterable[Sequence[int]] = ()) -> None:
        """Prove the bookkeeping: refcounts equal the holders, free queue = unreferenced.

        `held` lists the block tables of every live request. With none live,
        every block must be free.
        """
        refs = [0] * self.num_blocks
        for table in held:
            for b in table:
                refs[b] += 1
        for blk in self.blocks:
            assert blk.ref_count == refs[blk.block_id], (
                f"block {blk.block_id}: refcount {blk.ref_count}, held {refs[blk.block_id]} times"
            )
            assert (blk.ref_count == 0) == (blk.block_id in self._free), (
                f"block {blk.block_id}: refcount {blk.ref_count} but free-queue membership wrong"
            )
        for key, b in self._cached.items():
            assert self.blocks[b].key == key, f"cache entry for block {b} disagrees with the block"
