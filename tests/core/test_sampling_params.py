"""SamplingParams validation and defaults, and msgspec round trips of every wire struct."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from ipc import messages as m
from ipc.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams

# --------------------------------------------------------------------------- validation

INVALID: list[tuple[str, dict[str, Any]]] = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": -0.5}),
    ("top_p", {"top_p": math.nan}),
    ("n", {"n": 0}),
    ("n", {"n": -3}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": math.nan}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": -100}),
    ("min_p", {"min_p": -0.01}),
    ("min_p", {"min_p": 1.5}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("presence_penalty", {"presence_penalty": math.nan}),
    ("frequency_penalty", {"frequency_penalty": 3.0}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("repetition_penalty", {"repetition_penalty": math.inf}),
    ("logprobs", {"logprobs": MAX_LOGPROBS + 1}),
    ("logprobs", {"logprobs": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("min_tokens", {"min_tokens": -1}),
    ("prompt_logprobs", {"prompt_logprobs": 1}),
    ("prompt_logprobs", {"prompt_logprobs": 0}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["ok", ""]}),
    ("stop", {"stop": ""}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("logit_bias", {"logit_bias": {-1: 1.0}}),
    ("logit_bias", {"logit_bias": {5: 100.5}}),
    ("logit_bias", {"logit_bias": {5: -101.0}}),
    ("logit_bias", {"logit_bias": {5: math.nan}}),
    ("seed", {"seed": 2**63}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"max_tokens": None},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"temperature": 0.0},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 1e-3},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"min_tokens": 4, "max_tokens": 4},
        {"min_tokens": 100, "max_tokens": None},
        {"logit_bias": {0: -100.0, 7: 100.0}},
        {"seed": -(2**63)},
        {"seed": 2**63 - 1},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert p.n == 1
    assert p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.include_stop_str_in_output is False
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.logit_bias is None
    assert p.output_kind == RequestOutputKind.CUMULATIVE
    assert p.detokenize is True
    assert not p.is_greedy


def test_normalisations() -> None:
    assert SamplingParams(top_k=-1).top_k == 0, "vLLM's old -1 spelling means disabled"
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_default_lists_are_not_shared() -> None:
    a, b = SamplingParams(), SamplingParams()
    a.stop_token_ids.append(3)
    assert b.stop_token_ids == []


def test_clone_validates_changes() -> None:
    p = SamplingParams(temperature=0.5, seed=3)
    q = p.clone(max_tokens=7)
    assert (q.temperature, q.seed, q.max_tokens) == (0.5, 3, 7)
    assert p.max_tokens == 16
    with pytest.raises(ValueError, match="top_p"):
        p.clone(top_p=0.0)


# --------------------------------------------------------------------------- msgspec round trips


def full_params() -> SamplingParams:
    """Every field away from its default."""
    return SamplingParams(
        n=3,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=-12345,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 7],
        ignore_eos=True,
        max_tokens=None,
        min_tokens=4,
        logprobs=5,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        logit_bias={1: -100.0, 50000: 2.5},
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
    )


def roundtrip(obj: Any) -> Any:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(obj), type=type(obj))


def assert_same(a: msgspec.Struct, b: msgspec.Struct) -> None:
    assert type(a) is type(b)
    assert msgspec.structs.asdict(a) == msgspec.structs.asdict(b)
    assert a == b


@pytest.mark.parametrize("params", [SamplingParams(), full_params(), SamplingParams(stop="x", top_k=-1)])
def test_sampling_params_round_trip(params: SamplingParams) -> None:
    back = roundtrip(params)
    assert_same(params, back)
    assert isinstance(back.output_kind, RequestOutputKind)


def test_sampling_params_json_round_trip() -> None:
    params = full_params()
    back = msgspec.json.decode(msgspec.json.encode(params), type=SamplingParams)
    assert_same(params, back)


@pytest.mark.parametrize(
    "payload",
    [
        {"top_p": 0.0},
        {"max_tokens": 0},
        {"n": 0},
        {"temperature": -1.0},
        {"logprobs": 21},
        {"min_tokens": 9, "max_tokens": 3},
        {"stop": [""]},
        {"logit_bias": {3: 500.0}},
        {"logit_bias": {-3: 1.0}},
        {"prompt_logprobs": 2},
    ],
)
def test_decoding_invalid_sampling_params_fails(payload: dict[str, Any]) -> None:
    raw = msgspec.msgpack.encode(payload)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(raw, type=SamplingParams)


@pytest.mark.parametrize(
    "payload", [{"top_k": "5"}, {"n": 1.5}, {"stop_token_ids": ["a"]}, {"seed": 2**64 - 1}]
)
def test_decoding_wrongly_typed_sampling_params_fails(payload: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(payload), type=SamplingParams)


def test_decoding_invalid_nested_sampling_params_fails() -> None:
    good = m.EngineCoreRequest(request_id="r", prompt_token_ids=[1], sampling_params=SamplingParams())
    encoded = msgspec.msgpack.encode(good)
    # array_like: [request_id, prompt_token_ids, sampling_params]; break the nested params.
    raw = msgspec.msgpack.decode(encoded)
    raw[2] = {"top_p": 2.0}
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(raw), type=m.EngineCoreRequest)


def _logprobs(k: int) -> m.TokenLogprobs:
    return m.TokenLogprobs(
        token_ids=[5 + i for i in range(k)], logprobs=[-0.5 - i for i in range(k)], sampled_rank=2
    )


def _wire_examples() -> list[msgspec.Struct]:
    params = full_params()
    new = m.NewRequestData(
        req_id="a",
        prompt_token_ids=[1, 2, 3],
        sampling_params=params,
        block_ids=[4, 5],
        num_computed_tokens=16,
        output_token_ids=[9, 8],
        eos_token_id=2,
    )
    cached = m.CachedRequestData(req_ids=["b", "c"], new_block_ids=[[7], []], num_computed_tokens=[33, 4])
    return [
        m.EngineCoreRequest(
            request_id="req-1",
            prompt_token_ids=[1, 2, 3],
            sampling_params=params,
            eos_token_id=2,
            arrival_time=1234.5,
            priority=-1,
        ),
        m.EngineCoreRequest(request_id="r", prompt_token_ids=[], sampling_params=SamplingParams()),
        _logprobs(3),
        m.EngineCoreOutput(
            request_id="req-1",
            new_token_ids=[4, 5],
            new_logprobs=[_logprobs(2), _logprobs(1)],
            finish_reason=m.FinishReason.STOP,
            stop_reason=42,
            num_cached_tokens=16,
        ),
        m.EngineCoreOutput(
            request_id="x", new_token_ids=[], stop_reason="END", finish_reason=m.FinishReason.ABORT
        ),
        m.EngineCoreOutput(request_id="y", new_token_ids=[1]),
        m.SchedulerStats(
            num_running_reqs=3,
            num_waiting_reqs=2,
            kv_cache_usage=0.25,
            prefix_cache_queries=100,
            prefix_cache_hits=32,
            num_preemptions=1,
            num_prompt_tokens=90,
            num_generation_tokens=7,
        ),
        m.EngineCoreOutputs(
            outputs=[
                m.EngineCoreOutput(request_id="z", new_token_ids=[3], finish_reason=m.FinishReason.LENGTH)
            ],
            scheduler_stats=m.SchedulerStats(num_running_reqs=1),
            timestamp=99.5,
        ),
        m.EngineCoreOutputs(),
        new,
        cached,
        m.SchedulerOutput(
            scheduled_new_reqs=[new],
            scheduled_cached_reqs=cached,
            num_scheduled_tokens={"a": 3, "b": 1, "c": 1},
            total_num_scheduled_tokens=5,
            finished_req_ids=["d", "e"],
        ),
        m.SchedulerOutput(),
        m.ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[10, 11], logprobs={"a": _logprobs(4)}),
        m.EMPTY_MODEL_RUNNER_OUTPUT,
        m.Handshake(
            wire_schema_version=m.WIRE_SCHEMA_VERSION, role="worker", pid=123, info={"num_gpu_blocks": 7}
        ),
        m.UtilityCall(call_id=5, method="reset_prefix_cache", args=[1, "x", [2.5]]),
        m.UtilityResult(call_id=5, result={"ok": True}),
        m.UtilityResult(call_id=6, error="boom"),
    ]


def test_every_wire_struct_has_a_round_trip_example() -> None:
    wire_types = {
        obj
        for obj in vars(m).values()
        if isinstance(obj, type) and issubclass(obj, m._Wire) and obj is not m._Wire
    }
    assert wire_types == {type(x) for x in _wire_examples()}


@pytest.mark.parametrize("obj", _wire_examples(), ids=lambda o: type(o).__name__)
def test_wire_struct_round_trip_preserves_values(obj: msgspec.Struct) -> None:
    back = roundtrip(obj)
    assert_same(obj, back)


def test_round_trip_keeps_enum_and_dict_order() -> None:
    out = roundtrip(
        m.EngineCoreOutput(request_id="a", new_token_ids=[1], finish_reason=m.FinishReason.LENGTH)
    )
    assert out.finish_reason is m.FinishReason.LENGTH and out.finished
    so = roundtrip(
        m.SchedulerOutput(num_scheduled_tokens={"z": 1, "a": 2, "m": 3}, total_num_scheduled_tokens=6)
    )
    assert list(so.num_scheduled_tokens) == ["z", "a", "m"], "the worker relies on the scheduled order"
    assert not so.is_empty and m.SchedulerOutput().is_empty


def test_wire_structs_are_array_like_without_field_names() -> None:
    raw = msgspec.msgpack.encode(m.EngineCoreOutput(request_id="req-xyz", new_token_ids=[1]))
    assert b"request_id" not in raw and b"new_token_ids" not in raw
    assert msgspec.msgpack.decode(raw)[:2] == ["req-xyz", [1]], "fields travel by position"
