"""Wire round-trips for every schema in ipc/messages.py, arrays and tensors as raw frames, versioning."""

from __future__ import annotations

import enum
import inspect
import pickle
import struct
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ipc.messages as messages
from ipc.messages import (
    WIRE_SCHEMA_VERSION,
    CachedRequestData,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    Handshake,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
    TokenLogprobs,
    UtilityCall,
    UtilityResult,
)
from ipc.sampling_params import RequestOutputKind, SamplingParams
from ipc.serialization import (
    DEFAULT_ZERO_COPY_THRESHOLD,
    PREFIX_BYTES,
    Decoder,
    Encoder,
    WireError,
    WireVersionError,
    check_wire_version,
    decode,
    encode,
    wire_version_of,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------ helpers


def assert_wire_equal(a: Any, b: Any) -> None:
    """Deep equality that also compares arrays and tensors (dtype, shape and contents)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), type(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), type(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b)
        for field in a.__struct_fields__:
            assert_wire_equal(getattr(a, field), getattr(b, field))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_wire_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_wire_equal(x, y)
    else:
        assert a == b and type(a) is type(b), (a, b)


def roundtrip(msg: Any, type_: Any = Any, **encoder_kw: Any) -> tuple[Any, list[Any]]:
    frames = Encoder(**encoder_kw).encode(msg)
    return Decoder(type_).decode(frames), frames


def sample_params() -> SamplingParams:
    return SamplingParams(
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=1234,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 7],
        max_tokens=64,
        min_tokens=3,
        logprobs=5,
        logit_bias={13: -100.0, 42: 2.5},
        output_kind=RequestOutputKind.DELTA,
    )


def _auto_value(info: msgspec.inspect.Type, depth: int = 0) -> Any:
    """A non-default value for a msgspec type, so omit_defaults cannot hide a field."""
    mi = msgspec.inspect
    if isinstance(info, mi.IntType):
        return 7
    if isinstance(info, mi.FloatType):
        return 0.25
    if isinstance(info, mi.StrType):
        return "req-π"
    if isinstance(info, mi.BoolType):
        return True
    if isinstance(info, mi.NoneType):
        return None
    if isinstance(info, mi.EnumType):
        return list(info.cls)[-1]
    if isinstance(info, mi.AnyType):
        return {"ids": [1, 2], "arr": np.arange(100, dtype=np.int64), "t": torch.ones(2, 3)}
    if isinstance(info, mi.UnionType):
        non_none = [t for t in info.types if not isinstance(t, mi.NoneType)]
        return _auto_value(non_none[0], depth)
    if isinstance(info, mi.ListType | mi.VarTupleType):
        item = _auto_value(info.item_type, depth + 1)
        return [item, item] if isinstance(info, mi.ListType) else (item, item)
    if isinstance(info, mi.DictType):
        return {_auto_value(info.key_type, depth + 1): _auto_value(info.value_type, depth + 1)}
    if isinstance(info, mi.StructType):
        if info.cls is SamplingParams:
            return sample_params()  # validated: arbitrary values would be rejected
        return info.cls(**{f.name: _auto_value(f.type, depth + 1) for f in info.fields})
    raise NotImplementedError(f"no example value for {info}")


def auto_example(cls: type[msgspec.Struct]) -> msgspec.Struct:
    return _auto_value(msgspec.inspect.type_info(cls))


def wire_schemas() -> list[type[msgspec.Struct]]:
    """Every public Struct of the wire contract (new ones are picked up automatically)."""
    found = [
        obj
        for name, obj in vars(messages).items()
        if inspect.isclass(obj)
        and issubclass(obj, msgspec.Struct)
        and not name.startswith("_")
        and obj.__module__ == messages.__name__
    ]
    return [*found, SamplingParams]


def handwritten_examples() -> list[msgspec.Struct]:
    """Realistic messages, including defaults-only ones (omit_defaults drops every field)."""
    logprobs = TokenLogprobs(token_ids=[5, 9, 11], logprobs=[-0.1, -2.5, -3.0], sampled_rank=1)
    new_req = NewRequestData(
        req_id="r1",
        prompt_token_ids=list(range(300)),
        sampling_params=sample_params(),
        block_ids=[0, 1, 2],
        num_computed_tokens=16,
        output_token_ids=[77, 78],
    )
    return [
        EngineCoreRequest(request_id="r1", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams()),
        EngineCoreRequest(
            request_id="r2",
            prompt_token_ids=list(range(5000)),
            sampling_params=sample_params(),
            eos_token_id=2,
            arrival_time=1716.5,
            priority=-1,
        ),
        EngineCoreOutputs(),
        EngineCoreOutputs(
            outputs=[
                EngineCoreOutput(request_id="r1", new_token_ids=[42]),
                EngineCoreOutput(
                    request_id="r2",
                    new_token_ids=[1, 2],
                    new_logprobs=[logprobs, logprobs],
                    finish_reason=FinishReason.STOP,
                    stop_reason="END",
                    num_cached_tokens=32,
                ),
                EngineCoreOutput(
                    request_id="r3", new_token_ids=[], finish_reason=FinishReason.LENGTH, stop_reason=2
                ),
            ],
            scheduler_stats=SchedulerStats(num_running_reqs=3, kv_cache_usage=0.5, num_preemptions=1),
            timestamp=12.5,
        ),
        SchedulerOutput(),
        SchedulerOutput(
            scheduled_new_reqs=[new_req],
            scheduled_cached_reqs=CachedRequestData(
                req_ids=["r0"], new_block_ids=[[9]], num_computed_tokens=[100]
            ),
            num_scheduled_tokens={"r1": 284, "r0": 1},
            total_num_scheduled_tokens=285,
            finished_req_ids=["old"],
        ),
        ModelRunnerOutput(),
        ModelRunnerOutput(req_ids=["r0", "r1"], sampled_token_ids=[3, 4], logprobs={"r1": logprobs}),
        Handshake(wire_schema_version=WIRE_SCHEMA_VERSION, role="engine_core", pid=123, info={"blocks": 10}),
        UtilityCall(call_id=1, method="reset_prefix_cache"),
        UtilityCall(call_id=2, method="load", args=["x", np.zeros((4, 100), np.float32), torch.arange(5)]),
        UtilityResult(call_id=2, result={"ok": True, "logits": torch.randn(3, 200)}),
        UtilityResult(call_id=3, error="ValueError: nope"),
        SamplingParams(),
    ]


# --------------------------------------------------------------------------- every schema


@pytest.mark.parametrize("cls", wire_schemas(), ids=lambda c: c.__name__)
def test_every_schema_roundtrips_with_every_field_set(cls: type[msgspec.Struct]) -> None:
    msg = auto_example(cls)
    out, frames = roundtrip(msg, cls)
    assert_wire_equal(msg, out)
    assert wire_version_of(frames[0]) == WIRE_SCHEMA_VERSION


def _struct_types(obj: Any, into: set[type]) -> set[type]:
    if isinstance(obj, msgspec.Struct):
        into.add(type(obj))
        for field in obj.__struct_fields__:
            _struct_types(getattr(obj, field), into)
    elif isinstance(obj, list | tuple):
        for item in obj:
            _struct_types(item, into)
    elif isinstance(obj, dict):
        for item in obj.values():
            _struct_types(item, into)
    return into


def test_every_schema_has_a_handwritten_example() -> None:
    covered = _struct_types(handwritten_examples(), set())
    missing = [c.__name__ for c in wire_schemas() if c not in covered]
    assert not missing, f"add a realistic example for {missing}"


@pytest.mark.parametrize("msg", handwritten_examples(), ids=lambda m: type(m).__name__)
def test_handwritten_examples_roundtrip(msg: msgspec.Struct) -> None:
    out, _ = roundtrip(msg, type(msg))
    assert_wire_equal(msg, out)


def test_array_like_wire_format_has_no_field_names() -> None:
    frames = encode(
        EngineCoreRequest(request_id="abc", prompt_token_ids=[1], sampling_params=SamplingParams())
    )
    assert b"request_id" not in bytes(frames[0]) and b"abc" in bytes(frames[0])


def test_decode_validates_and_rejects_invalid_sampling_params() -> None:
    bad = msgspec.msgpack.encode(msgspec.structs.asdict(SamplingParams()) | {"top_p": 7.0})
    header = struct.pack("<2sH", b"PS", WIRE_SCHEMA_VERSION) + bad
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        Decoder(SamplingParams).decode([header])


def test_plain_values_and_none() -> None:
    for value in [None, 3, "x", [1, 2], {"a": [1.5]}, ["r1", "r2"]]:
        assert decode(encode(value)) == value
    assert decode(encode(["r1", "r2"]), list[str]) == ["r1", "r2"]


# ------------------------------------------------------------------------- arrays, tensors


class ArrayCarrier(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    arr: np.ndarray
    tensor: torch.Tensor
    anything: Any = None


NUMPY_CASES = {
    "empty": np.zeros((0,), np.float32),
    "empty-2d": np.zeros((0, 5), np.int64),
    "scalar-0d": np.array(3.5),
    "small-inline": np.arange(10, dtype=np.int32),
    "just-below-threshold": np.arange(DEFAULT_ZERO_COPY_THRESHOLD - 1, dtype=np.uint8),
    "at-threshold": np.arange(DEFAULT_ZERO_COPY_THRESHOLD, dtype=np.uint8),
    "large-16MB": np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32),
    "non-contiguous": np.arange(4000, dtype=np.float64).reshape(40, 100)[::3, 1::2],
    "fortran-order": np.asfortranarray(np.arange(600, dtype=np.int16).reshape(20, 30)),
    "big-endian": np.arange(100, dtype=">i4"),
    "bool": np.arange(300) % 3 == 0,
    "complex": np.arange(50, dtype=np.complex64) * 1j,
    "float16-nan": np.array([np.nan, 1.0, -np.inf] * 100, np.float16),
}

TORCH_CASES = {
    "empty": torch.zeros(0, 3),
    "scalar-0d": torch.tensor(2.5),
    "small-inline": torch.arange(8, dtype=torch.int64),
    "large-bf16": torch.randn(1024, 1024, dtype=torch.bfloat16),
    "fp16": torch.randn(100, 7, dtype=torch.float16),
    "int8": torch.arange(-128, 128, dtype=torch.int8).repeat(4),
    "bool": torch.rand(500) > 0.5,
    "complex64": torch.randn(80, dtype=torch.complex64),
    "non-contiguous": torch.arange(10000, dtype=torch.float32).reshape(100, 100).t()[::2],
    "requires-grad": torch.randn(100, 10, requires_grad=True),
    "conj-view": torch.randn(100, dtype=torch.complex64).conj(),
}


@pytest.mark.parametrize("name", NUMPY_CASES)
def test_numpy_roundtrip(name: str) -> None:
    arr = NUMPY_CASES[name]
    msg = ArrayCarrier(arr=arr, tensor=torch.zeros(0), anything=[arr, {"nested": arr}])
    out, frames = roundtrip(msg, ArrayCarrier)
    assert_wire_equal(msg, out)
    inline = arr.nbytes < DEFAULT_ZERO_COPY_THRESHOLD
    assert len(frames) == 1 + (0 if inline else 3)  # one aux frame per array occurrence
    assert out.arr.flags.writeable


@pytest.mark.parametrize("name", TORCH_CASES)
def test_tensor_roundtrip(name: str) -> None:
    tensor = TORCH_CASES[name]
    msg = ArrayCarrier(arr=np.zeros(0), tensor=tensor, anything={"t": tensor})
    out, _ = roundtrip(msg, ArrayCarrier)
    expected = tensor.detach().resolve_conj()
    assert_wire_equal(expected, out.tensor)
    assert_wire_equal(expected, out.anything["t"])
    assert not out.tensor.requires_grad
    out.tensor.view(-1)[:0].zero_()  # writable (no "non-writable buffer" warning path)


def test_large_arrays_are_zero_copy_both_ways() -> None:
    arr = np.arange(100_000, dtype=np.float32)
    tensor = torch.arange(100_000, dtype=torch.float32)
    frames = Encoder().encode(ArrayCarrier(arr=arr, tensor=tensor))
    assert len(frames) == 3
    # Encode side: the aux frames are views of the arrays' own memory.
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), arr)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), tensor.numpy())
    # Decode side: the arrays are views of the received buffers.
    received = [bytes(frames[0]), bytearray(frames[1]), bytearray(frames[2])]
    out = Decoder(ArrayCarrier).decode(received)
    received[1][:4] = np.float32(-1).tobytes()
    received[2][:4] = np.float32(-2).tobytes()
    assert out.arr[0] == -1 and out.tensor[0] == -2


def test_inline_arrays_own_their_memory() -> None:
    frames = Encoder().encode(ArrayCarrier(arr=np.arange(4), tensor=torch.arange(4)))
    assert len(frames) == 1
    header = bytearray(frames[0])
    out = Decoder(ArrayCarrier).decode([header])
    header[:] = b"\x00" * len(header)  # the caller recycles its receive buffer
    assert out.arr.tolist() == [0, 1, 2, 3] and out.tensor.tolist() == [0, 1, 2, 3]


def test_readonly_frames_still_decode() -> None:
    frames = Encoder().encode(ArrayCarrier(arr=np.arange(1000), tensor=torch.arange(1000)))
    out = Decoder(ArrayCarrier).decode([bytes(f) for f in frames])
    assert out.arr.sum() == out.tensor.sum().item() == 499500
    out.tensor += 1  # copied from the immutable bytes, so writing is safe


def test_zero_copy_threshold_is_configurable() -> None:
    arr = np.arange(1000, dtype=np.int64)
    assert len(Encoder(zero_copy_threshold=1 << 20).encode(arr)) == 1
    assert len(Encoder(zero_copy_threshold=0).encode(np.zeros(0))) == 2


_DTYPES = st.sampled_from(["<i1", "<u2", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1", "<c8", ">f8"])


@settings(max_examples=60, deadline=None)
@given(
    arr=_DTYPES.flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
    )
)
def test_numpy_roundtrip_property(arr: np.ndarray) -> None:
    out = decode(encode(arr))
    assert_wire_equal(arr, out)


@settings(max_examples=40, deadline=None)
@given(
    outputs=st.lists(
        st.builds(
            EngineCoreOutput,
            request_id=st.text(max_size=20),
            new_token_ids=st.lists(st.integers(0, 2**31 - 1), max_size=20),
            finish_reason=st.none() | st.sampled_from(FinishReason),
            stop_reason=st.none() | st.integers(0, 1000) | st.text(max_size=5),
            num_cached_tokens=st.integers(0, 10_000),
        ),
        max_size=10,
    ),
    timestamp=st.floats(allow_nan=False),
)
def test_engine_core_outputs_property(outputs: list[EngineCoreOutput], timestamp: float) -> None:
    msg = EngineCoreOutputs(outputs=outputs, timestamp=timestamp)
    assert decode(encode(msg), EngineCoreOutputs) == msg


# ------------------------------------------------------------------------ refusals, errors


class _Opaque:
    def __reduce__(self) -> Any:
        raise AssertionError("pickled")


@pytest.mark.parametrize(
    "obj",
    [_Opaque(), np.array([object()], dtype=object), np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])],
    ids=["opaque-object", "object-array", "structured-array"],
)
def test_never_pickles(obj: Any) -> None:
    with pytest.raises(TypeError):
        encode({"x": obj})


def test_schema_version_mismatch_names_both_versions() -> None:
    frames = encode(UtilityCall(call_id=1, method="ping"))
    other = WIRE_SCHEMA_VERSION + 1
    stale = struct.pack("<2sH", b"PS", other) + bytes(frames[0])[PREFIX_BYTES:]
    with pytest.raises(WireVersionError) as info:
        Decoder(UtilityCall).decode([stale])
    assert f"version {other}" in str(info.value) and f"version {WIRE_SCHEMA_VERSION}" in str(info.value)
    assert info.value.peer_version == other and info.value.local_version == WIRE_SCHEMA_VERSION
    assert isinstance(info.value, WireError)


def test_handshake_version_check() -> None:
    hs = decode(encode(Handshake(wire_schema_version=WIRE_SCHEMA_VERSION + 3, role="worker")), Handshake)
    with pytest.raises(WireVersionError, match=f"version {WIRE_SCHEMA_VERSION + 3}"):
        check_wire_version(hs.wire_schema_version)
    check_wire_version(WIRE_SCHEMA_VERSION)


@pytest.mark.parametrize(
    "frames",
    [[], [b""], [b"XX\x01\x00\x90"], [b"P"]],
    ids=["no-frames", "empty-header", "bad-magic", "short-header"],
)
def test_malformed_headers(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode(frames)


def test_missing_or_wrong_size_aux_frame() -> None:
    frames = encode(np.arange(1000, dtype=np.int64))
    with pytest.raises(WireError, match="aux frame 0"):
        decode(frames[:1])
    with pytest.raises(WireError, match="8000 bytes"):
        decode([frames[0], b"\x00" * 10])


def test_unknown_extension_and_dtype() -> None:
    header = struct.pack("<2sH", b"PS", WIRE_SCHEMA_VERSION)
    with pytest.raises(WireError, match="extension type 99"):
        decode([header + msgspec.msgpack.encode(msgspec.msgpack.Ext(99, b""))])
    frames = encode(torch.zeros(2))
    tampered = bytes(frames[0]).replace(b"float32", b"floatXX")
    with pytest.raises(WireError, match="floatXX"):
        decode([tampered])


def test_typed_field_rejects_wrong_array_kind() -> None:
    frames = encode(ArrayCarrier(arr=np.zeros(2), tensor=torch.zeros(2)))
    swapped = Decoder(tuple[torch.Tensor, np.ndarray])
    with pytest.raises(msgspec.ValidationError):
        swapped.decode(frames)


def test_numpy_scalars_encode_as_python_values() -> None:
    assert decode(encode([np.int64(3), np.float32(0.5), np.bool_(True)])) == [3, 0.5, True]


def test_finish_reason_and_enums_survive() -> None:
    out = decode(
        encode(EngineCoreOutput(request_id="a", new_token_ids=[], finish_reason=FinishReason.ABORT)),
        EngineCoreOutput,
    )
    assert out.finish_reason is FinishReason.ABORT and str(out.finish_reason) == "abort"
    assert isinstance(RequestOutputKind.DELTA, enum.IntEnum)


def test_encoder_and_handles_are_reusable_and_picklable() -> None:
    enc, dec = Encoder(), Decoder(SchedulerOutput)
    for i in range(3):
        msg = SchedulerOutput(total_num_scheduled_tokens=i, num_scheduled_tokens={"r": i})
        assert dec.decode(enc.encode(msg)) == msg
    msg = auto_example(SchedulerOutput)
    assert pickle.loads(pickle.dumps(msg)) == msg  # structs stay picklable for multiprocessing
