"""KVCacheManager: which blocks each request holds, prefix-cache lookups and publication.

Invariants (checked by ``check_invariants`` and the property-based tests):
- a block is in the free queue exactly when its ref count is 0;
- a block's ref count equals the number of requests whose block list holds it;
- once every request is freed, every block is free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.kv_cache.block_pool import BlockPool, KVBlock
from core.kv_cache.hashing import extend_block_hashes
from core.request import Request

logger = logging.getLogger(__name__)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache

    def take(self) -> tuple[int, int]:
        out = (self.queries, self.hits)
        self.queries = self.hits = 0
        return out


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # How many of each request's leading blocks have been published to the prefix cache.
        self._num_published: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    # ------------------------------------------------------------------ hashing
    def update_block_hashes(self, request: Request) -> None:
        """Hash the request's newly completed blocks (cheap when nothing completed)."""
        if not self.enable_prefix_caching:
            return
        if len(request.block_hashes) < request.num_tokens // self.block_size:
            extend_block_hashes(
                request.block_hashes, request.all_token_ids, self.block_size, request.prefix_cache_key
            )

    # ------------------------------------------------------------------ lookup
    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request, in whole blocks, never covering the last token
        (its logits must be computed)."""
        if not self.enable_prefix_caching:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    # ------------------------------------------------------------------ allocation
    def num_blocks_needed(self, request: Request, num_tokens: int, computed: list[KVBlock]) -> int:
        """New blocks to allocate so the request can hold ``num_tokens`` tokens in total."""
        held = len(self.req_to_blocks.get(request.request_id, ())) + len(computed)
        return max(0, cdiv(num_tokens, self.block_size) - held)

    def can_allocate(self, request: Request, num_tokens: int, computed: list[KVBlock] = ()) -> bool:
        # Hit blocks that sit in the free queue are revived, not allocated, but they stop being
        # available for allocation.
        revived = sum(1 for b in computed if b.ref_cnt == 0)
        needed = self.num_blocks_needed(request, num_tokens, list(computed))
        return needed + revived <= self.pool.num_free_blocks

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed: list[KVBlock] | None = None,
        num_computed_from_cache: int = 0,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens after the computed ones (and after the
        prefix-cache hits ``computed``, when admitting). Returns the ids of the blocks added to the
        request, or None when the pool cannot supply them (nothing is changed then)."""
        total = request.num_computed_tokens + num_computed_from_cache + num_new_tokens
        if not computed:
            # The common decode step: the tokens fit in the blocks held and fill no new block to
            # publish. Nothing changes; this path keeps scheduling 256 running requests cheap.
            held = self.req_to_blocks.get(request.request_id)
            if held is not None and total <= len(held) * self.block_size:
                if not self.enable_prefix_caching:
                    return []
                num_full = min(total, request.num_tokens) // self.block_size
                if num_full <= self._num_published.get(request.request_id, 0):
                    return []
        computed = computed or []
        if not self.can_allocate(request, total, computed):
            return None
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        added: list[KVBlock] = []
        if computed:
            self.pool.touch(computed)
            added.extend(computed)
        added.extend(self.pool.allocate(self.num_blocks_needed(request, total, computed)))
        blocks.extend(added)
        # Publish the blocks this step fills. Safe before they are computed: any request that
        # hits them is scheduled in a later step, on the same stream.
        if self.enable_prefix_caching:
            self.update_block_hashes(request)
            num_full = min(total, request.num_tokens) // self.block_size
            start = self._num_published.get(request.request_id, 0)
            for i in range(start, num_full):
                self.pool.cache(blocks[i], request.block_hashes[i])
            self._num_published[request.request_id] = max(start, num_full)
        return [b.block_id for b in added]

    def fork(self, parent: Request, child: Request, num_tokens: int) -> int:
        """Let ``child`` share the parent's full blocks covering its first ``num_tokens`` tokens
        (which must be computed and identical). Returns the number of tokens shared."""
        parent_blocks = self.req_to_blocks.get(parent.request_id, [])
        n = min(num_tokens, parent.num_computed_tokens) // self.block_size
        if child.request_id in self.req_to_blocks or n == 0:
            return 0
        shared = parent_blocks[:n]
        self.pool.touch(shared)
        self.req_to_blocks[child.request_id] = list(shared)
        self._num_published[child.request_id] = n
        return n * self.block_size

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so a chain's tail is evicted before its
        head (the head is more likely to be shared)."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        num_published = self._num_published.pop(request.request_id, 0)
        if blocks:
            # allocate_slots publishes the blocks a step will fill before the step runs. A request
            # freed before that (preempted later in the same schedule()) never gets them computed:
            # they must not stay findable, or a later hit reads KV that was never written.
            for block in blocks[request.num_computed_tokens // self.block_size : num_published]:
                self.pool.uncache(block)
            self.pool.free(list(reversed(blocks)))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ checking
    def check_invariants(self) -> None:
        held: dict[int, int] = {}
        for blocks in self.req_to_blocks.values():
            for b in blocks:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            refs = held.get(block.block_id, 0)
            if block.ref_cnt != refs:
                raise AssertionError(f"block {block.block_id}: ref_cnt {block.ref_cnt} != {refs} holders")
            if (block.ref_cnt == 0) != self.pool.is_free(block):
                raise AssertionError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but free={self.pool.is_free(block)}"
                )
            if block.block_hash is not None and self.pool.lookup(block.block_hash) is not block:
                raise AssertionError(f"block {block.block_id} has a hash that does not map to it")
