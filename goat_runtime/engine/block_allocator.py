"""The KV cache's block allocator: which sequence owns which block of the model's KV tensors.

A sequence's tokens live in the blocks its block table lists, token p at slot
block_table[p // block_size] * block_size + p % block_size (the tensors themselves are the
model's: `goat_runtime.model.kv_cache`). Blocks carry reference counts so that sequences share
prefix blocks: full blocks are cached under a hash of their content, their prefix and the
adapter that computed them (prefix caching).
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


class NoFreeBlocksError(RuntimeError):
    """The cache has fewer free blocks than asked for; the scheduler must wait or preempt."""


def block_hash(parent: bytes | None, key: str, tokens: Sequence[int]) -> bytes:
    """Content hash of a full block: its tokens, everything before them (the parent's hash) and
    the key of what computed it (the adapter, since adapters change K and V). A cryptographic
    digest, so crafted prompts cannot collide into another request's cached blocks."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(key.encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """Free list plus reference counts over block ids 0..num_blocks-1, with prefix caching.

    A full block can be registered under its content hash. When its last owner frees it, it
    keeps its contents and hash, and goes to the back of the free list: a later request with the
    same prefix takes it back (`lookup`), until an allocation reuses it, oldest first (LRU).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int = 1) -> list[int]:
        """n fresh blocks with reference count 1; all or nothing."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            digest = self._hash_of.pop(block, None)
            if digest is not None:
                del self._by_hash[digest]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def share(self, block: int) -> None:
        """One more owner of an allocated block."""
        if self._refs[block] < 1:
            raise ValueError(f"block {block} is not allocated")
        self._refs[block] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block with none left returns to the free list."""
        for b in blocks:
            if self._refs[b] < 1:
                raise ValueError(f"block {b} is freed more times than it was allocated")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    def register(self, block: int, digest: bytes) -> None:
        """Declare an allocated, full block's content hash (first one wins on duplicates)."""
        if digest not in self._by_hash and block not in self._hash_of:
            self._by_hash[digest] = block
            self._hash_of[block] = digest

    def lookup(self, digest: bytes) -> int | None:
        """The cached block with this content, now owned once more by the caller, or None."""
        block = self._by_hash.get(digest)
        if block is None:
            return None
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1
        return block
