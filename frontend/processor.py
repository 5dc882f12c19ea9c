"""Input processing: prompts (text, token ids, vLLM prompt dicts, chat messages) to validated
EngineCoreRequests, one per child sequence when n > 1."""

from __future__ import annotations

import time
from typing import Any

from frontend.output_processor import child_request_ids
from frontend.tokenizer import Tokenizer
from ipc.config import ModelConfig
from ipc.messages import EngineCoreRequest
from ipc.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]
PROMPT_DICT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})


def cache_salt_of(prompt: PromptType) -> str | None:
    """A prompt dict's ``cache_salt`` (vLLM's field), checked: a non-empty string or absent."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    check_cache_salt(salt)
    return salt


def check_cache_salt(salt: object) -> None:
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError("cache_salt must be a non-empty string if provided")


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer | None) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        # The tokenizer's EOS (else config.json's), and the generation config's other EOS ids.
        eos = model_config.eos_token_id
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_id: int | None = eos
        self.extra_eos_token_ids = tuple(i for i in model_config.generation.eos_token_ids if i != eos)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Returns (prompt text or None, prompt token ids)."""
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - PROMPT_DICT_KEYS)
            if unknown:
                raise ValueError(
                    f"unsupported prompt key(s) {unknown}; a prompt dict takes {sorted(PROMPT_DICT_KEYS)}"
                )
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "text prompts need a tokenizer; pass token ids with skip_tokenizer_init=True"
                )
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return None, list(prompt)
        raise ValueError(
            f"a prompt must be a string, a list of token ids or a prompt dict, got {type(prompt).__name__}"
        )

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        max_model_len = self.model_config.max_model_len
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty: at least one prompt token is needed")
        if n >= max_model_len:
            raise ValueError(
                f"the prompt is {n} tokens long, but this model's maximum context length (max_model_len) "
                f"is {max_model_len} tokens, which must also leave room for at least one output token"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise ValueError("stop strings need detokenization: a tokenizer and detokenize=True")

    def make_requests(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> list[EngineCoreRequest]:
        """One engine request per child; a seeded n > 1 request gives child i the seed + i."""
        arrival_time = arrival_time or time.time()
        requests = []
        for i, child_id in enumerate(child_request_ids(request_id, params.n)):
            seed = params.seed + i if params.seed is not None and params.n > 1 else params.seed
            child_params = params.clone(n=1, seed=seed) if params.n > 1 else params
            requests.append(
                EngineCoreRequest(
                    request_id=child_id,
                    prompt_token_ids=prompt_token_ids,
                    sampling_params=child_params,
                    eos_token_id=self.eos_token_id,
                    arrival_time=arrival_time,
                    cache_salt=cache_salt,
                    extra_eos_token_ids=list(self.extra_eos_token_ids),
                )
            )
        return requests
