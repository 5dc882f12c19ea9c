"""The frontend's tokenizer: a thin wrapper around a HF fast tokenizer.

Everything text-shaped (encoding prompts, chat templates, decoding) happens here in the frontend;
the engine core only ever sees token ids. The wrapper exists to pin down, in one place, the
behaviours a vLLM user relies on:

- prompts get a BOS only where the tokenizer's own config adds one (we call HF's ``encode``, so
  whatever its post-processor does is what we do);
- chat prompts are rendered by HF transformers' own ``apply_chat_template`` and then encoded
  without special tokens, exactly as ``apply_chat_template(..., tokenize=True)`` does, so a
  template that writes its own BOS never gets a second one;
- bad chat input is a ``ValueError`` naming what is wrong (the server turns it into a 400).

transformers is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# apply_chat_template arguments that control HF's own tokenization and return type. We render to
# text and tokenize ourselves, so a caller (ultimately a request's chat_template_kwargs) must not
# be able to switch them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "tokenize",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "return_assistant_tokens_mask",
    }
)


@dataclass(slots=True, eq=False)
class Tokenizer:
    """A loaded tokenizer plus the facts the engine needs about it.

    ``all_special_ids`` is every id that ``decode(..., skip_special_tokens=True)`` drops: HF's
    named special tokens plus every added token flagged special (HF's own ``all_special_ids``
    lists only the named ones, e.g. it misses ``<|im_end|>`` for SmolLM2's GGUF).
    """

    hf: PreTrainedTokenizerBase = field(repr=False)
    name: str
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int
    all_special_ids: tuple[int, ...]
    # The Rust tokenizer behind ``hf`` when its raw decode equals HF's decode (no Python-side
    # clean-up); the incremental detokenizer streams through it. None means: decode through HF.
    backend: tokenizers.Tokenizer | None = field(repr=False)
    _token_text: dict[int, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if self.backend is not None:
            return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included), for logprobs output.

        Cached per id: top-k logprobs ask for the same few thousand ids over and over. A piece of a
        multi-byte character decodes to U+FFFD, as it does in HF and vLLM.
        """
        text = self._token_text.get(token_id)
        if text is None:
            text = self.decode((token_id,), skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def render_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The chat prompt as text, rendered by HF transformers' ``apply_chat_template``.

        ``chat_template`` here is literal template text (a per-request override); it is never
        treated as a path, so a request cannot make the server read files.
        """
        conversation = validate_messages(messages)
        if chat_template is None and self.hf.chat_template is None:
            raise ValueError(
                f"The tokenizer of {self.name} has no chat template, and none was given; "
                "pass --chat-template (a file or the template text) or use the completions API."
            )
        reserved = _RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs)
        if reserved:
            raise ValueError(f"chat template kwargs may not set {sorted(reserved)}.")
        import jinja2

        try:
            rendered = self.hf.apply_chat_template(
                conversation,
                tools=tools,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **template_kwargs,
            )
        except jinja2.TemplateError as exc:
            # Includes templates calling raise_exception(...), e.g. "roles must alternate".
            raise ValueError(f"Chat template error: {exc}") from exc
        except (TypeError, KeyError) as exc:
            # A template doing arithmetic on a field the messages lack (content None, no 'name').
            raise ValueError(f"Chat template could not render these messages: {exc!r}") from exc
        assert isinstance(rendered, str)
        return rendered

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the chat prompt; equal to HF's ``apply_chat_template(..., tokenize=True)``."""
        text = self.render_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
            **template_kwargs,
        )
        # The template writes every special token it wants (BOS included) as text.
        return self.encode(text, add_special_tokens=False)


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check OpenAI-style chat messages and return plain-dict copies with string content.

    Content given as OpenAI content parts must be all of type "text"; the parts are joined with
    "\\n", as vLLM joins them, so prompts match what vLLM users get. Keys other than role and
    content (name, tool_calls, tool_call_id, ...) pass through for the template.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}.")
    if len(messages) == 0:
        raise ValueError("messages must not be empty.")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}.")
        normalized = dict(message)
        normalized["content"] = _message_content(message, role, where)
        out.append(normalized)
    return out


def _message_content(message: Mapping[str, Any], role: str, where: str) -> str | None:
    if "content" not in message or message["content"] is None:
        # OpenAI allows an assistant turn that only calls tools to carry no content.
        if role == "assistant" and message.get("tool_calls"):
            return None
        raise ValueError(f"{where}.content is required for role {role!r}.")
    content = message["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise ValueError(
            f"{where}.content must be a string or a list of text parts, got {type(content).__name__}."
        )
    texts: list[str] = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            raise ValueError(f"{part_where} must be an object, got {type(part).__name__}.")
        if part.get("type") != "text":
            raise ValueError(f"{part_where}.type {part.get('type')!r} is not supported; only 'text' is.")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{part_where}.text must be a string, got {type(text).__name__}.")
        texts.append(text)
    return "\n".join(texts)


def resolve_chat_template(value: str) -> str:
    """A ``--chat-template`` value: a path to a template file, or the template text itself."""
    candidate = pathlib.Path(value).expanduser()
    try:
        is_file = candidate.is_file()
    except (OSError, ValueError):  # a long template is not a valid file name
        is_file = False
    if is_file:
        return candidate.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    # Neither a file nor Jinja: almost certainly a mistyped path, so say so rather than render
    # the path itself as the prompt.
    raise ValueError(f"--chat-template {value!r} is neither an existing file nor Jinja template text.")


def load_tokenizer(
    path: pathlib.Path,
    fmt: Literal["gguf", "hf"],
    tokenizer_override: str | None = None,
    chat_template: str | None = None,
) -> Tokenizer:
    """Load the tokenizer for a model, from local files only (there is no model hub).

    ``path`` is the model: a ``.gguf`` file (or a directory holding exactly one) for ``fmt="gguf"``,
    a HF model directory for ``fmt="hf"``. ``tokenizer_override`` (vLLM's ``--tokenizer``) names a
    tokenizer directory or ``.gguf`` file to use instead. ``chat_template`` (vLLM's
    ``--chat-template``) is a template file or the template text; it replaces the model's own.
    """
    if tokenizer_override is not None:
        source = pathlib.Path(tokenizer_override).expanduser()
        if not source.exists():
            raise ValueError(
                f"--tokenizer {tokenizer_override!r} is not a local file or directory "
                "(tokenizers are loaded from local files only)."
            )
        fmt = "gguf" if source.suffix == ".gguf" else "hf"
    else:
        source = pathlib.Path(path).expanduser()
    hf = _load_hf(source, fmt)
    if fmt == "gguf":
        _fix_gguf_special_tokens(hf)
    if chat_template is not None:
        hf.chat_template = resolve_chat_template(chat_template)
    if isinstance(hf.chat_template, str):
        _check_template_compiles(hf.chat_template)
    return _wrap(hf, name=str(source))


def _load_hf(source: pathlib.Path, fmt: Literal["gguf", "hf"]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if fmt == "gguf":
        gguf_file = source
        if source.is_dir():
            found = sorted(source.glob("*.gguf"))
            if len(found) != 1:
                raise ValueError(f"expected exactly one .gguf file in {source}, found {len(found)}.")
            gguf_file = found[0]
        if not gguf_file.is_file():
            raise ValueError(f"GGUF file {gguf_file} does not exist.")
        directory, kwargs = gguf_file.parent, {"gguf_file": gguf_file.name}
    elif fmt == "hf":
        if not source.is_dir():
            raise ValueError(f"tokenizer directory {source} does not exist.")
        directory, kwargs = source, {}
    else:
        raise ValueError(f"unknown tokenizer format {fmt!r}; expected 'gguf' or 'hf'.")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load a tokenizer from {source}: {exc}") from exc


def _fix_gguf_special_tokens(hf: PreTrainedTokenizerBase) -> None:
    """Make BOS/EOS agree with the GGUF metadata.

    transformers 5.17's GGUF converter sets ``eos_token`` from ``bos_token_id`` (for SmolLM2 it
    reports EOS = ``<|im_start|>``, id 1, while the file says 2 = ``<|im_end|>``). The metadata ids
    survive in ``init_kwargs``; we trust them, so that EOS stops generation and templates that use
    ``eos_token`` render as the model's own HF tokenizer does.
    """
    for name in ("bos", "eos"):
        meta_id = hf.init_kwargs.get(f"{name}_token_id")
        if not isinstance(meta_id, int) or not 0 <= meta_id < len(hf):
            continue
        if getattr(hf, f"{name}_token_id") != meta_id:
            token = hf.convert_ids_to_tokens(meta_id)
            logger.info(
                "GGUF metadata says %s_token_id=%d (%r); transformers reported %r, using the metadata",
                name,
                meta_id,
                token,
                getattr(hf, f"{name}_token"),
            )
            setattr(hf, f"{name}_token", token)


def _check_template_compiles(template: str) -> None:
    """Fail at startup, not on the first request, when the chat template has a syntax error."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper; without it the first render reports the error
        return
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc


def _wrap(hf: PreTrainedTokenizerBase, name: str) -> Tokenizer:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None and getattr(hf, "clean_up_tokenization_spaces", False):
        if _cleanup_is_ignored(hf, backend):
            # HF skips this clean-up for BPE anyway (and logs a warning saying so); turning the
            # flag off changes no output and lets us decode through the Rust tokenizer directly.
            hf.clean_up_tokenization_spaces = False
        else:
            backend = None  # HF post-processes decoded text in Python: decode through HF.
    special = set(hf.all_special_ids)
    special.update(i for i, tok in hf.added_tokens_decoder.items() if tok.special)
    return Tokenizer(
        hf=hf,
        name=name,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        vocab_size=len(hf),
        all_special_ids=tuple(sorted(special)),
        backend=backend,
    )


def _cleanup_is_ignored(hf: PreTrainedTokenizerBase, backend: tokenizers.Tokenizer) -> bool:
    # Mirrors the condition in transformers' TokenizersBackend._decode.
    forced = getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(backend.model).__name__ == "BPE" and not forced
