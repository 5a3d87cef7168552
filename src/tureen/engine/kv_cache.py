"""Paged KV-cache block manager with prefix caching. Pure Python: no torch.

Physical layout (the model runner owns the tensors; this module owns the bookkeeping)::

    request block table      physical pool (num_blocks x block_size token slots)
    [ 7, 23, 12 ]   ---->    block 7:  tokens  0..15 of the request
                             block 23: tokens 16..31
                             block 12: tokens 32..(partially filled)

A *full* block is identified by a hash chained over its tokens and its parent block's hash, so
equal hashes mean equal prefixes. Blocks are reference counted: a request that shares a cached
prefix takes a reference on those blocks and skips their prefill.

Free-block order (``BlockPool.free``): an insertion-ordered dict used as an LRU queue. Blocks are
taken from the front. A freed block is appended at the back *and keeps its hash*, so it can
still be hit until it reaches the front and is reused (evicted). A finished request frees its
blocks tail-first, so when its blocks are evicted the tail goes before the shared head.
"""

from __future__ import annotations

from dataclasses import dataclass

from tureen.engine.block_hash import BlockHasher, Sha256Hasher
from tureen.engine.request import Request


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set while the block is full and registered in the cache


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # LRU order, front evicted first
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def lookup(self, block_hash: int) -> KVBlock | None:
        block_id = self.cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks (removing them from the free queue if idle)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        assert n <= len(self.free), "caller must check num_free first"
        out = []
        for _ in range(n):
            block = self.blocks[next(iter(self.free))]
            del self.free[block.block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block; idle blocks join the back of the free queue."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} released twice"
            if block.ref_cnt == 0:
                self.free[block.block_id] = None
                if not self.enable_caching:
                    self._evict(block)

    def register(self, block: KVBlock, block_hash: int) -> None:
        """Record a newly full block in the prefix cache (first writer wins on equal hashes)."""
        if self.enable_caching and block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block.block_id

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block.block_id:
                del self.cached[block.block_hash]
            block.block_hash = None


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 hasher: BlockHasher | None = None) -> None:
        self.block_size = block_size
        self.hasher = hasher or Sha256Hasher()  # tureen.engine.block_hash: --prefix-caching-hash-algo
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache (cumulative)
        self.prefix_cache_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-idle blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, req: Request) -> list[KVBlock]:
        """Longest chain of cached full blocks matching the start of ``req``'s tokens.

        At least one token is always left to compute, because the step that computes the last
        known token is the one that samples the next.
        """
        if not self.enable_caching:
            return []
        self._update_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted request's prefix-cache lookup (for metrics)."""
        if self.enable_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[KVBlock] = (),
                       num_lookahead_tokens: int = 0) -> bool:
        """Give ``req`` blocks for ``computed`` cache hits plus ``num_new_tokens`` more tokens.

        ``num_lookahead_tokens`` more slots follow for drafted, unverified tokens: they get blocks
        but are never hashed, since their tokens may yet be rejected (see ``rollback``).
        Returns False, changing nothing, when the pool cannot supply them.
        """
        num_computed = req.num_computed_tokens + len(computed) * self.block_size
        total_blocks = self.blocks_needed(num_computed + num_new_tokens + num_lookahead_tokens)
        num_new_blocks = total_blocks - len(req.block_ids) - len(computed)
        idle_hits = sum(1 for b in computed if b.ref_cnt == 0)  # touching these shrinks the free queue
        if num_new_blocks + idle_hits > self.pool.num_free:
            return False
        self.pool.touch(list(computed))
        new_blocks = self.pool.allocate(max(num_new_blocks, 0))
        req.block_ids.extend(b.block_id for b in (*computed, *new_blocks))
        self._register_full_blocks(req, num_computed + num_new_tokens)
        return True

    def rollback(self, req: Request) -> int:
        """Return the blocks past ``req``'s known tokens (they held only rejected drafts) to the pool.

        Such blocks were never registered in the prefix cache, so nothing else refers to them.
        Returns how many blocks were freed.
        """
        keep = self.blocks_needed(req.num_tokens)
        extra = [self.pool.blocks[i] for i in reversed(req.block_ids[keep:])]
        if extra:
            self.pool.release(extra)
            del req.block_ids[keep:]
        return len(extra)

    def free(self, req: Request) -> None:
        """Release a request's blocks, tail first (see the module docstring), and clear its table."""
        blocks = [self.pool.blocks[i] for i in reversed(req.block_ids)]
        self.pool.release(blocks)
        req.block_ids = []
        req.num_registered_blocks = 0

    def _register_full_blocks(self, req: Request, num_tokens: int) -> None:
        if not self.enable_caching:
            return
        num_full = num_tokens // self.block_size
        if num_full <= req.num_registered_blocks:
            return
        self._update_hashes(req)
        for i in range(req.num_registered_blocks, num_full):
            self.pool.register(self.pool.blocks[req.block_ids[i]], req.block_hashes[i])
        req.num_registered_blocks = num_full

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        hashes = req.block_hashes
        salt = req.sampling_params.cache_salt
        for i in range(len(hashes), req.num_tokens // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(self.hasher(parent, req.all_token_ids[i * bs:(i + 1) * bs], salt))
