"""Turns the engine core's token-id outputs into RequestOutputs: incremental detokenization, stop
strings, logprobs, and n > 1 fan-in (one parent request, n child requests in the engine).

This is the only place that loops over a step's outputs in the frontend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from frontend.detokenizer import IncrementalDetokenizer
from frontend.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from frontend.tokenizer import Tokenizer
from ipc.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from ipc.sampling_params import RequestOutputKind, SamplingParams


@dataclass(slots=True)
class ChildState:
    """One of the parent's n sequences, as the engine knows it (its own request id)."""

    request_id: str
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    emitted_tokens: int = 0  # for DELTA outputs
    emitted_logprobs: int = 0
    emitted_finish: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[ChildState]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Children finished by a stop string: the engine does not know yet and must abort them.
    reqs_to_abort: list[str]


def child_request_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self.child_to_parent: dict[str, tuple[ParentRequest, ChildState]] = {}

    def __len__(self) -> int:
        return len(self.parents)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> list[str]:
        """Register a parent request; returns the engine request ids of its children."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = []
        for index, child_id in enumerate(child_request_ids(request_id, params.n)):
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            elif params.stop:
                raise ValueError("stop strings need a tokenizer (detokenize=True and a loaded tokenizer)")
            child = ChildState(
                child_id,
                index,
                detok,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            children.append(child)
        parent = ParentRequest(
            request_id,
            prompt,
            list(prompt_token_ids),
            params,
            children,
            RequestMetrics(arrival_time=arrival_time or time.time()),
        )
        self.parents[request_id] = parent
        for child in children:
            self.child_to_parent[child.request_id] = (parent, child)
        return [c.request_id for c in children]

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a parent request; returns its unfinished children's engine ids."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for child in parent.children:
            self.child_to_parent.pop(child.request_id, None)
        return [c.request_id for c in parent.children if not c.finished]

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.time()
        touched: dict[str, ParentRequest] = {}
        reqs_to_abort: list[str] = []
        for out in outputs:
            entry = self.child_to_parent.get(out.request_id)
            if entry is None:
                continue  # aborted here while the engine was still working on it
            parent, child = entry
            if child.finished:
                continue
            self._apply(parent, child, out, now)
            if child.finished and out.finish_reason is None:
                reqs_to_abort.append(child.request_id)
            touched[parent.request_id] = parent

        request_outputs = []
        for parent in touched.values():
            request_output = self._make_output(parent)
            if parent.finished:
                parent.metrics.finished_time = now
                self.abort_request(parent.request_id)
            if request_output is not None:
                request_outputs.append(request_output)
        return ProcessedOutputs(request_outputs, reqs_to_abort)

    # ------------------------------------------------------------------ internals
    def _apply(self, parent: ParentRequest, child: ChildState, out: EngineCoreOutput, now: float) -> None:
        if out.new_token_ids:
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            parent.metrics.last_token_time = now
        if out.first_scheduled_time is not None and parent.metrics.first_scheduled_time is None:
            parent.metrics.first_scheduled_time = out.first_scheduled_time
        child.token_ids.extend(out.new_token_ids)
        child.num_cached_tokens = out.num_cached_tokens
        if child.logprobs is not None and out.new_logprobs:
            for entry in out.new_logprobs:
                child.logprobs.append(self._logprob_dict(entry))
                child.cumulative_logprob += entry.logprobs[0]
        stop_string = None
        if child.detokenizer is not None:
            stop_string = child.detokenizer.update(out.new_token_ids, finished=out.finish_reason is not None)
        if stop_string is not None:
            child.finish_reason, child.stop_reason = "stop", stop_string
            # Tokens after the one completing the stop string are not part of the output.
            del child.token_ids[child.detokenizer.num_output_tokens :]
        elif out.finish_reason is not None:
            child.finish_reason = str(FinishReason(out.finish_reason))
            child.stop_reason = out.stop_reason

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        result: dict[int, Logprob] = {}
        for i, (token_id, logprob) in enumerate(zip(entry.token_ids, entry.logprobs)):
            if token_id in result:
                continue  # the sampled token also appears in the top-k
            rank = entry.sampled_rank if i == 0 else i
            text = self.tokenizer.token_text(token_id) if self.tokenizer is not None else None
            result[token_id] = Logprob(logprob=logprob, rank=rank, decoded_token=text)
        return result

    def _make_output(self, parent: ParentRequest) -> RequestOutput | None:
        kind = parent.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not parent.finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = []
        for child in parent.children:
            if delta:
                new_tokens = child.token_ids[child.emitted_tokens :]
                if not new_tokens and (not child.finished or child.emitted_finish):
                    continue
                child.emitted_finish = child.finished
                text = child.detokenizer.get_delta(child.finished) if child.detokenizer else ""
                logprobs = child.logprobs[child.emitted_logprobs :] if child.logprobs is not None else None
                child.emitted_tokens = len(child.token_ids)
                child.emitted_logprobs = len(child.logprobs or ())
            else:
                new_tokens = list(child.token_ids)
                text = child.detokenizer.output_text if child.detokenizer else ""
                logprobs = list(child.logprobs) if child.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=child.index,
                    text=text,
                    token_ids=new_tokens,
                    cumulative_logprob=child.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=child.finish_reason,
                    stop_reason=child.stop_reason,
                )
            )
        if not completions:
            return None
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=parent.finished,
            num_cached_tokens=max(c.num_cached_tokens for c in parent.children),
            metrics=parent.metrics,
        )
