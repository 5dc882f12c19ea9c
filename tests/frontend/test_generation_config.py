"""The model's generation config (vLLM's --generation-config / --override-generation-config):
its EOS ids stop requests and its sampling fields become request defaults. Every case reads the
same generation_config.json with HF transformers' GenerationConfig as the reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from core.engine_args import EngineArgs
from core.generation_config import load_generation_defaults
from frontend.cli import parse_args
from frontend.llm import LLM
from frontend.processor import InputProcessor
from frontend.server.errors import APIError
from frontend.server.protocol import ChatCompletionRequest, CompletionRequest, decode_request
from frontend.server.serving import resolve_max_tokens
from ipc.config import EngineConfig, GenerationDefaults
from ipc.sampling_params import RequestOutputKind, SamplingParams
from tests.checkpoints import save_tiny_model
from workers.loaders.source import ModelSource

VOCAB = 96  # the vocabulary of test_loaders' tiny checkpoint
CONFIG_EOS = 2  # its config.json eos_token_id (LlamaConfig's default)
PROMPT = [5, 17, 33, 8, 61]
SAMPLING = {
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_new_tokens": 33,
    "do_sample": True,
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny random Llama checkpoint; save_pretrained wrote it a generation_config.json."""
    directory = tmp_path / "model"
    save_tiny_model(directory)
    return directory


def write_generation_config(directory: Path, content: dict[str, Any]) -> None:
    (directory / "generation_config.json").write_text(json.dumps(content))


def engine_config(directory: Path, **kwargs: Any) -> EngineConfig:
    return EngineArgs(model=str(directory), skip_tokenizer_init=True, **kwargs).create_engine_config()


def stop_ids(config: EngineConfig) -> set[int]:
    """Every id that ends a request without ignore_eos, as the frontend sends it to the engine."""
    (request,) = InputProcessor(config.model, None).make_requests("r", PROMPT, SamplingParams())
    assert request.eos_token_id is not None
    return {request.eos_token_id, *request.extra_eos_token_ids}


def default_params(config: EngineConfig) -> SamplingParams:
    return SamplingParams(**config.model.generation.sampling_defaults())


def hf_eos(directory: Path) -> set[int]:
    eos = GenerationConfig.from_pretrained(directory).eos_token_id
    return {eos} if isinstance(eos, int) else set(eos)


def assert_hf_sampling(params: SamplingParams, hf: GenerationConfig) -> None:
    """Each field as HF reads it, or vLLM's neutral default where HF reads none."""
    neutral = SamplingParams()
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(hf, name)
        assert getattr(params, name) == (getattr(neutral, name) if value is None else value), name
    assert params.max_tokens == (neutral.max_tokens if hf.max_new_tokens is None else hf.max_new_tokens)


# ------------------------------------------------------------------------------------ EOS ids


def test_eos_list_stops_on_every_id(model_dir: Path) -> None:
    write_generation_config(model_dir, {"eos_token_id": [CONFIG_EOS, 7, 9]})
    config = engine_config(model_dir)
    assert stop_ids(config) == hf_eos(model_dir) == {CONFIG_EOS, 7, 9}
    assert config.model.generation.sampling_defaults() == {}
    assert default_params(config) == SamplingParams()


def test_eos_int_adds_to_the_tokenizer_eos(model_dir: Path) -> None:
    # vLLM always stops on the tokenizer's EOS (here config.json's: no tokenizer) as well.
    write_generation_config(model_dir, {"eos_token_id": 7})
    assert stop_ids(engine_config(model_dir)) == hf_eos(model_dir) | {CONFIG_EOS} == {CONFIG_EOS, 7}
    write_generation_config(model_dir, {"eos_token_id": CONFIG_EOS})
    config = engine_config(model_dir)
    assert stop_ids(config) == hf_eos(model_dir) == {CONFIG_EOS}
    assert InputProcessor(config.model, None).extra_eos_token_ids == ()


def test_without_a_file_config_json_eos_list_counts(model_dir: Path) -> None:
    (model_dir / "generation_config.json").unlink()
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [CONFIG_EOS, 9]}))
    with pytest.raises(OSError):
        GenerationConfig.from_pretrained(model_dir)
    # What vLLM falls back to without the file: the generation config the model config implies.
    hf = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    config = engine_config(model_dir)
    assert config.model.eos_token_id == CONFIG_EOS
    assert stop_ids(config) == set(hf.eos_token_id) == {CONFIG_EOS, 9}
    assert default_params(config) == SamplingParams()


def test_extra_eos_ids_travel_beside_the_user_stop_tokens(model_dir: Path) -> None:
    write_generation_config(model_dir, {"eos_token_id": [CONFIG_EOS, 7]})
    processor = InputProcessor(engine_config(model_dir).model, None)
    params = SamplingParams(ignore_eos=True, stop_token_ids=[11], min_tokens=2)
    (request,) = processor.make_requests("r", PROMPT, params)
    assert (request.eos_token_id, request.extra_eos_token_ids) == (CONFIG_EOS, [7])
    assert request.sampling_params.stop_token_ids == [11]  # the user's, untouched


# ----------------------------------------------------------------------------- sampling defaults


def test_sampling_fields_become_the_defaults(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_generation_config(model_dir, {"eos_token_id": CONFIG_EOS, **SAMPLING})
    with caplog.at_level(logging.WARNING, logger="core.generation_config"):
        config = engine_config(model_dir)
    assert_hf_sampling(default_params(config), GenerationConfig.from_pretrained(model_dir))
    assert "using the model's generation config defaults" in caplog.text
    assert config.model.generation.max_tokens_limit is None  # auto: a default, not a cap


def test_vllm_mode_ignores_the_sampling_fields_but_not_the_eos_ids(model_dir: Path) -> None:
    write_generation_config(model_dir, {"eos_token_id": [CONFIG_EOS, 7], **SAMPLING})
    config = engine_config(model_dir, generation_config="vllm")
    assert default_params(config) == SamplingParams()
    assert stop_ids(config) == hf_eos(model_dir)  # vLLM reads the EOS ids in every mode


def test_directory_mode_reads_that_directory_and_caps_max_tokens(model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write_generation_config(other, {"eos_token_id": [CONFIG_EOS, 5], **SAMPLING})
    write_generation_config(model_dir, {"eos_token_id": CONFIG_EOS, "temperature": 0.1})
    config = engine_config(model_dir, generation_config=str(other))
    assert_hf_sampling(default_params(config), GenerationConfig.from_pretrained(other))
    assert stop_ids(config) == hf_eos(other)
    assert config.model.generation.max_tokens_limit == SAMPLING["max_new_tokens"]


def test_override_from_the_command_line(model_dir: Path) -> None:
    write_generation_config(model_dir, {"eos_token_id": CONFIG_EOS, **SAMPLING})
    override = '{"temperature": 0.5, "top_k": null, "max_new_tokens": 40}'
    args, _ = parse_args(["--model", str(model_dir), "--override-generation-config", override])
    assert (args.generation_config, args.override_generation_config) == ("auto", override)
    generation = args.replace(skip_tokenizer_init=True).create_engine_config().model.generation
    hf = GenerationConfig.from_pretrained(model_dir)
    hf.update(**json.loads(override))
    assert_hf_sampling(SamplingParams(**generation.sampling_defaults()), hf)
    assert generation.top_k is None  # a null in the override unsets the file's value
    assert generation.max_tokens_limit == 40  # vLLM: the override's max_new_tokens also caps
    args, _ = parse_args(
        ["--model", str(model_dir), "--generation-config", "vllm", "--override-generation-config", override]
    )
    generation = args.replace(skip_tokenizer_init=True).create_engine_config().model.generation
    assert generation.sampling_defaults() == {"temperature": 0.5, "max_tokens": 40}


def test_server_request_fields_beat_the_defaults(model_dir: Path) -> None:
    write_generation_config(model_dir, {"eos_token_id": CONFIG_EOS, **SAMPLING})
    generation = engine_config(model_dir).model.generation

    def chat(body: dict[str, Any], generation: GenerationDefaults = generation) -> SamplingParams:
        """What the chat route builds from ``body`` (prompt of 10 tokens, max_model_len 128)."""
        messages = [{"role": "user", "content": "hi"}]
        request = decode_request(json.dumps({"messages": messages, **body}).encode(), ChatCompletionRequest)
        requested, requested_as = request.requested_max_tokens
        return request.to_sampling_params(
            max_tokens=resolve_max_tokens(requested, requested_as, 10, 128, "messages", generation),
            logprobs=None,
            vocab_size=VOCAB,
            kind=RequestOutputKind.FINAL_ONLY,
            defaults=generation.sampling_defaults(),
        )

    assert_hf_sampling(chat({}), GenerationConfig.from_pretrained(model_dir))
    given = chat({"temperature": 1.0, "top_k": -1, "top_p": None, "min_p": 0.2, "max_tokens": 50})
    picked = {name: getattr(given, name) for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens")}
    assert picked == {
        "temperature": 1.0,
        "top_p": SAMPLING["top_p"],
        "top_k": 0,
        "min_p": 0.2,
        "max_tokens": 50,
    }
    assert given.repetition_penalty == SAMPLING["repetition_penalty"]
    assert chat({}, GenerationDefaults(max_tokens=500)).max_tokens == 128 - 10  # within max_model_len
    assert chat({"max_tokens": 50}, GenerationDefaults(max_tokens_limit=33)).max_tokens == 33
    with pytest.raises(APIError, match="maximum context length"):
        chat({"max_tokens": 200})
    # Completions default to max_tokens=16 (OpenAI's), so the model's default does not apply there.
    completion = decode_request(b'{"prompt": "hi"}', CompletionRequest)
    assert resolve_max_tokens(completion.max_tokens, "max_tokens", 10, 128, "prompt", generation) == 16


# --------------------------------------------------------------------------------- end to end


def test_offline_generation_stops_on_a_generation_config_eos(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hf_generate(config: GenerationConfig, **kwargs: Any) -> list[int]:
        ids = torch.tensor([PROMPT])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs)
        return out[0, len(PROMPT) :].tolist()

    free = hf_generate(
        GenerationConfig(max_new_tokens=12, eos_token_id=None, pad_token_id=0, do_sample=False)
    )
    # An EOS id greedy decoding produces early: the first new token after the first two.
    early = next(t for i, t in enumerate(free) if i >= 2 and t != CONFIG_EOS and t not in free[:i])
    write_generation_config(
        model_dir, {"eos_token_id": [CONFIG_EOS, early], "temperature": 0.0, "max_new_tokens": 12}
    )
    hf_config = GenerationConfig.from_pretrained(model_dir)
    stopped = hf_generate(hf_config)
    assert stopped[-1] == early and len(stopped) < 12

    llm = LLM(
        str(model_dir),
        skip_tokenizer_init=True,
        engine_process=False,
        max_model_len=128,
        block_size=8,
        num_gpu_blocks_override=64,
    )
    try:
        assert_hf_sampling(llm.get_default_sampling_params(), hf_config)

        def run(params: SamplingParams | None) -> tuple[list[int], str | None, int | str | None]:
            (out,) = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
            return out.outputs[0].token_ids, out.outputs[0].finish_reason, out.outputs[0].stop_reason

        # No params: the model's defaults (greedy, 12 tokens), stopping on its extra EOS id.
        assert run(None) == (stopped, "stop", early)
        assert run(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) == (free, "length", None)
        # min_tokens masks every EOS id, as HF's min_new_tokens does, with or without ignore_eos.
        masked = hf_generate(hf_config, min_new_tokens=4)
        tokens, reason, _ = run(SamplingParams(temperature=0, max_tokens=12, min_tokens=4))
        assert tokens == masked and reason == ("stop" if len(masked) < 12 else "length")
        tokens, reason, _ = run(SamplingParams(temperature=0, max_tokens=12, min_tokens=4, ignore_eos=True))
        assert tokens[:4] == masked[:4] and (len(tokens), reason) == (12, "length")
        # A user's stop token still stops with ignore_eos.
        assert run(
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[free[1]])
        ) == (
            free[:2],
            "stop",
            free[1],
        )
    finally:
        llm.shutdown()


# ------------------------------------------------------------------------------------------ GGUF


def write_gguf_metadata(path: Path, **sampling: float | int) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])  # an array the reader steps over
    writer.add_eos_token_id(CONFIG_EOS)
    writer.add_eot_token_id(7)
    writer.add_eom_token_id(8)
    for key, value in sampling.items():
        getattr(writer, f"add_sampling_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_gguf_metadata_eos_ids_and_sampling_keys(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf_metadata(
        path, temp=0.7, top_k=40, top_p=0.95, min_p=0.05, penalty_repeat=1.1, penalty_last_n=-1
    )
    reader = gguf.GGUFReader(path)

    def meta(key: str) -> Any:
        return reader.get_field(key).contents()

    source = ModelSource(path=path, format="gguf", name=str(path))
    generation = load_generation_defaults(source, {}, VOCAB)
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    assert generation.eos_token_ids == tuple(meta(key) for key in eos_keys) == (CONFIG_EOS, 7, 8)
    f32 = np.float32
    assert f32(generation.temperature) == f32(meta("general.sampling.temp")) and generation.temperature == 0.7
    assert generation.top_k == meta("general.sampling.top_k") == 40
    assert f32(generation.top_p) == f32(meta("general.sampling.top_p"))
    assert f32(generation.min_p) == f32(meta("general.sampling.min_p"))
    assert f32(generation.repetition_penalty) == f32(meta("general.sampling.penalty_repeat"))


def test_gguf_windowed_repeat_penalty_is_not_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = ModelSource(path=tmp_path / "m.gguf", format="gguf", name="m")
    write_gguf_metadata(source.path, penalty_repeat=1.1)  # llama.cpp's default window
    with caplog.at_level(logging.WARNING, logger="core.generation_config"):
        assert load_generation_defaults(source, {}, VOCAB).repetition_penalty is None
    assert "penalty_repeat=1.1" in caplog.text
    write_gguf_metadata(source.path, penalty_repeat=1.1, penalty_last_n=0)  # penalty off
    assert load_generation_defaults(source, {}, VOCAB).sampling_defaults() == {}


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"temperature": 0.5,', r"generation_config\.json is not valid JSON"),
        ("[1, 2]", r"generation_config\.json must hold a JSON object, got list"),
        ('{"temperature": "hot"}', r"generation_config\.json: temperature must be a number"),
        ('{"top_k": 2.5}', r"generation_config\.json: top_k must be an integer"),
        ('{"top_p": 0}', r"generation_config\.json.*top_p must be in \(0, 1\]"),
        ('{"eos_token_id": [2, "x"]}', r"eos_token_id must be a token id or a list"),
        ('{"eos_token_id": 96}', r"eos_token_id 96 is outside the vocabulary \[0, 96\)"),
    ],
)
def test_malformed_generation_config_is_refused(model_dir: Path, content: str, message: str) -> None:
    (model_dir / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        engine_config(model_dir)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("[1, 2]", "override_generation_config must be a JSON object, got list"),
        ('"temperature"', "override_generation_config must be a JSON object, got str"),
        ("{temperature: 1}", "override_generation_config is not valid JSON"),
        ('{"temperature": -1}', "override_generation_config.*temperature must be non-negative"),
        ('{"max_new_tokens": "9"}', "override_generation_config: max_new_tokens must be an integer"),
    ],
)
def test_bad_override_is_refused(model_dir: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_config(model_dir, override_generation_config=override)


def test_unknown_generation_config_mode_is_refused(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'auto', 'vllm' or a directory holding generation_config\.json"):
        engine_config(model_dir, generation_config="default")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds neither generation_config\.json nor config\.json"):
        engine_config(model_dir, generation_config=str(empty))
