from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.detokenizer import IncrementalDetokenizer, token_to_text
from frontend.tokenizer import Tokenizer

UNICODE_SAMPLES = [
    "héllo 世界 🙂",
    "naïve café — “quotes” … ½",
    "日本語のテキストです。",
    "😀🎉👍🏽 family: 👨‍👩‍👧",
    "Ελληνικά עברית العربية",
    "e\u0301 combining, tab\tnew\nline",
]
TEXT = "The quick brown fox jumps over the lazy dog. héllo 世界 🙂 end"

HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@dataclasses.dataclass
class Run:
    detok: IncrementalDetokenizer
    streamed: list[str]  # deltas handed out before finishing
    final_delta: str
    stop_reason: str | None

    @property
    def text(self) -> str:
        return "".join(self.streamed) + self.final_delta


def run(
    tok: Tokenizer,
    ids: Sequence[int],
    *,
    prompt: Sequence[int] = (),
    batches: Sequence[int] = (),
    check_prefix_of: str | None = None,
    **kwargs: object,
) -> Run:
    """Feed ``ids`` in batches of the given sizes (then one at a time), streaming deltas."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)  # type: ignore[arg-type]
    streamed: list[str] = []
    stop_reason = None
    position = 0
    sizes = iter(batches)
    while position < len(ids) and stop_reason is None:
        size = max(1, next(sizes, 1))
        stop_reason = detok.update(list(ids[position : position + size]))
        position += size
        streamed.append(detok.get_delta())
        if check_prefix_of is not None:
            assert check_prefix_of.startswith(detok.output_text)
    if stop_reason is None:
        stop_reason = detok.finish()
    return Run(detok, streamed, detok.get_delta(finished=True), stop_reason)


# -- strategies ----------------------------------------------------------------------------------


@st.composite
def token_ids(draw: st.DrawFn, tok: Tokenizer, max_size: int) -> list[int]:
    interesting = sorted({i for s in UNICODE_SAMPLES for i in tok.encode(s)})
    one_id = st.one_of(
        st.integers(0, 16),  # special tokens
        st.integers(17, tok.vocab_size - 1),  # anything, incl. lone UTF-8 bytes
        st.sampled_from(interesting),  # pieces of multi-byte characters
        st.just(tok.vocab_size),  # out of range: decodes to nothing
    )
    random_ids = st.lists(one_id, max_size=max_size)
    encoded = st.text(max_size=max_size).map(tok.encode)
    sample = st.sampled_from(UNICODE_SAMPLES).map(tok.encode)
    return draw(st.one_of(random_ids, encoded, sample))


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
@pytest.mark.parametrize("skip", [True, False])
def test_unicode_round_trip_token_by_token(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    result = run(tok, ids, skip_special_tokens=skip, check_prefix_of=text)
    assert result.text == text == result.detok.output_text
    assert result.detok.num_output_tokens == len(ids)


@HYPOTHESIS
@given(data=st.data(), skip=st.booleans(), rust=st.booleans())
def test_incremental_equals_full_decode(tok: Tokenizer, data: st.DataObject, skip: bool, rust: bool) -> None:
    tokenizer = tok if rust else dataclasses.replace(tok, backend=None)  # offset-decoding fallback
    prompt = data.draw(token_ids(tok, 8), label="prompt")
    ids = data.draw(token_ids(tok, 40), label="ids")
    batches = data.draw(st.lists(st.integers(1, 4), max_size=10), label="batches")
    full = tok.decode(ids, skip_special_tokens=skip)
    result = run(
        tokenizer, ids, prompt=prompt, batches=batches, skip_special_tokens=skip, check_prefix_of=full
    )
    assert result.detok.output_text == full
    assert result.text == full
    assert result.stop_reason is None


def test_prompt_context_gives_the_continuation(tok: Tokenizer) -> None:
    prompt = tok.encode("The capital of France is")
    result = run(tok, tok.encode(" Paris"), prompt=prompt)
    assert result.text == " Paris"
    # A prompt ending inside a multi-byte character has no clean context: decode stands alone.
    cjk = tok.encode("世")
    result = run(tok, cjk[1:], prompt=cjk[:1])
    assert result.text == tok.decode(cjk[1:])


def test_trailing_incomplete_character_is_flushed_on_finish(tok: Tokenizer) -> None:
    ids = tok.encode("ok 世")[:-1]  # ends inside 世
    detok = IncrementalDetokenizer(tok, [])
    assert detok.update(ids) is None
    assert detok.output_text == "ok "  # held: the character may still complete
    assert detok.update([], finished=True) is None
    assert detok.output_text == tok.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok: Tokenizer, skip: bool) -> None:
    ids = [*tok.encode("Hello world"), 2, 1, *tok.encode("assistant")]
    result = run(tok, ids, skip_special_tokens=skip, spaces_between_special_tokens=False)
    expected = "Hello world<|im_end|><|im_start|>assistant" if skip is False else "Hello worldassistant"
    assert result.text == expected == tok.decode(ids, skip_special_tokens=skip)


def test_token_to_text(tok: Tokenizer) -> None:
    assert [token_to_text(tok, i) for i in tok.encode("Hello world")] == ["Hello", " world"]
    assert token_to_text(tok, 2) == "<|im_end|>"


def test_recovers_when_decode_stream_fails(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))

    class Failing:
        def step(self, token_id: int) -> str | None:
            raise RuntimeError("Invalid prefix encountered")

    detok.update(ids[:5])
    detok._decoder = Failing()  # the next step fails and must switch to offset decoding
    detok.update(ids[5:], finished=True)
    assert detok.output_text == TEXT


# -- stop strings --------------------------------------------------------------------------------


def expected_stop(full: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Reference: the output ends at the stop occurrence that the text completes first."""
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not hits:
        return full, None
    end, start, stop = min(hits)
    return full[: end if include else start], stop


def check_stream(result: Run, expected_text: str) -> None:
    assert result.detok.output_text == expected_text
    assert result.text == expected_text
    # Nothing streamed before the end ever went past the final text: no stop-string prefix leaked.
    assert expected_text.startswith("".join(result.streamed))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_at_every_position(tok: Tokenizer, include: bool) -> None:
    ids = tok.encode(TEXT)
    for start in range(len(TEXT)):
        for length in (1, 2, 3, 5, 8):
            stop = TEXT[start : start + length]
            if len(stop) < length:
                continue
            result = run(tok, ids, stop=[stop], include_stop_str_in_output=include)
            text, reason = expected_stop(TEXT, [stop], include)
            assert result.stop_reason == reason == stop
            check_stream(result, text)
            # Consumed exactly up to the token that completes the stop string.
            used = result.detok.num_output_tokens
            assert stop in tok.decode(ids[:used]) and stop not in tok.decode(ids[: used - 1])


@HYPOTHESIS
@given(
    pieces=st.lists(st.sampled_from(["a", "b", "ab", " ", "\n", "é", "世", "ba a", "\n\n"]), max_size=25),
    stops=st.lists(st.text(alphabet="ab \n世", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    batches=st.lists(st.integers(1, 3), max_size=10),
)
def test_stop_strings_property(
    tok: Tokenizer, pieces: list[str], stops: list[str], include: bool, batches: list[int]
) -> None:
    full = "".join(pieces)
    ids = tok.encode(full)
    result = run(tok, ids, stop=stops, include_stop_str_in_output=include, batches=batches)
    text, reason = expected_stop(full, stops, include)
    assert result.stop_reason == reason
    check_stream(result, text)


def test_multiple_stop_strings_first_completed_wins(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    result = run(tok, ids, stop=["fox", "quick", "lazy"])
    assert result.stop_reason == "quick"
    check_stream(result, "The ")
    # Both end with "ck": the earlier start wins, so no stop string remains in the text.
    result = run(tok, ids, stop=["ck", "quick"])
    assert result.stop_reason == "quick"
    check_stream(result, "The ")


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, again")
    assert len(ids) > 3
    result = run(tok, ids, stop=["lo wor"], include_stop_str_in_output=True)
    check_stream(result, "Hello wor")
    assert result.detok.num_output_tokens == 2


def test_hold_back_never_streams_a_partial_stop(tok: Tokenizer) -> None:
    stop = "\n\nUser:"
    ids = tok.encode("Sure thing!\n\nUse the force.")
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    streamed = ""
    for token_id in ids[: len(tok.encode("Sure thing!\n\nUse"))]:
        detok.update([token_id])
        streamed += detok.get_delta()
        assert "\n" not in streamed
    assert detok.output_text.endswith("\n\nUse")
    detok.update(ids[len(tok.encode("Sure thing!\n\nUse")) :], finished=True)
    assert detok.stop_reason is None
    assert streamed + detok.get_delta(finished=True) == "Sure thing!\n\nUse the force."


def test_tokens_after_a_stop_are_ignored(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four")
    detok = IncrementalDetokenizer(tok, [], stop=[" two"], include_stop_str_in_output=True)
    assert detok.update(ids) == " two"
    assert detok.num_output_tokens == 2
    assert detok.output_token_ids == ids[:2]
    assert detok.update(ids) is None
    assert detok.output_text == "one two"
    assert detok.get_delta() == "one two"  # final: nothing held back


def test_stop_on_special_token_text(tok: Tokenizer) -> None:
    ids = [*tok.encode("Hi"), 2, *tok.encode("more")]
    kept = run(tok, ids, stop=["<|im_end|>"], skip_special_tokens=False)
    assert kept.stop_reason == "<|im_end|>"
    check_stream(kept, "Hi")
    skipped = run(tok, ids, stop=["<|im_end|>"], skip_special_tokens=True)
    assert skipped.stop_reason is None
    check_stream(skipped, "Himore")


def test_empty_stop_string_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=[""])
