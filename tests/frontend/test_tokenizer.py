from __future__ import annotations

import dataclasses
import pathlib

import pytest

from frontend.tokenizer import Tokenizer, load_tokenizer, resolve_chat_template, validate_messages

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The SmolLM2 chat prompt for CAPITAL_QUESTION: the template adds its default system turn.
CAPITAL_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
]  # fmt: skip


def chatml(turns: list[tuple[str, str]], generation_prompt: bool) -> str:
    """SmolLM2's template written out by hand, as an independent check of the rendering."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


# -- special tokens and BOS ----------------------------------------------------------------------


def test_special_token_ids_follow_gguf_metadata(tok: Tokenizer) -> None:
    # The GGUF says bos=1 (<|im_start|>), eos=2 (<|im_end|>); transformers 5.17 alone reports eos=1.
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.hf.eos_token == "<|im_end|>"
    assert tok.vocab_size == 49152
    # Every added special token, not only HF's named ones, since skip_special_tokens drops them all.
    assert tok.all_special_ids == tuple(range(17))


@pytest.mark.parametrize("text", ["Hello", "Hello world", " leading space", "héllo 世界 🙂", ""])
def test_encode_mirrors_hf_and_adds_no_bos(tok: Tokenizer, text: str) -> None:
    # SmolLM2's GGUF has add_bos_token=false, so completion prompts get no BOS.
    with_special = tok.encode(text, add_special_tokens=True)
    assert with_special == tok.hf.encode(text, add_special_tokens=True)
    assert with_special == tok.encode(text, add_special_tokens=False)
    assert tok.bos_token_id not in with_special
    assert tok.decode(with_special) == text


def test_encode_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [19556, 905]
    # Special tokens written in text are recognised as such.
    assert tok.encode("<|im_start|>user") == [1, 4093]


def test_decode_skip_special_tokens(tok: Tokenizer) -> None:
    ids = [1, 4093, 198, 19556, 905, 2]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello world<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello world"
    for skip in (False, True):
        assert tok.decode(ids, skip) == tok.hf.decode(ids, skip_special_tokens=skip)


def test_token_text(tok: Tokenizer) -> None:
    assert tok.token_text(19556) == "Hello"
    assert tok.token_text(905) == " world"
    assert tok.token_text(2) == "<|im_end|>"
    first_byte_of_cjk = tok.encode("世")[0]
    assert tok.token_text(first_byte_of_cjk) == "\ufffd"


# -- chat template -------------------------------------------------------------------------------


def test_chat_prompt_for_the_capital_question(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template(CAPITAL_QUESTION)
    assert ids == CAPITAL_PROMPT_IDS
    assert tok.decode(ids) == chatml(
        [("system", SMOLLM2_SYSTEM), ("user", "What is the capital of France?")], True
    )


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, generation_prompt: bool) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi! héllo 世界 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    text = tok.render_chat_template(messages, add_generation_prompt=generation_prompt)
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == tok.hf.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False
    )
    assert ids == tok.hf.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    assert text == chatml([(m["role"], m["content"]) for m in messages], generation_prompt)
    assert ids.count(tok.bos_token_id) == 4 + generation_prompt  # one <|im_start|> per turn


def test_content_parts_are_joined(tok: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "a\nb"}])


def test_template_kwargs_and_per_request_template(tok: Tokenizer) -> None:
    template = "{{ greeting }}{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    text = tok.render_chat_template(CAPITAL_QUESTION, chat_template=template, greeting="hi ")
    assert text == "hi [user:What is the capital of France?]"
    with pytest.raises(ValueError, match="tokenize"):
        tok.apply_chat_template(CAPITAL_QUESTION, tokenize=True)


def test_template_errors_are_value_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="Chat template error: no"):
        tok.apply_chat_template(CAPITAL_QUESTION, chat_template="{{ raise_exception('no') }}")
    # SmolLM2's template concatenates content; a tool-call-only assistant turn has none.
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}
    with pytest.raises(ValueError, match="could not render"):
        tok.apply_chat_template([*CAPITAL_QUESTION, tool_call])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        (None, "must be a list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\]\.role must be one of"),
        ([{"role": "robot", "content": "x"}], "got 'robot'"),
        ([{"role": "user"}], r"messages\[0\]\.content is required"),
        ([{"role": "user", "content": None}], "content is required"),
        ([{"role": "assistant", "content": None}], "content is required"),
        ([{"role": "user", "content": 3}], "must be a string or a list"),
        ([{"role": "user", "content": ["x"]}], r"content\[0\] must be an object"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            r"content\[0\]\.type 'image_url' is not supported",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"content\[0\]\.text must be"),
        ([{"role": "user", "content": "ok"}, {"role": "tool"}], r"messages\[1\]\.content"),
    ],
)
def test_invalid_messages(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_validate_messages_keeps_extra_keys_and_copies() -> None:
    original = {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"}
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}
    out = validate_messages([tool_call, original])
    assert out[1] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert out[0]["content"] is None
    assert original["content"] == [{"type": "text", "text": "42"}]  # input not mutated


# -- loading -------------------------------------------------------------------------------------


def _tiny_hf_tokenizer_dir(path: pathlib.Path) -> pathlib.Path:
    """A word-level tokenizer with no chat template, saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(path)
    return path


def test_no_chat_template_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    tiny = load_tokenizer(_tiny_hf_tokenizer_dir(tmp_path / "tiny"), "hf")
    assert (tiny.bos_token_id, tiny.eos_token_id) == (1, 2)
    assert tiny.encode("hello world") == [3, 4]
    with pytest.raises(ValueError, match="has no chat template, and none was given"):
        tiny.apply_chat_template([{"role": "user", "content": "hello"}])


def test_chat_template_from_file_or_text(tmp_path: pathlib.Path) -> None:
    template = "{% for m in messages %}{{ m.content }} {% endfor %}"
    template_file = tmp_path / "template.jinja"
    template_file.write_text(template)
    model_dir = _tiny_hf_tokenizer_dir(tmp_path / "tiny")
    for value in (str(template_file), template):
        tiny = load_tokenizer(model_dir, "hf", chat_template=value)
        messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
        assert tiny.apply_chat_template(messages) == [3, 4]


def test_chat_template_argument_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="neither an existing file nor Jinja"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not compile"):
        load_tokenizer(_tiny_hf_tokenizer_dir(tmp_path / "tiny"), "hf", chat_template="{% for %}")


def test_load_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf", "gguf")
    with pytest.raises(ValueError, match=r"exactly one \.gguf"):
        load_tokenizer(tmp_path, "gguf")
    with pytest.raises(ValueError, match="local files only"):
        load_tokenizer(tmp_path, "hf", tokenizer_override="HuggingFaceTB/SmolLM2-135M-Instruct")


def test_tokenizer_override(tmp_path: pathlib.Path, smollm2_path: pathlib.Path) -> None:
    tiny_dir = _tiny_hf_tokenizer_dir(tmp_path / "tiny")
    tiny = load_tokenizer(smollm2_path, "gguf", tokenizer_override=str(tiny_dir))
    assert tiny.vocab_size == 5


def test_decode_without_rust_backend_matches(tok: Tokenizer) -> None:
    slow = dataclasses.replace(tok, backend=None)
    ids = [*tok.encode("héllo 世界 🙂"), 2]
    for skip in (False, True):
        assert slow.decode(ids, skip) == tok.decode(ids, skip)
