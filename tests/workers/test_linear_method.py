"""The linear-method seam (workers/quantization/): a method that stores its weights its own way,
plugged into every linear layer, gives the model the same output as the unquantized method and
the same greedy tokens as HF transformers, at TP=1 and across two worker processes; the layers
shard whatever parameters a method registers along the dimensions it names; the method comes
from the checkpoint's ``quantization_config``, and an unknown one is refused by name.

Worker processes started with a worker class from this module import it: transformers, the
engine and the frontend are imported where used, so that such workers start in seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from kernels.gemm import GemmPlan
from workers.models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
    linear_layers,
)
from workers.models.llama import AttentionMetadata, LlamaForCausalLM
from workers.models.registry import build_model, load_model_weights
from workers.models.weight_loading import WHOLE
from workers.quantization import (
    UNQUANTIZED,
    LinearLayer,
    LinearMethod,
    LinearPartition,
    QuantizationConfig,
    UnquantizedLinearMethod,
    attach_gemm_plan,
    gemm_weights,
    quantization_config,
)
from workers.worker import Worker


@dataclasses.dataclass(slots=True)
class Float64Transposed(LinearMethod):
    """Loads the checkpoint's [out, in] weight into float64, keeps it transposed as ``weight_t``
    ([in, out]) once loaded, and computes in float64."""

    name: ClassVar[str] = "test-float64-transposed"
    calls: int = 0

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> Float64Transposed:
        return cls()

    def create_weights(self, layer: LinearLayer, partition: LinearPartition) -> None:
        weight = torch.empty(
            partition.output_size_per_partition, partition.input_size_per_partition, dtype=torch.float64
        )
        layer.register_weight("weight", weight, output_dim=0, input_dim=1)

    def process_after_loading(self, layer: nn.Module) -> None:
        transposed = layer.weight.t().contiguous()
        del layer.weight
        layer.weight_t = nn.Parameter(transposed, requires_grad=False)

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.calls += 1
        y = x.double() @ layer.weight_t
        if bias is not None:
            y += bias.double()
        return y.to(x.dtype) if out is None else out.copy_(y)


TOY = QuantizationConfig(Float64Transposed)


@dataclasses.dataclass(slots=True)
class CheckpointTransposed(LinearMethod):
    """A format whose checkpoint stores each weight as [in, out]: output rows along dim 1."""

    name: ClassVar[str] = "test-checkpoint-transposed"

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> CheckpointTransposed:
        return cls()

    def create_weights(self, layer: LinearLayer, partition: LinearPartition) -> None:
        weight = torch.empty(partition.input_size_per_partition, partition.output_size_per_partition)
        layer.register_weight("weight", weight, output_dim=1, input_dim=0)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Nothing: ``apply`` reads the [in, out] layout as it is."""

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = x @ layer.weight if bias is None else torch.addmm(bias, x, layer.weight)
        return y if out is None else out.copy_(y)


class ToyMethodWorker(Worker):
    """A worker whose model runs ``Float64Transposed`` in every linear layer."""

    def load_model(self) -> None:
        super().load_model()
        model = LlamaForCausalLM(self.config.model.hf_config, self.tp, TOY)
        load_model_weights(model, self.config.model)
        self.model = self.runner.model = model.eval()


# --------------------------------------------------------------------------- the seam end to end


@pytest.fixture(scope="module", params=["llama-gqa-untied", "qwen2-qkv-bias"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from tests.workers.test_model_vs_hf import make_model

    return make_model(tmp_path_factory, request.param)


def _model_config(path: Path):
    from core.engine_args import EngineArgs

    return EngineArgs(model=str(path), device="cpu").create_engine_config().model


def _prefill_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """The logits at every position of one sequence's prefill into an empty paged cache."""
    n, block = len(tokens), 16
    blocks = -(-n // block)
    heads, head_dim = model.layers[0].self_attn.num_kv_heads, model.args.head_dim
    caches = [torch.zeros(2, blocks, block, heads, head_dim) for _ in model.layers]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n,
        max_seq_len=n,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), caches, meta))


def test_toy_method_gives_the_unquantized_output(tiny) -> None:
    path, hf = tiny
    config = _model_config(path)
    plain = build_model(config, TPGroup(), torch.float32, torch.device("cpu"))
    load_model_weights(plain, config)
    toy = LlamaForCausalLM(config.hf_config, TPGroup(), TOY)
    load_model_weights(toy, config)

    layers = list(linear_layers(toy))
    assert len(layers) == 4 * config.num_layers
    for layer in layers:
        assert isinstance(layer.linear_method, Float64Transposed)
        assert not hasattr(layer, "weight") and layer.weight_t.dtype == torch.float64
    # The GEMM plan is the unquantized method's: a toy layer has nothing to tune.
    assert gemm_weights(layers) == {} and attach_gemm_plan(layers, GemmPlan()) == 0
    assert all(isinstance(m.linear_method, UnquantizedLinearMethod) for m in linear_layers(plain))

    tokens = [5, 77, 3, 190, 42, 42, 8, 250, 17, 101, 64, 9, 33, 120, 200, 4, 6, 99]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    got_plain, got_toy = _prefill_logits(plain, tokens), _prefill_logits(toy, tokens)
    torch.testing.assert_close(got_toy, got_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_toy, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_toy.argmax(-1), expected.argmax(-1))
    assert all(layer.linear_method.calls == 1 for layer in layers)


def _engine_greedy(path: Path, tp: int, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from core.engine_args import EngineArgs
    from core.engine_core import EngineCore
    from core.executor import UniProcExecutor
    from core.mp_executor import MultiprocExecutor
    from ipc.messages import EngineCoreRequest
    from ipc.sampling_params import SamplingParams

    config = EngineArgs(
        model=str(path),
        skip_tokenizer_init=True,
        num_gpu_blocks_override=64,
        max_model_len=128,
        tensor_parallel_size=tp,
    ).create_engine_config()
    executor_cls = MultiprocExecutor if tp > 1 else UniProcExecutor
    engine = EngineCore(config, executor=executor_cls(config, worker_cls=ToyMethodWorker))
    try:
        if tp == 1:  # the runner's model is the toy one: every linear ran its method
            model = engine.executor.worker.runner.model
            assert all(isinstance(m.linear_method, Float64Transposed) for m in linear_layers(model))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        tokens: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            tokens[str(i)] = []
            engine.add_request(
                EngineCoreRequest(request_id=str(i), prompt_token_ids=prompt, sampling_params=params)
            )
        while engine.has_unfinished_requests():
            for output in engine.step().outputs:
                tokens[output.request_id] += output.new_token_ids
        if tp == 1:
            assert all(m.linear_method.calls > 0 for m in linear_layers(model))
    finally:
        engine.shutdown()
    return list(tokens.values())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [1, 2])
def test_toy_method_engine_greedy_matches_hf(tiny, tp: int) -> None:
    from tests.workers.test_model_vs_hf import hf_greedy, prompts

    path, hf = tiny
    batch = prompts(3, seed=5, hi=30)
    expected = [hf_greedy(hf, p, 8) for p in batch]
    assert _engine_greedy(path, tp, batch, 8) == expected


# --------------------------------------------------------------------------- sharding by named dims


def _full(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rank", [0, 1])
def test_layers_shard_a_parameter_along_the_dims_its_method_names(rank: int) -> None:
    # 4 query heads and 1 KV head of 8 over 2 ranks: q split, k and v replicated.
    tp = TPGroup(rank=rank, size=2)
    transposed = QuantizationConfig(CheckpointTransposed)
    q, k, v = _full(32, 24, 1), _full(8, 24, 2), _full(8, 24, 3)
    gate, up, down = _full(40, 24, 4), _full(40, 24, 5), _full(24, 40, 6)
    cases = [  # (layer, checkpoint tensors by shard, what this rank holds in [out, in])
        (
            lambda c: QKVParallelLinear(24, 8, 4, 1, False, tp, c),
            {"q": q, "k": k, "v": v},
            torch.cat([q.chunk(2)[rank], k, v]),
        ),
        (
            lambda c: MergedColumnParallelLinear(24, [40, 40], False, tp, c),
            {0: gate, 1: up},
            torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]),
        ),
        (lambda c: RowParallelLinear(40, 24, False, tp, c), {WHOLE: down}, down.chunk(2, dim=1)[rank]),
    ]
    for make, tensors, held in cases:
        plain, other = make(UNQUANTIZED), make(transposed)
        for shard, tensor in tensors.items():
            plain.weight.weight_loader(plain.weight, tensor, shard)
            other.weight.weight_loader(other.weight, tensor.t(), shard)
        assert torch.equal(plain.weight, held) and torch.equal(other.weight, held.t())
        x = torch.randn(3, held.shape[1])
        torch.testing.assert_close(other.linear_method.apply(other, x), x @ held.t())

    # The full shape each checkpoint tensor must have is in the method's layout too.
    layer = RowParallelLinear(40, 24, False, tp, transposed)
    with pytest.raises(ValueError, match=r"has shape \(24, 40\), expected \(40, 24\)"):
        layer.weight.weight_loader(layer.weight, down, WHOLE)


def test_a_fused_layers_parameter_needs_an_output_dim() -> None:
    layer = ColumnParallelLinear(8, 16, False, TPGroup())
    layer.register_weight("scale", torch.ones(()), output_dim=None, input_dim=None)  # one shard: whole
    with pytest.raises(ValueError, match="fuses 2 checkpoint tensors: its parameter 'scale' needs an output"):
        MergedColumnParallelLinear(8, [16, 16], False, TPGroup()).register_weight(
            "scale", torch.ones(()), output_dim=None, input_dim=None
        )


# --------------------------------------------------------------------------- choosing the method


def test_method_comes_from_the_checkpoints_quantization_config(tiny) -> None:
    assert quantization_config({"hidden_size": 64}) is UNQUANTIZED
    none = quantization_config({"quantization_config": {"quant_method": "none"}})
    assert none.name == "none" and isinstance(none.linear_method(), UnquantizedLinearMethod)
    awq = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    with pytest.raises(ValueError, match="quantization method 'awq' is not supported; supported: none"):
        quantization_config(awq)
    with pytest.raises(ValueError, match="quantization_config names no quant_method"):
        quantization_config({"quantization_config": {"bits": 4}})
    # The worker's model construction refuses it before any weight is read.
    config = _model_config(tiny[0])
    config = dataclasses.replace(config, hf_config={**config.hf_config, **awq})
    with pytest.raises(ValueError, match="'awq' is not supported"):
        build_model(config, TPGroup(), torch.float32, torch.device("cpu"))
