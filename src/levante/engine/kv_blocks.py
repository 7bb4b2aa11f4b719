"""KV block ids: an allocator with reference counts and a prefix cache keyed by block hashes."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class BlockPool:
    """Allocator of KV block ids with reference counts and an optional prefix cache.

    With caching on, a full block is registered under the hash of its whole token prefix.
    When its last holder frees it, it keeps its contents and its hash while it waits in the
    free list (least recently freed first out); a later request whose prompt starts with the
    same tokens takes it back instead of recomputing it. Reallocating it drops the hash.
    """

    def __init__(self, num_blocks: int, *, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks, or None (and nothing taken) if the pool has fewer free."""
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the free list."""
        for block in reversed(blocks):  # tail blocks first: evicted before the shared head
            assert self._refs[block] > 0, f"block {block} freed twice"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that `block` holds the full block whose prefix hashes to `block_hash`."""
        if not self.enable_caching or block_hash in self._by_hash:
            return
        self._forget(block)
        self._hash_of[block] = block_hash
        self._by_hash[block_hash] = block

    def unregister(self, block: int, block_hash: bytes) -> None:
        """Drop `block` from the prefix cache if it is the block registered under the hash."""
        if self._by_hash.get(block_hash) == block:
            self._forget(block)

    def lookup(self, block_hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of `block_hashes`, each with a reference taken."""
        hits = []
        for digest in block_hashes if self.enable_caching else ():
            block = self._by_hash.get(digest)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            hits.append(block)
        return hits

    def _forget(self, block: int) -> None:
        old = self._hash_of[block]
        if old is not None:
            del self._by_hash[old]
            self._hash_of[block] = None


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of a full block given its parent's hash: it names the whole prefix, not the block.

    A cryptographic hash (blake2b), so no prompt can be crafted to collide with another's.
    """
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()

