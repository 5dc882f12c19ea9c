"""KVCacheManager / BlockPool: a hypothesis state machine against an independent model, plus
targeted unit tests (LRU order, the last-token rule, duplicate content, failed allocations).

The model tracks, for every block, which requests hold it and what it *contains* (the token prefix
whose KV the holder wrote into it), so a prefix-cache hit can be checked against the tokens the
hitting request actually has, not against the manager's own hashes.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from core.kv_cache.block_pool import BlockPool
from core.kv_cache.hashing import extend_block_hashes, hash_block
from core.kv_cache.manager import KVCacheManager
from core.request import Request
from ipc.sampling_params import SamplingParams

BS = 4  # tokens per block in the property tests
NUM_BLOCKS = 16
MAX_LEN = 40  # longest request the state machine grows

_ids = itertools.count()


def make_request(tokens: list[int], request_id: str | None = None) -> Request:
    return Request(
        request_id=request_id if request_id is not None else f"r{next(_ids)}",
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=None),
        eos_token_id=None,
        arrival_time=0.0,
    )


def snapshot(kv: KVCacheManager) -> tuple[Any, ...]:
    """Everything an allocation may change, LRU order included."""
    pool = kv.pool
    return (
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        list(pool._free),
        dict(pool._cached),
        {rid: [b.block_id for b in blocks] for rid, blocks in kv.req_to_blocks.items()},
        dict(kv._num_published),
    )


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """Admit like the scheduler does: prefix lookup, then allocate; mark everything computed."""
    hits, num_hit = kv.get_computed_blocks(req)
    if num_new is None:
        num_new = req.num_tokens - num_hit
    ids = kv.allocate_slots(req, num_new, hits, num_hit)
    if ids is not None:
        req.num_computed_tokens = num_hit + num_new
    return ids


# --------------------------------------------------------------------------- state machine

# Two fixed "system prompts" make shared prefixes (and hence prefix-cache hits) frequent.
_BASES = ([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1], [2, 2, 1, 1, 3, 3, 2, 2, 1, 1, 3, 3])
_prompts = st.builds(
    lambda base, cut, tail: _BASES[base][:cut] + tail,
    st.integers(0, 1),
    st.one_of(st.sampled_from([4, 5, 8, 9, 12, 13, 16]), st.integers(0, 16)),
    st.lists(st.integers(1, 3), max_size=6),
).filter(lambda p: 0 < len(p) <= 24)


class KVCacheMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    @initialize()
    def setup(self) -> None:
        self.kv = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
        self.live: dict[str, Request] = {}
        # Independent model: blocks each request holds, what each block contains, hash -> tokens.
        self.held: dict[str, list[int]] = {}
        self.content: dict[int, tuple[int, ...] | None] = dict.fromkeys(range(NUM_BLOCKS))
        self.hash_tokens: dict[bytes, tuple[int, ...]] = {}
        self.unique = itertools.count(100)  # tokens no prompt shares

    # ------------------------------------------------------------------ model helpers
    def _record_allocation(self, req: Request, ids: list[int], num_hits: int) -> None:
        for block_id in ids[num_hits:]:
            self.content[block_id] = None  # fresh block: whatever it held is gone
        self.held.setdefault(req.request_id, []).extend(ids)
        self._record_computed(req)

    def _record_computed(self, req: Request) -> None:
        """The test 'computes' every allocated token at once: full blocks get their content."""
        tokens = req.all_token_ids
        for i, block_id in enumerate(self.held[req.request_id][: req.num_computed_tokens // BS]):
            prefix = tuple(tokens[: (i + 1) * BS])
            if self.content[block_id] is None:
                self.content[block_id] = prefix
            assert self.content[block_id] == prefix, f"block {block_id} holds another prefix"
        for i, h in enumerate(req.block_hashes):
            prefix = tuple(tokens[: (i + 1) * BS])
            assert self.hash_tokens.setdefault(h, prefix) == prefix, "two prefixes share a hash"

    def _check_hits(self, req: Request, hits: list[Any], num_hit: int) -> None:
        assert num_hit == len(hits) * BS
        assert num_hit < req.num_tokens, "a hit must never cover the last token"
        tokens = req.all_token_ids
        for i, block in enumerate(hits):
            assert self.content[block.block_id] == tuple(tokens[: (i + 1) * BS]), (
                f"hit block {block.block_id} does not hold the request's prefix"
            )
        # The hit is the longest: the next full block (short of the last token's) is not cached.
        if len(hits) < (req.num_tokens - 1) // BS:
            assert self.kv.pool.lookup(req.block_hashes[len(hits)]) is None

    def _admit(self, req: Request, chunk: int) -> Request | None:
        hits, num_hit = self.kv.get_computed_blocks(req)
        self._check_hits(req, hits, num_hit)
        num_new = max(1, min(chunk, req.num_tokens - num_hit))
        before = snapshot(self.kv)
        ids = self.kv.allocate_slots(req, num_new, hits, num_hit)
        if ids is None:
            assert snapshot(self.kv) == before, "a failed allocation changed the pool"
            return None
        assert ids[: len(hits)] == [b.block_id for b in hits]
        req.num_computed_tokens = num_hit + num_new
        self.live[req.request_id] = req
        self._record_allocation(req, ids, len(hits))
        return req

    # ------------------------------------------------------------------ rules
    @rule(target=requests, prompt=_prompts, chunk=st.integers(1, 24))
    def allocate(self, prompt: list[int], chunk: int) -> Any:
        req = self._admit(make_request(prompt), chunk)
        return multiple() if req is None else req

    @rule(req=requests, k=st.integers(1, 6), tokens=st.lists(st.integers(1, 3), min_size=6, max_size=6))
    def append(self, req: Request, k: int, tokens: list[int]) -> None:
        if req.request_id not in self.live:
            return
        if req.num_computed_tokens == req.num_tokens:  # caught up: the model sampled k tokens
            room = MAX_LEN - req.num_tokens
            req.output_token_ids.extend(tokens[: min(k, room)])
        num_new = min(k, req.num_tokens - req.num_computed_tokens)
        if num_new == 0:
            return
        before = snapshot(self.kv)
        ids = self.kv.allocate_slots(req, num_new)
        if ids is None:
            assert snapshot(self.kv) == before, "a failed allocation changed the pool"
            return
        req.num_computed_tokens += num_new
        self._record_allocation(req, ids, 0)

    @rule(target=requests, parent=requests, cut=st.integers(0, MAX_LEN))
    def fork(self, parent: Request, cut: int) -> Any:
        if parent.request_id not in self.live:
            return multiple()
        cut = min(cut, parent.num_tokens)
        child = make_request(parent.all_token_ids[:cut])
        shared = self.kv.fork(parent, child, cut)
        expected_blocks = min(cut, parent.num_computed_tokens) // BS
        assert shared == expected_blocks * BS
        if shared == 0:
            assert child.request_id not in self.kv.req_to_blocks
            return multiple()
        child.num_computed_tokens = shared
        self.live[child.request_id] = child
        self.held[child.request_id] = list(self.held[parent.request_id][:expected_blocks])
        self._record_computed(child)
        return child

    @rule(req=consumes(requests))
    def free(self, req: Request) -> None:
        if req.request_id not in self.live:
            return
        self.kv.free(req)
        del self.live[req.request_id]
        del self.held[req.request_id]

    @precondition(lambda self: self.kv.num_free_blocks > 0)
    @rule(target=requests)
    def evict(self) -> Any:
        """A request of never-seen tokens taking every free block: cached free blocks get reused."""
        n = self.kv.num_free_blocks
        req = make_request([next(self.unique) for _ in range(n * BS)])
        hits, num_hit = self.kv.get_computed_blocks(req)
        assert hits == [] and num_hit == 0
        req = self._admit(req, n * BS)
        assert req is not None, "a request needing exactly the free blocks must fit"
        assert self.kv.num_free_blocks == 0
        return req

    @rule()
    def reset_prefix_cache(self) -> None:
        ok = self.kv.reset_prefix_cache()
        assert ok == (not any(self.held.values()))
        if ok:
            assert self.kv.pool.num_cached_blocks == 0
            assert all(b.block_hash is None for b in self.kv.pool.blocks)

    @rule(prompt=_prompts)
    def lookup_only(self, prompt: list[int]) -> None:
        """A lookup alone never changes anything; hits are a chain matching the tokens."""
        req = make_request(prompt)
        before = snapshot(self.kv)
        hits, num_hit = self.kv.get_computed_blocks(req)
        self._check_hits(req, hits, num_hit)
        assert snapshot(self.kv) == before

    # ------------------------------------------------------------------ invariants
    @invariant()
    def manager_invariants(self) -> None:
        if hasattr(self, "kv"):
            self.kv.check_invariants()

    @invariant()
    def model_invariants(self) -> None:
        if not hasattr(self, "kv"):
            return
        pool = self.kv.pool
        refs: dict[int, int] = {}
        for rid, ids in self.held.items():
            assert self.kv.block_ids(rid) == ids, f"{rid} holds other blocks than the model says"
            assert len(ids) == len(set(ids)), f"{rid} holds a block twice"
            for block_id in ids:
                refs[block_id] = refs.get(block_id, 0) + 1
        for block in pool.blocks:
            n = refs.get(block.block_id, 0)
            assert block.ref_cnt == n, f"block {block.block_id}: ref_cnt {block.ref_cnt}, {n} holders"
            assert not (pool.is_free(block) and n > 0), f"block {block.block_id} free and referenced"
            assert pool.is_free(block) == (n == 0)
            if block.block_hash is not None:
                # A cached block (free or not) holds exactly the prefix its hash stands for.
                assert pool.lookup(block.block_hash) is block
                assert self.content[block.block_id] == self.hash_tokens[block.block_hash]
        assert pool.num_free_blocks == NUM_BLOCKS - len(refs)
        assert set(self.kv.req_to_blocks) == set(self.held)
        assert 0.0 <= self.kv.usage <= 1.0

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for req in list(self.live.values()):
            self.kv.free(req)
        self.kv.check_invariants()
        assert self.kv.num_free_blocks == NUM_BLOCKS
        assert all(b.ref_cnt == 0 for b in self.kv.pool.blocks)
        assert self.kv.usage == 0.0
        assert self.kv.reset_prefix_cache()
        assert self.kv.pool.num_cached_blocks == 0


KVCacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
TestKVCacheStateMachine = KVCacheMachine.TestCase


# --------------------------------------------------------------------------- hashing


def test_hash_chain_depends_on_parent_and_extra_key() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [1, 2, 3, 4]) != a, "equal tokens under another parent must differ"
    assert hash_block(None, [1, 2, 3, 4], b"lora-1") != a


def test_extend_block_hashes_only_hashes_full_blocks_and_is_incremental() -> None:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7], 4)
    assert len(hashes) == 1
    first = hashes[0]
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert hashes[0] == first and len(hashes) == 2
    assert hashes[1] == hash_block(first, [5, 6, 7, 8])


# --------------------------------------------------------------------------- targeted unit tests


def test_prefix_hit_never_covers_the_last_token() -> None:
    kv = KVCacheManager(8, 4)
    a = make_request(list(range(8)))  # exactly two full blocks
    a_ids = admit(kv, a)
    assert a_ids is not None
    kv.free(a)
    same = make_request(list(range(8)))
    hits, n = kv.get_computed_blocks(same)
    assert n == 4 and [b.block_id for b in hits] == a_ids[:1], "the last token's block is recomputed"
    longer = make_request([*range(8), 99])
    hits, n = kv.get_computed_blocks(longer)
    assert n == 8 and [b.block_id for b in hits] == a_ids
    single = make_request([0])
    assert kv.get_computed_blocks(single) == ([], 0)


def test_prefix_hit_stops_at_first_mismatch() -> None:
    kv = KVCacheManager(8, 4)
    a = make_request([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4])
    a_ids = admit(kv, a)
    assert a_ids is not None
    b = make_request([1, 1, 1, 1, 9, 2, 2, 2, 3, 3, 3, 3, 4])  # block 1 differs, block 2 equal
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and [h.block_id for h in hits] == a_ids[:1]


def test_lru_evicts_the_tail_of_a_freed_chain_first() -> None:
    kv = KVCacheManager(4, 4)
    a = make_request(list(range(12)))  # three full blocks
    a_ids = admit(kv, a)
    assert a_ids is not None and len(a_ids) == 3
    a_hashes = list(a.block_hashes)
    kv.free(a)
    assert all(kv.pool.lookup(h) is not None for h in a_hashes), "freed blocks stay cached"

    # Two fresh blocks: the never-used block first, then the tail of a's chain.
    b = make_request([50 + i for i in range(8)])
    b_ids = admit(kv, b)
    assert b_ids is not None
    unused = (set(range(4)) - set(a_ids)).pop()
    assert b_ids == [unused, a_ids[2]]
    assert kv.pool.lookup(a_hashes[2]) is None, "the tail is evicted first"
    assert kv.pool.lookup(a_hashes[0]) is not None and kv.pool.lookup(a_hashes[1]) is not None

    # a's prompt again (one token longer) now hits exactly the surviving head of the chain.
    again = make_request([*range(12), 7])
    hits, n = kv.get_computed_blocks(again)
    assert [h.block_id for h in hits] == a_ids[:2] and n == 8
    kv.check_invariants()


def test_lru_evicts_least_recently_freed_request_first() -> None:
    kv = KVCacheManager(4, 4)
    a, b = make_request([1] * 8), make_request([2] * 8)
    a_ids, b_ids = admit(kv, a), admit(kv, b)
    assert a_ids is not None and b_ids is not None
    kv.free(a)
    kv.free(b)
    c = make_request([3] * 8)
    c_ids = admit(kv, c)
    assert c_ids == [a_ids[1], a_ids[0]], "a was freed first, so its blocks go first, tail first"
    assert all(kv.pool.lookup(h) is not None for h in b.block_hashes)


def test_prefix_hit_revives_free_block_and_removes_it_from_free_queue() -> None:
    kv = KVCacheManager(4, 4)
    a = make_request([5] * 9)
    a_ids = admit(kv, a)
    assert a_ids is not None
    kv.free(a)
    b = make_request([5] * 9)
    assert kv.get_computed_blocks(b)[1] == 8
    b_ids = admit(kv, b)
    assert b_ids is not None and b_ids[:2] == a_ids[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in b_ids] == [1, 1, 1]
    assert not any(kv.pool.is_free(kv.pool.blocks[i]) for i in b_ids)
    kv.check_invariants()


def test_duplicate_content_blocks_stay_private_and_first_writer_wins() -> None:
    kv = KVCacheManager(8, 4)
    prompt = [7] * 9
    a, b = make_request(prompt), make_request(prompt)
    # Both look up before either allocates (two admissions racing in one step).
    a_hits, _ = kv.get_computed_blocks(a)
    b_hits, _ = kv.get_computed_blocks(b)
    assert a_hits == b_hits == []
    a_ids = kv.allocate_slots(a, 9, a_hits, 0)
    b_ids = kv.allocate_slots(b, 9, b_hits, 0)
    a.num_computed_tokens = b.num_computed_tokens = 9
    assert a_ids is not None and b_ids is not None and not set(a_ids) & set(b_ids)
    blocks = kv.pool.blocks
    assert [blocks[i].block_hash for i in a_ids[:2]] == a.block_hashes[:2]
    assert [blocks[i].block_hash for i in b_ids] == [None, None, None], "duplicates must stay private"
    assert a.block_hashes[0] != a.block_hashes[1], "equal tokens in another position hash differently"
    kv.check_invariants()

    kv.free(a)
    kv.free(b)
    kv.check_invariants()
    c = make_request(prompt)
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == a_ids[:2] and n == 8
    assert kv.num_free_blocks == 8


def test_failed_allocation_changes_nothing_when_admitting_with_free_hits() -> None:
    kv = KVCacheManager(4, 4)
    a = make_request([*range(12), 99])  # 4 blocks, 3 of them full
    assert admit(kv, a) is not None
    kv.free(a)
    filler = make_request([60, 61, 62])
    assert admit(kv, filler) is not None  # takes a's partial (never cached) tail block
    assert kv.num_free_blocks == 3
    # 3 cached free hits to revive + 2 new blocks = 5 > 3 free.
    big = make_request([*range(12), 1, 2, 3, 4, 5, 6, 7, 8])
    hits, n = kv.get_computed_blocks(big)
    assert n == 12 and all(h.ref_cnt == 0 for h in hits)
    assert not kv.can_allocate(big, big.num_tokens, hits)
    before = snapshot(kv)
    assert kv.allocate_slots(big, big.num_tokens - n, hits, n) is None
    assert snapshot(kv) == before
    assert big.request_id not in kv.req_to_blocks
    # Exactly at the boundary it fits: 2 revived hits + 1 new block = 3 free.
    fits = make_request(list(range(12)))
    hits, n = kv.get_computed_blocks(fits)
    assert n == 8 and kv.can_allocate(fits, fits.num_tokens, hits)
    assert kv.allocate_slots(fits, 4, hits, n) is not None
    assert kv.num_free_blocks == 0
    kv.check_invariants()


def test_failed_allocation_changes_nothing_when_growing() -> None:
    kv = KVCacheManager(2, 4)
    a = make_request([1, 2, 3, 4, 5])
    assert admit(kv, a) is not None
    b = make_request([9, 9, 9])
    b_ids = admit(kv, b)
    assert b_ids is None, "no block left for b"
    assert b.request_id not in kv.req_to_blocks
    a.output_token_ids.extend([6, 7, 8, 9])  # needs a third block
    before = snapshot(kv)
    assert kv.allocate_slots(a, a.num_tokens - a.num_computed_tokens) is None
    assert snapshot(kv) == before
    kv.check_invariants()


def test_fork_shares_only_computed_full_blocks() -> None:
    kv = KVCacheManager(8, 4)
    parent = make_request(list(range(10)))
    parent_ids = admit(kv, parent, num_new=6)  # chunked: 6 of 10 computed
    assert parent_ids is not None
    child = make_request(list(range(10)))
    assert kv.fork(parent, child, 10) == 4, "only the one full computed block is shared"
    assert kv.block_ids(child.request_id) == parent_ids[:1]
    assert kv.pool.blocks[parent_ids[0]].ref_cnt == 2
    assert kv.fork(parent, child, 10) == 0, "a child is forked once"
    lone = make_request([0, 1, 2])
    assert kv.fork(parent, lone, 3) == 0 and lone.request_id not in kv.req_to_blocks
    kv.free(parent)
    assert kv.pool.blocks[parent_ids[0]].ref_cnt == 1
    kv.free(child)
    assert kv.num_free_blocks == 8
    kv.check_invariants()


def test_reset_prefix_cache_refused_while_blocks_are_held() -> None:
    kv = KVCacheManager(4, 4)
    a = make_request(list(range(9)))
    assert admit(kv, a) is not None
    assert not kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 2
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 0
    hits, n = kv.get_computed_blocks(make_request(list(range(9))))
    assert hits == [] and n == 0


def test_prefix_caching_disabled_never_hits_or_hashes() -> None:
    kv = KVCacheManager(4, 4, enable_prefix_caching=False)
    a = make_request(list(range(9)))
    assert admit(kv, a) is not None
    kv.free(a)
    hits, n = kv.get_computed_blocks(make_request(list(range(9))))
    assert hits == [] and n == 0
    assert kv.pool.num_cached_blocks == 0


def test_block_pool_rejects_over_free_and_over_allocation() -> None:
    pool = BlockPool(2, enable_caching=True)
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError):
        pool.free([block])
    with pytest.raises(ValueError):
        BlockPool(0, enable_caching=True)


def test_free_before_the_step_ran_unpublishes_blocks_it_never_computed() -> None:
    kv = KVCacheManager(8, 4)
    req = make_request(list(range(14)))
    assert admit(kv, req, num_new=4) is not None  # block 0 computed and cached
    # The next step is scheduled (blocks 1 and 2 published ahead of the forward pass) ...
    ids = kv.allocate_slots(req, 8)
    assert ids is not None and len(ids) == 2
    assert all(kv.pool.lookup(h) is not None for h in req.block_hashes[:3])
    # ... but the request is freed (preempted) before that step runs: computed is still 4.
    kv.free(req)
    assert kv.pool.lookup(req.block_hashes[0]) is not None, "computed blocks stay cached"
    assert kv.pool.lookup(req.block_hashes[1]) is None and kv.pool.lookup(req.block_hashes[2]) is None
    hits, n = kv.get_computed_blocks(make_request(list(range(14))))
    assert n == 4 and len(hits) == 1
    kv.check_invariants()
    assert kv.num_free_blocks == 8
