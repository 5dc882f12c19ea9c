"""The continuous-batching scheduler: one unified token budget per step.

There is no prefill phase and no decode phase. Each request has ``num_computed_tokens`` and
``num_tokens``; every step hands out at most ``max_num_batched_tokens`` tokens and
``max_num_seqs`` sequences so that computed catches up with known. Running requests go first (so
every decode gets its token before new prompts take the rest), then waiting ones in FCFS order. A
long prompt is simply given what is left of the budget each step: chunked prefill falls out.

When the pool runs dry the scheduler preempts by recompute: the victim's blocks are freed (they
keep their hashes, so the resume is mostly a prefix-cache hit) and it goes back to the front of the
waiting queue. The victim is the running request with the *least computed tokens* (ties: the
newest): it loses the least work. vLLM takes the newest, which can throw away a long prefill.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from core.kv_cache.manager import KVCacheManager
from core.request import Request, RequestStatus
from ipc.config import CacheConfig, SchedulerConfig
from ipc.messages import (
    CachedRequestData,
    EngineCoreOutput,
    FinishReason,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, cache_config: CacheConfig, kv_manager: KVCacheManager
    ) -> None:
        self.config = config
        self.cache_config = cache_config
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the worker must drop at the next step (finished, aborted, preempted).
        self._worker_drops: list[str] = []
        # Requests the worker currently holds in its persistent batch.
        self._in_worker: set[str] = set()
        self._num_preemptions = 0
        self.total_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """Finish (e.g. abort) requests wherever they are; unknown ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.finish_reason = reason
            self._free_request(request)
            finished.append(request)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        # Running requests scheduled this step: id -> (request, new block ids, computed before).
        cached: dict[str, tuple[Request, list[int], int]] = {}
        new_reqs: list[NewRequestData] = []
        preempted = False

        # Hot loop (every running request, every step): attributes read once into locals.
        max_model_len = self.config.max_model_len
        allocate_slots = self.kv.allocate_slots
        for request in list(self.running):
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            num_tokens = request.num_tokens
            pending = request.num_output_placeholders
            if pending and (
                request.num_output_tokens + pending >= request.max_tokens
                or num_tokens + pending >= max_model_len
            ):
                continue  # the token in flight is its last: nothing more to schedule
            num_new = min(num_tokens + pending - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while (new_blocks := allocate_slots(request, num_new)) is None:
                victim = self._choose_victim()
                preempted = True
                if victim.request_id in cached:
                    budget += num_scheduled.pop(victim.request_id)
                    del cached[victim.request_id]
                self._preempt(victim)
                if victim is request:
                    break
            if new_blocks is None:
                continue
            cached[request.request_id] = (request, new_blocks, request.num_computed_tokens)
            num_scheduled[request.request_id] = num_new
            budget -= num_new

        # Admission. Skipped after a preemption: there is no room, and admitting now would only
        # trigger the next preemption.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            # Admit only when the whole known sequence fits: a half-admitted prompt would just
            # be preempted again (KV thrashing).
            if not self.kv.can_allocate(request, request.num_tokens, hits):
                break
            new_blocks = self.kv.allocate_slots(request, num_new, hits, num_hit_tokens)
            if new_blocks is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if self.kv.enable_prefix_caching:
                self.kv.stats.queries += request.num_tokens
                self.kv.stats.hits += num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            self.running.append(request)
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling_params=request.sampling_params,
                    block_ids=self.kv.block_ids(request.request_id),
                    num_computed_tokens=num_hit_tokens,
                    output_token_ids=list(request.output_token_ids),
                    eos_token_id=request.eos_token_id,
                    extra_eos_token_ids=list(request.extra_eos_token_ids),
                )
            )
            num_scheduled[request.request_id] = num_new
            budget -= num_new

        cached_data = CachedRequestData(
            req_ids=list(cached),
            new_block_ids=[entry[1] for entry in cached.values()],
            num_computed_tokens=[entry[2] for entry in cached.values()],
        )

        drops, self._worker_drops = self._worker_drops, []
        self._in_worker.difference_update(drops)
        self._in_worker.update(num_scheduled)
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_data,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=drops,
        )
        # Advance now, so the next schedule() can already hand out the following chunk (and, with
        # async scheduling, the token this step will sample).
        requests = self.requests
        num_prompt_tokens = 0
        for request_id, n in num_scheduled.items():
            request = requests[request_id]
            computed = request.num_computed_tokens
            prompt_left = request.num_prompt_tokens - computed
            if prompt_left > 0:
                num_prompt_tokens += min(prompt_left, n)
            computed += n
            request.num_computed_tokens = computed
            if computed >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1
        self._num_prompt_tokens += num_prompt_tokens
        return output

    def _choose_victim(self) -> Request:
        return min(self.running, key=lambda r: (r.num_computed_tokens, -r.arrival_time))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(request)
        self._drop_from_worker(request.request_id)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    # ------------------------------------------------------------------ results
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        requests = self.requests
        all_logprobs = runner_output.logprobs
        for request_id, token_id in zip(runner_output.req_ids, runner_output.sampled_token_ids):
            request = requests.get(request_id)
            if request is None or request.status == RequestStatus.FINISHED:
                continue  # aborted while the step ran
            request.num_output_placeholders -= 1
            # A request preempted while its token was in flight still gets it: the token was
            # sampled from the right context, and the resume recomputes it like any other.
            output_token_ids = request.output_token_ids
            output_token_ids.append(token_id)
            logprobs = all_logprobs.get(request_id) if all_logprobs else None
            self._check_stop(request, token_id)
            outputs.append(
                EngineCoreOutput(
                    request_id=request_id,
                    new_token_ids=[token_id],
                    new_logprobs=[logprobs] if logprobs is not None else None,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    first_scheduled_time=request.first_scheduled_time if len(output_token_ids) == 1 else None,
                )
            )
            if request.finish_reason is not None:
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                self._free_request(request)
        self._num_generation_tokens += len(outputs)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if token_id == request.eos_token_id and not params.ignore_eos:
                request.finish_reason = FinishReason.STOP
                return
            # The generation config's other EOS ids stop as stop tokens do (vLLM adds them to
            # stop_token_ids unless ignore_eos), so they report themselves as the stop reason.
            if (token_id in params.stop_token_ids) or (
                token_id in request.extra_eos_token_ids and not params.ignore_eos
            ):
                request.finish_reason = FinishReason.STOP
                request.stop_reason = token_id
                return
        max_tokens = params.max_tokens
        if (max_tokens is not None and num_out >= max_tokens) or (
            len(request.prompt_token_ids) + num_out >= self.config.max_model_len
        ):
            request.finish_reason = FinishReason.LENGTH

    def _free_request(self, request: Request) -> None:
        request.status = RequestStatus.FINISHED
        self.kv.free(request)
        del self.requests[request.request_id]
        self._drop_from_worker(request.request_id)

    def _drop_from_worker(self, request_id: str) -> None:
        if request_id in self._in_worker:
            self._worker_drops.append(request_id)

    # ------------------------------------------------------------------ stats
    def make_stats(self) -> SchedulerStats:
        queries, hits = self.kv.stats.take()
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=self._num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )
        self._num_preemptions = self._num_prompt_tokens = self._num_generation_tokens = 0
        return stats
