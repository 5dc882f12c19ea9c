"""Scheduler + KVCacheManager driven by a fake model runner.

The fake runner mirrors the worker: it keeps a persistent batch built only from the SchedulerOutput
diffs, and a fake KV cache in which every scheduled token writes (position, prefix identity) into
its slot. Before "sampling" it checks that every slot the request attends to holds exactly its own
prefix, so a wrong block table, a stale prefix-cache hit or a bad diff shows up as a failure.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from core.kv_cache.hashing import prefix_cache_key
from core.kv_cache.manager import KVCacheManager
from core.request import Request, RequestStatus
from core.scheduler import Scheduler
from ipc.config import CacheConfig, SchedulerConfig
from ipc.messages import EngineCoreOutput, FinishReason, ModelRunnerOutput, SchedulerOutput
from ipc.sampling_params import SamplingParams

VOCAB = 50
EOS = 0

_ids = itertools.count()


def default_next_token(tokens: list[int]) -> int:
    """A deterministic 'greedy model': equal sequences continue equally. Never EOS (0)."""
    return 1 + (sum(tokens[-3:]) * 7 + len(tokens)) % (VOCAB - 1)


def extend_identities(identities: list[int], tokens: list[int], upto: int) -> list[int]:
    """identities[p] stands for tokens[: p + 1] (a chain, so equal prefixes share identities)."""
    while len(identities) < upto:
        parent = identities[-1] if identities else 0
        identities.append(hash((parent, tokens[len(identities)])))
    return identities


@dataclass
class _WorkerRequest:
    tokens: list[int]
    block_ids: list[int]
    computed: int
    prefix_ids: list[int] = field(default_factory=list)

    def identity(self, p: int) -> int:
        return extend_identities(self.prefix_ids, self.tokens, p + 1)[p]


class FakeRunner:
    def __init__(self, block_size: int, next_token: Callable[[str, list[int]], int]) -> None:
        self.block_size = block_size
        self.next_token = next_token
        self.batch: dict[str, _WorkerRequest] = {}
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, prefix identity)

    def _slot(self, req: _WorkerRequest, p: int) -> int:
        bs = self.block_size
        assert p // bs < len(req.block_ids), "token position beyond the request's blocks"
        return req.block_ids[p // bs] * bs + p % bs

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in so.finished_req_ids:
            assert req_id in self.batch, f"drop of {req_id}, which the worker does not hold"
            del self.batch[req_id]
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.batch, f"{new.req_id} added twice without a drop"
            self.batch[new.req_id] = _WorkerRequest(
                tokens=list(new.prompt_token_ids) + list(new.output_token_ids),
                block_ids=list(new.block_ids),
                computed=new.num_computed_tokens,
            )
        cached = so.scheduled_cached_reqs
        for req_id, block_ids, computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            req = self.batch[req_id]
            assert computed == req.computed, f"{req_id}: scheduler says {computed}, worker has {req.computed}"
            req.block_ids.extend(block_ids)
        assert set(cached.req_ids) | {n.req_id for n in so.scheduled_new_reqs} == set(so.num_scheduled_tokens)
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())

        out = ModelRunnerOutput()
        # Write every scheduled token's KV first (as the layer's KV write precedes attention) ...
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.batch[req_id]
            assert n > 0 and req.computed + n <= len(req.tokens)
            for p in range(req.computed, req.computed + n):
                self.slots[self._slot(req, p)] = (p, req.identity(p))
        # ... then "attend": every position up to the end of the chunk must hold this prefix.
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.batch[req_id]
            end = req.computed + n
            for p in range(end):
                got = self.slots.get(self._slot(req, p))
                assert got == (p, req.identity(p)), f"{req_id}: KV at position {p} is not its own"
            req.computed = end
            if end == len(req.tokens):
                token = self.next_token(req_id, req.tokens)
                req.tokens.append(token)
                out.req_ids.append(req_id)
                out.sampled_token_ids.append(token)
        return out


class Harness:
    """Scheduler + KV manager + fake runner, with per-step checks."""

    def __init__(
        self,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 32,
        max_model_len: int = 256,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        next_token: Callable[[str, list[int]], int] | None = None,
    ) -> None:
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        cache = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(self.config, cache, self.kv)
        self.runner = FakeRunner(block_size, next_token or (lambda _rid, toks: default_next_token(toks)))
        self.outputs: dict[str, list[EngineCoreOutput]] = {}
        self.finished: dict[str, Request] = {}
        self.all_requests: dict[str, Request] = {}
        self.steps: list[SchedulerOutput] = []
        self._hash_ids: dict[bytes, tuple[int, list[int]]] = {}
        self.preempted_total = 0
        # Requests the worker holds that ended between steps: the next drop list must name them.
        self.expect_drops: set[str] = set()

    def add(
        self,
        prompt: list[int],
        request_id: str | None = None,
        eos_token_id: int | None = EOS,
        arrival_time: float | None = None,
        prefix_cache_key: bytes = b"",
        **params: object,
    ) -> Request:
        rid = request_id or f"req-{next(_ids)}"
        req = Request(
            request_id=rid,
            prompt_token_ids=list(prompt),
            sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
            eos_token_id=eos_token_id,
            arrival_time=arrival_time if arrival_time is not None else float(next(_ids)),
            prefix_cache_key=prefix_cache_key,
        )
        self.sched.add_request(req)
        self.all_requests[rid] = req
        return req

    def step(self) -> SchedulerOutput:
        sched, kv = self.sched, self.kv
        running_before = {r.request_id for r in sched.running}
        preempted_before = {rid: r.num_preemptions for rid, r in self.all_requests.items()}
        so = sched.schedule()
        self.steps.append(so)
        assert self.expect_drops <= set(so.finished_req_ids), "an ended request was not dropped"
        self.expect_drops.clear()
        # Budget and sequence limits.
        assert so.total_num_scheduled_tokens <= self.config.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= self.config.max_num_seqs
        assert len(sched.running) <= self.config.max_num_seqs
        assert len(so.finished_req_ids) == len(set(so.finished_req_ids)), "a drop listed twice"
        for rid in so.num_scheduled_tokens:
            assert self.all_requests[rid].status == RequestStatus.RUNNING
        # Work-conserving: without a preemption, a running request is short of its tokens only
        # when the budget ran out.
        preempted_now = any(
            r.num_preemptions > preempted_before[r.request_id] for r in self.all_requests.values()
        )
        if not preempted_now and any(r.num_computed_tokens < r.num_tokens for r in sched.running):
            assert so.total_num_scheduled_tokens == self.config.max_num_batched_tokens
        # Preempted requests are dropped from the worker in the same output.
        for rid, req in self.all_requests.items():
            if req.num_preemptions > preempted_before[rid]:
                self.preempted_total += req.num_preemptions - preempted_before[rid]
                assert rid in running_before
                assert rid in so.finished_req_ids
                assert req.status == RequestStatus.PREEMPTED and req in sched.waiting
                assert rid not in kv.req_to_blocks
        kv.check_invariants()
        runner_out = self.runner.execute(so)
        self.check_prefix_cache_holds_computed_kv()
        outs = sched.update_from_output(so, runner_out)
        for out in outs:
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                req = self.all_requests[out.request_id]
                self.finished[out.request_id] = req
                self.expect_drops.add(out.request_id)
                assert req.status == RequestStatus.FINISHED
                assert out.request_id not in kv.req_to_blocks
        kv.check_invariants()
        return so

    def check_prefix_cache_holds_computed_kv(self) -> None:
        """After a step ran, every block findable in the prefix cache holds the KV of exactly the
        prefix its hash stands for: a later hit may skip computing it."""
        bs = self.kv.block_size
        for req in self.all_requests.values():
            tokens = req.all_token_ids
            for i, h in enumerate(req.block_hashes):
                if h not in self._hash_ids:
                    self._hash_ids[h] = (i, extend_identities([], tokens, (i + 1) * bs)[i * bs :])
        for block in self.kv.pool.blocks:
            if block.block_hash is None:
                continue
            i, identities = self._hash_ids[block.block_hash]
            for j, identity in enumerate(identities):
                got = self.runner.slots.get(block.block_id * bs + j)
                assert got == (i * bs + j, identity), (
                    f"block {block.block_id} is in the prefix cache but slot {j} does not hold its KV"
                )

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                break
            self.step()
        else:
            raise AssertionError("requests did not finish")
        self.flush()

    def step_until(self, condition: Callable[[], bool], max_steps: int = 200) -> SchedulerOutput:
        """Step until ``condition()`` holds right after a step; returns that step's output."""
        for _ in range(max_steps):
            assert self.sched.has_unfinished_requests(), "everything finished first"
            so = self.step()
            if condition():
                return so
        raise AssertionError("condition never reached")

    def flush(self) -> None:
        """One empty step delivers the last drops; the worker must then hold nothing."""
        so = self.sched.schedule()
        assert so.total_num_scheduled_tokens == 0
        assert set(so.finished_req_ids) == self.expect_drops
        self.expect_drops.clear()
        self.runner.execute(so)
        assert self.runner.batch == {}, f"worker still holds {sorted(self.runner.batch)}"

    def abort(self, *request_ids: str) -> list[Request]:
        done = self.sched.finish_requests(request_ids, FinishReason.ABORT)
        for req in done:
            self.finished[req.request_id] = req
            if req.request_id in self.runner.batch:
                self.expect_drops.add(req.request_id)
        return done

    def tokens(self, rid: str) -> list[int]:
        return [t for out in self.outputs.get(rid, []) for t in out.new_token_ids]

    def assert_idle(self) -> None:
        assert not self.sched.has_unfinished_requests()
        assert self.kv.req_to_blocks == {}
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert self.kv.usage == 0.0
        assert self.sched.make_stats().kv_cache_usage == 0.0
        assert self.kv.reset_prefix_cache()


def prompt_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# --------------------------------------------------------------------------- budget and order


def test_token_budget_and_max_num_seqs_respected_every_step() -> None:
    h = Harness(max_num_seqs=3, max_num_batched_tokens=16, num_blocks=128)
    for i in range(10):
        h.add(prompt_of(5 + 3 * i, seed=i), max_tokens=6, ignore_eos=True)
    h.run()
    assert max(len(so.num_scheduled_tokens) for so in h.steps) == 3
    assert max(so.total_num_scheduled_tokens for so in h.steps) == 16
    assert all(len(h.tokens(rid)) == 6 for rid in h.all_requests)
    h.assert_idle()


def test_long_prompt_is_chunked_across_steps() -> None:
    h = Harness(max_num_batched_tokens=32)
    req = h.add(prompt_of(100), max_tokens=3, ignore_eos=True)
    chunks = []
    for _ in range(4):
        so = h.step()
        chunks.append(so.num_scheduled_tokens[req.request_id])
        assert (req.request_id in h.outputs) == (sum(chunks) == 100), "samples only after the whole prompt"
    assert chunks == [32, 32, 32, 4]
    assert [len(so.scheduled_new_reqs) for so in h.steps] == [1, 0, 0, 0]
    assert h.steps[1].scheduled_cached_reqs.num_computed_tokens == [32]
    h.run()
    assert len(h.tokens(req.request_id)) == 3
    h.assert_idle()


def test_without_chunked_prefill_a_prompt_over_budget_waits() -> None:
    h = Harness(max_num_batched_tokens=16, enable_chunked_prefill=False)
    a = h.add(prompt_of(10, 1), max_tokens=4, ignore_eos=True)
    b = h.add(prompt_of(12, 2), max_tokens=2, ignore_eos=True)
    so = h.step()
    assert so.num_scheduled_tokens == {a.request_id: 10}, "b's 12 tokens do not fit in the 6 left"
    h.run()
    assert len(h.tokens(b.request_id)) == 2
    h.assert_idle()


def test_running_requests_are_scheduled_before_waiting_ones() -> None:
    h = Harness(max_num_batched_tokens=8)
    a = h.add(prompt_of(6, 1), max_tokens=20, ignore_eos=True)
    h.step()  # a's prompt
    b = h.add(prompt_of(40, 2), max_tokens=2, ignore_eos=True)
    so = h.step()
    assert list(so.num_scheduled_tokens) == [a.request_id, b.request_id]
    assert so.num_scheduled_tokens == {a.request_id: 1, b.request_id: 7}
    c = h.add(prompt_of(30, 3), max_tokens=2, ignore_eos=True)
    so = h.step()
    # a decodes first, then b continues its prefill; c (waiting) gets nothing: the budget is gone.
    assert so.num_scheduled_tokens == {a.request_id: 1, b.request_id: 7}
    assert c.status == RequestStatus.WAITING
    h.run()
    h.assert_idle()


def test_waiting_requests_are_admitted_fcfs() -> None:
    h = Harness(max_num_seqs=1, max_num_batched_tokens=64)
    reqs = [h.add(prompt_of(4, i), max_tokens=2, ignore_eos=True) for i in range(4)]
    h.run()
    admitted = [n.req_id for so in h.steps for n in so.scheduled_new_reqs]
    assert admitted == [r.request_id for r in reqs]
    h.assert_idle()


# --------------------------------------------------------------------------- preemption


def test_preemption_picks_least_progress_victim_not_newest() -> None:
    # 6 blocks of 4. a (old, short prompt) and b (new, long prompt) fill 5 blocks.
    h = Harness(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    a = h.add(prompt_of(3, 1), max_tokens=8, ignore_eos=True, arrival_time=1.0)
    b = h.add(prompt_of(14, 2), max_tokens=8, ignore_eos=True, arrival_time=2.0)
    so = h.step_until(lambda: h.preempted_total > 0)
    # a had fewer computed tokens than b; vLLM would have taken b (the newest).
    assert a.num_preemptions == 1 and b.num_preemptions == 0
    assert so.finished_req_ids == [a.request_id]
    assert list(h.sched.waiting) == [a]
    assert so.num_scheduled_tokens == {b.request_id: 1}, "a's budget went back; b got its token"
    h.run()
    assert len(h.tokens(a.request_id)) == 8 and len(h.tokens(b.request_id)) == 8
    h.assert_idle()


def test_budget_of_a_victim_scheduled_earlier_in_the_step_is_handed_back() -> None:
    h = Harness(num_blocks=9, block_size=4, max_num_batched_tokens=6, max_model_len=36)
    x = h.add(prompt_of(1, 1), request_id="x", max_tokens=20, ignore_eos=True)
    h.add(prompt_of(4, 2), request_id="r", max_tokens=20, ignore_eos=True)
    h.add(prompt_of(26, 3), request_id="c", max_tokens=3, ignore_eos=True)  # chunked prefill
    so = h.step_until(lambda: x.num_preemptions > 0)
    # x (least progress) was scheduled first, then preempted so r could get a block; x's token
    # goes to c's prefill chunk instead of being lost.
    assert so.finished_req_ids == ["x"]
    assert so.num_scheduled_tokens == {"r": 1, "c": 5}
    h.run()
    assert len(h.tokens("x")) == 20
    h.assert_idle()


def test_preemption_tie_on_progress_takes_the_newest() -> None:
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    old = h.add(prompt_of(4, 1), max_tokens=8, ignore_eos=True, arrival_time=1.0)
    new = h.add(prompt_of(4, 2), max_tokens=8, ignore_eos=True, arrival_time=2.0)
    h.step_until(lambda: h.preempted_total > 0)
    assert new.num_preemptions == 1 and old.num_preemptions == 0
    h.run()
    h.assert_idle()


def test_preempted_requests_resume_and_produce_the_same_tokens() -> None:
    prompts = [prompt_of(9 + 5 * i, seed=10 + i) for i in range(6)]

    def run(num_blocks: int) -> tuple[Harness, dict[str, list[int]]]:
        h = Harness(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
        for i, p in enumerate(prompts):
            h.add(p, request_id=f"r{i}", max_tokens=10 + i, ignore_eos=True)
        h.run()
        h.assert_idle()
        return h, {rid: h.tokens(rid) for rid in h.all_requests}

    roomy, expected = run(256)
    assert roomy.preempted_total == 0
    tight, got = run(12)
    assert tight.preempted_total > 0, "the small cache must force preemptions"
    assert got == expected
    assert all(len(got[f"r{i}"]) == 10 + i for i in range(6))
    assert sum(r.num_preemptions for r in tight.all_requests.values()) == tight.preempted_total


def test_preemption_is_counted_in_stats_and_admission_pauses() -> None:
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    h.add(prompt_of(4, 1), max_tokens=8, ignore_eos=True)
    h.add(prompt_of(4, 2), max_tokens=8, ignore_eos=True)
    h.sched.make_stats()
    so = h.step_until(lambda: h.preempted_total > 0)
    assert so.scheduled_new_reqs == [], "no admission in the step that preempted"
    assert h.sched.make_stats().num_preemptions == 1
    assert h.sched.make_stats().num_preemptions == 0
    h.run()
    h.assert_idle()


def test_victim_scheduled_earlier_in_the_step_leaves_no_uncomputed_block_in_prefix_cache() -> None:
    """allocate_slots publishes the blocks a step will fill before the step runs. If a running
    request scheduled earlier in the step is then preempted for a later one, that step never
    computes its tokens: blocks it published must not stay findable in the prefix cache, or a later
    request hits them and attends to KV that was never written."""
    h = Harness(num_blocks=12, block_size=2, max_num_batched_tokens=16, max_model_len=24)
    for i in range(2):
        h.add(prompt_of(6, 10 + i), max_tokens=30, ignore_eos=True)
    x = h.add(prompt_of(1, 2), max_tokens=30, ignore_eos=True)  # least progress
    r = h.add(prompt_of(10, 3), max_tokens=5, ignore_eos=True)  # chunked: 3 of 10 tokens in step 1
    h.step()
    assert (x.num_tokens, r.num_computed_tokens, h.kv.num_free_blocks) == (2, 3, 3)
    # Step 2: x is scheduled for position 1, filling (and publishing) its first block. r then needs
    # 3 blocks with 1 free: x is preempted (frees 1, not enough), then r itself.
    # Harness.step checks that every prefix-cached block holds the KV its hash stands for.
    so = h.step()
    assert so.finished_req_ids == [x.request_id, r.request_id]
    assert x.num_preemptions == r.num_preemptions == 1
    # The client gives up on both and sends x's text so far, continued: a prefix-cache hit on the
    # block x published in step 2 would read position 1's KV, which was never written.
    h.abort(x.request_id, r.request_id)
    h.add([*x.all_token_ids, 7, 8], max_tokens=3, ignore_eos=True)
    h.run()  # the fake runner checks every attended position holds its own KV
    h.assert_idle()


# --------------------------------------------------------------------------- drops and aborts


def test_abort_waiting_request_frees_everything_and_is_not_dropped() -> None:
    h = Harness(max_num_seqs=1)
    a = h.add(prompt_of(5, 1), max_tokens=4, ignore_eos=True)
    b = h.add(prompt_of(5, 2), max_tokens=4, ignore_eos=True)
    h.step()
    assert b.status == RequestStatus.WAITING
    assert [r.request_id for r in h.abort(b.request_id)] == [b.request_id]
    assert b.finish_reason == FinishReason.ABORT and b.status == RequestStatus.FINISHED
    assert h.abort(b.request_id) == [], "aborting twice is a no-op"
    assert h.abort("no-such-request") == []
    so = h.step()
    assert b.request_id not in so.finished_req_ids, "the worker never saw b"
    h.run()
    assert len(h.tokens(a.request_id)) == 4
    h.assert_idle()


def test_abort_running_request_frees_its_blocks_and_is_dropped_once() -> None:
    h = Harness(num_blocks=32)
    a = h.add(prompt_of(20, 1), max_tokens=50, ignore_eos=True)
    b = h.add(prompt_of(6, 2), max_tokens=50, ignore_eos=True)
    h.step()
    h.step()
    assert a.status == RequestStatus.RUNNING
    held = len(h.kv.block_ids(a.request_id))
    free_before = h.kv.num_free_blocks
    h.abort(a.request_id)
    assert a.request_id not in h.kv.req_to_blocks
    assert h.kv.num_free_blocks == free_before + held
    h.kv.check_invariants()
    so = h.step()
    assert so.finished_req_ids == [a.request_id]
    assert a.request_id not in so.num_scheduled_tokens
    h.abort(b.request_id)
    so = h.step()
    assert so.finished_req_ids == [b.request_id]
    assert so.total_num_scheduled_tokens == 0
    assert h.runner.batch == {}
    h.assert_idle()


def test_abort_preempted_request_frees_it_without_second_drop() -> None:
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    h.add(prompt_of(4, 1), max_tokens=8, ignore_eos=True, arrival_time=1.0)
    new = h.add(prompt_of(4, 2), max_tokens=8, ignore_eos=True, arrival_time=2.0)
    h.step_until(lambda: new.num_preemptions > 0)
    assert new.status == RequestStatus.PREEMPTED
    h.abort(new.request_id)
    assert new.finish_reason == FinishReason.ABORT and new not in h.sched.waiting
    h.run()  # the runner asserts a drop of a request it does not hold
    h.assert_idle()


def test_output_for_aborted_request_in_flight_is_ignored() -> None:
    h = Harness()
    a = h.add(prompt_of(4, 1), max_tokens=5, ignore_eos=True)
    so = h.sched.schedule()
    runner_out = h.runner.execute(so)
    h.abort(a.request_id)
    assert h.sched.update_from_output(so, runner_out) == []
    assert a.output_token_ids == []
    h.flush()
    h.assert_idle()


def test_duplicate_request_id_is_refused() -> None:
    h = Harness()
    h.add([1, 2, 3], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        h.add([1, 2, 3], request_id="x")


# --------------------------------------------------------------------------- stop conditions


def scripted(script: dict[str, list[int]]) -> Callable[[str, list[int]], int]:
    """The runner samples each request's scripted tokens in order (then 7s)."""
    position: dict[str, int] = {}

    def next_token(rid: str, _tokens: list[int]) -> int:
        i = position.get(rid, 0)
        position[rid] = i + 1
        seq = script.get(rid, [])
        return seq[i] if i < len(seq) else 7

    return next_token


def finish_of(h: Harness, rid: str) -> EngineCoreOutput:
    last = h.outputs[rid][-1]
    assert last.finished and all(not o.finished for o in h.outputs[rid][:-1])
    return last


def test_eos_stops_and_is_the_last_token() -> None:
    h = Harness(next_token=scripted({"a": [5, 6, EOS, 8]}))
    h.add([1, 2, 3], request_id="a", max_tokens=10)
    h.run()
    assert h.tokens("a") == [5, 6, EOS]
    out = finish_of(h, "a")
    assert out.finish_reason == FinishReason.STOP and out.stop_reason is None
    h.assert_idle()


def test_ignore_eos_runs_to_max_tokens() -> None:
    h = Harness(next_token=scripted({"a": [EOS, EOS, EOS, EOS]}))
    h.add([1, 2, 3], request_id="a", max_tokens=4, ignore_eos=True)
    h.run()
    assert h.tokens("a") == [EOS] * 4
    assert finish_of(h, "a").finish_reason == FinishReason.LENGTH
    h.assert_idle()


def test_no_eos_token_id_means_eos_never_stops() -> None:
    h = Harness(next_token=scripted({"a": [EOS, EOS, EOS]}))
    h.add([1, 2, 3], request_id="a", eos_token_id=None, max_tokens=3)
    h.run()
    assert finish_of(h, "a").finish_reason == FinishReason.LENGTH
    h.assert_idle()


def test_stop_token_ids_stop_with_stop_reason() -> None:
    h = Harness(next_token=scripted({"a": [5, 42, 9], "b": [5, 6, 9]}))
    h.add([1, 2], request_id="a", max_tokens=10, stop_token_ids=[42, 43])
    h.add([1, 2], request_id="b", max_tokens=10, stop_token_ids=[9], ignore_eos=True)
    h.run()
    assert h.tokens("a") == [5, 42]
    out = finish_of(h, "a")
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == 42
    assert h.tokens("b") == [5, 6, 9], "stop_token_ids apply even with ignore_eos"
    assert finish_of(h, "b").stop_reason == 9
    h.assert_idle()


def test_min_tokens_suppresses_eos_and_stop_tokens() -> None:
    h = Harness(next_token=scripted({"a": [EOS, 42, EOS, 42, 5], "b": [EOS, 42, 5, 42]}))
    h.add([1, 2], request_id="a", max_tokens=10, min_tokens=3, stop_token_ids=[42])
    h.add([1, 2], request_id="b", max_tokens=10, min_tokens=3, stop_token_ids=[42])
    h.run()
    # a: the 3rd token (EOS) is at min_tokens, so it stops there.
    assert h.tokens("a") == [EOS, 42, EOS]
    assert finish_of(h, "a").finish_reason == FinishReason.STOP
    assert h.tokens("b") == [EOS, 42, 5, 42]
    out = finish_of(h, "b")
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == 42
    h.assert_idle()


def test_max_tokens_stops_with_length() -> None:
    h = Harness()
    h.add(prompt_of(5), request_id="a", max_tokens=7)
    h.add(prompt_of(5, 1), request_id="b", max_tokens=1)
    h.run()
    assert len(h.tokens("a")) == 7 and len(h.tokens("b")) == 1
    assert finish_of(h, "a").finish_reason == FinishReason.LENGTH
    assert finish_of(h, "b").finish_reason == FinishReason.LENGTH
    h.assert_idle()


def test_max_model_len_stops_with_length() -> None:
    h = Harness(max_model_len=12)
    h.add(prompt_of(9), request_id="a", max_tokens=None, ignore_eos=True)
    h.add(prompt_of(9, 1), request_id="b", max_tokens=100, ignore_eos=True)
    h.run()
    for rid in ("a", "b"):
        assert len(h.tokens(rid)) == 3, "prompt + output reach max_model_len exactly"
        assert finish_of(h, rid).finish_reason == FinishReason.LENGTH
    h.assert_idle()


def test_outputs_carry_num_cached_tokens() -> None:
    h = Harness(block_size=4)
    shared = prompt_of(12, 3)
    h.add([*shared, 1], request_id="a", max_tokens=2, ignore_eos=True)
    h.run()
    h.add([*shared, 2], request_id="b", max_tokens=2, ignore_eos=True)
    h.run()
    assert h.outputs["a"][0].num_cached_tokens == 0
    assert h.outputs["b"][0].num_cached_tokens == 12
    h.assert_idle()


def test_prefix_cache_is_shared_only_under_the_same_extra_key() -> None:
    """cache_salt and (later) the LoRA adapter are part of a block's identity: equal tokens under
    another key are a miss, and the same key hits."""
    h = Harness(block_size=4)
    shared = prompt_of(12, 3)
    keys = {
        "a": prefix_cache_key(cache_salt="tenant-1"),
        "b": prefix_cache_key(cache_salt="tenant-2"),
        "c": b"",
        "d": prefix_cache_key(lora_name="tenant-1"),
        "e": prefix_cache_key(cache_salt="tenant-1"),
    }
    for tail, (rid, key) in enumerate(keys.items()):
        h.add([*shared, tail], request_id=rid, prefix_cache_key=key, max_tokens=2, ignore_eos=True)
        h.run()
    cached = {rid: h.outputs[rid][0].num_cached_tokens for rid in keys}
    assert cached == {"a": 0, "b": 0, "c": 0, "d": 0, "e": 12}
    h.assert_idle()


def test_prefix_cache_keys_encode_each_part_unambiguously() -> None:
    keys = [
        prefix_cache_key(),
        prefix_cache_key(cache_salt="x"),
        prefix_cache_key(lora_name="x"),
        prefix_cache_key(cache_salt="x", lora_name="y"),
        prefix_cache_key(cache_salt="xl\x01\x00\x00\x00y"),
    ]
    assert keys[0] == b""
    assert len(set(keys)) == len(keys)


# --------------------------------------------------------------------------- stats


def test_stats_are_deltas_reset_by_make_stats() -> None:
    h = Harness(block_size=4, max_num_batched_tokens=64)
    shared = prompt_of(8, 4)
    h.add([*shared, 1, 2], request_id="a", max_tokens=3, ignore_eos=True)
    h.step()
    stats = h.sched.make_stats()
    assert stats.num_running_reqs == 1 and stats.num_waiting_reqs == 0
    assert stats.num_prompt_tokens == 10
    assert stats.num_generation_tokens == 1
    assert stats.prefix_cache_queries == 10 and stats.prefix_cache_hits == 0
    assert 0.0 < stats.kv_cache_usage <= 1.0
    again = h.sched.make_stats()
    assert (again.num_prompt_tokens, again.num_generation_tokens) == (0, 0)
    assert (again.prefix_cache_queries, again.prefix_cache_hits, again.num_preemptions) == (0, 0, 0)
    assert again.num_running_reqs == 1, "gauges are not deltas"
    h.run()
    h.add([*shared, 3, 4], request_id="b", max_tokens=2, ignore_eos=True)
    h.sched.make_stats()
    h.step()
    stats = h.sched.make_stats()
    assert stats.prefix_cache_queries == 10 and stats.prefix_cache_hits == 8
    assert stats.num_prompt_tokens == 2, "only the prompt tokens actually computed"
    h.run()
    stats = h.sched.make_stats()
    assert stats.num_running_reqs == stats.num_waiting_reqs == 0
    assert stats.kv_cache_usage == 0.0
    h.assert_idle()


# --------------------------------------------------------------------------- soak


@pytest.mark.parametrize("seed", range(8))
def test_randomized_soak_with_tiny_cache_and_aborts(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    max_model_len = 32
    h = Harness(
        num_blocks=max_model_len // block_size + rng.randint(0, 4),  # room for one full-length request
        block_size=block_size,
        max_num_seqs=rng.randint(3, 8),
        max_num_batched_tokens=rng.randint(6, 20),
        max_model_len=max_model_len,
        enable_prefix_caching=seed % 4 != 3,
        next_token=lambda _rid, toks: EOS if rng.random() < 0.05 else default_next_token(toks),
    )
    bases = [prompt_of(20, seed * 10 + i) for i in range(2)]
    aborted: set[str] = set()
    for step in range(300):
        if step < 200 and rng.random() < 0.4:
            # Shared prefixes and continuations of earlier requests' text make prefix-cache hits
            # (including hits on blocks of preempted and aborted requests) frequent.
            kind = rng.random()
            if kind < 0.3:
                prompt = prompt_of(rng.randint(1, 20), rng.randrange(1 << 30))
            elif kind < 0.7:
                prompt = rng.choice(bases)[: rng.randint(1, 20)]
            elif h.all_requests:
                src = rng.choice(list(h.all_requests.values()))
                prompt = src.all_token_ids[: rng.randint(1, src.num_tokens)]
            else:
                prompt = [1]
            prompt = (prompt + prompt_of(rng.randint(0, 4), rng.randrange(1 << 30)))[:24]
            max_tokens = rng.randint(1, 16)
            h.add(
                prompt,
                max_tokens=max_tokens,
                min_tokens=rng.choice([0, 0, min(2, max_tokens)]),
                ignore_eos=rng.random() < 0.3,
            )
        if rng.random() < 0.04 and h.sched.num_unfinished:
            victim = rng.choice(list(h.sched.waiting) + h.sched.running)
            assert h.abort(victim.request_id) == [victim]
            aborted.add(victim.request_id)
        if h.sched.has_unfinished_requests():
            h.step()
    h.run()
    assert h.preempted_total > 0, "the soak must exercise preemption"
    assert set(h.finished) == set(h.all_requests)
    for rid, req in h.all_requests.items():
        tokens = h.tokens(rid)
        assert tokens == req.output_token_ids
        if rid in aborted:
            assert req.finish_reason == FinishReason.ABORT
            continue
        params = req.sampling_params
        out = finish_of(h, rid)
        assert params.max_tokens is not None and len(tokens) <= params.max_tokens
        assert req.num_tokens <= max_model_len
        if out.finish_reason == FinishReason.LENGTH:
            assert len(tokens) == params.max_tokens or req.num_tokens == max_model_len
        else:
            assert out.finish_reason == FinishReason.STOP and tokens[-1] == EOS and not params.ignore_eos
            assert len(tokens) >= params.min_tokens
        # An earlier EOS was only legal where it could not stop the request.
        for i, token in enumerate(tokens[:-1]):
            assert token != EOS or params.ignore_eos or i + 1 < params.min_tokens
    h.assert_idle()
