"""GPU checks of the CUDA path, run on the lent GPU machine (`make gpu-check`); writes a JSON report.

1. The Triton kernel tests in bf16 at real shapes (pytest -m gpu).
2. Full-model logits against HF transformers on the same random weights, teacher-forced over a
   prompt, per position (bf16: smollm2-135m and llama3-8b presets).
3. fp32 greedy tokens identical to HF transformers' generate (smollm2-135m, llama3.2-1b presets).
4. CUDA-graph decode and eager decode give the same tokens.
5. The engine end to end: startup time, KV capacity, a batch of requests.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from frontend import LLM, SamplingParams  # noqa: E402
from workers.attention import AttentionMetadata  # noqa: E402
from workers.models.llama import LlamaForCausalLM, dummy_checkpoint  # noqa: E402

PRESETS = ROOT.parent / "shared" / "bench" / "presets"
logger = logging.getLogger("gpu_check")


def preset(name: str) -> Path:
    for base in (PRESETS, ROOT / "benchmarks" / "presets"):
        if (base / name / "config.json").is_file():
            return base / name
    raise FileNotFoundError(f"preset {name} not found under {PRESETS}")


def build_pair(name: str, dtype: torch.dtype, seed: int = 0):
    """Our model and HF's, on the GPU, with the same random weights."""
    path = preset(name)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    cfg = hf_config.to_dict()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            ours = LlamaForCausalLM(cfg)
            theirs = transformers.AutoModelForCausalLM.from_config(
                hf_config, attn_implementation="sdpa", dtype=dtype
            )
    finally:
        torch.set_default_dtype(torch.float32)
    their_params = dict(theirs.named_parameters())

    def tee() -> Iterator[tuple[str, torch.Tensor]]:
        for tensor_name, tensor in dummy_checkpoint(cfg, seed, "cuda"):
            with torch.no_grad():
                their_params[tensor_name].copy_(tensor)
            yield tensor_name, tensor

    ours.load_weights(tee())
    if cfg.get("tie_word_embeddings"):
        theirs.tie_weights()
    return ours.eval(), theirs.eval()


@torch.inference_mode()
def our_prefill_logits(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    n = len(ids)
    blocks = -(-n // block_size)
    layer = model.layers[0].self_attn
    dtype = next(model.parameters()).dtype
    caches = [
        torch.full(
            (2, blocks + 3, block_size, layer.num_kv_heads, layer.head_dim),
            float("nan"),
            dtype=dtype,
            device="cuda",
        )
        for _ in model.layers
    ]
    table = torch.arange(blocks, dtype=torch.int32, device="cuda").flip(0) + 3  # out of order: real paging
    positions = torch.arange(n, device="cuda")
    slots = table[positions // block_size].long() * block_size + positions % block_size
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=table[None, :],
        seq_lens=torch.tensor([n], dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
        max_query_len=n,
        max_seq_len=n,
    )
    hidden = model(torch.tensor(ids, device="cuda"), positions, caches, meta)
    return model.compute_logits(hidden).float()


def compare_logits(name: str, length: int = 256) -> dict:
    ours, theirs = build_pair(name, torch.bfloat16)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10000, size=length).tolist()
    mine = our_prefill_logits(ours, ids)
    with torch.inference_mode():
        hf_bf16 = theirs(torch.tensor([ids], device="cuda")).logits[0].float()
        # The noise floor: the same (bf16-rounded) weights computed in fp32 by HF.
        theirs.float()
        hf_fp32 = theirs(torch.tensor([ids], device="cuda")).logits[0].float()

    def err(x: torch.Tensor) -> dict:
        d = (x - hf_fp32).abs()
        return {
            "max_abs_diff": d.max().item(),
            "mean_abs_diff": d.mean().item(),
            "top1_agreement": (x.argmax(-1) == hf_fp32.argmax(-1)).float().mean().item(),
        }

    ours_err, hf_err = err(mine), err(hf_bf16)
    result = {
        "preset": name,
        "dtype": "bfloat16",
        "positions": length,
        "reference": "HF transformers on the same weights computed in fp32",
        "ours_bf16_vs_fp32": ours_err,
        "hf_bf16_vs_fp32": hf_err,
        "ours_vs_hf_bf16_max_abs_diff": (mine - hf_bf16).abs().max().item(),
        "max_abs_logit": hf_fp32.abs().max().item(),
        "all_finite": bool(torch.isfinite(mine).all().item()),
    }
    # Within bf16 norms: no further from the fp32 result than HF's own bf16 run (50% slack).
    result["ok"] = (
        result["all_finite"]
        and ours_err["mean_abs_diff"] <= 1.5 * hf_err["mean_abs_diff"]
        and ours_err["top1_agreement"] >= hf_err["top1_agreement"] - 0.05
    )
    del ours, theirs
    torch.cuda.empty_cache()
    return result


def graph_replays(llm: LLM) -> int:
    graphs = llm.engine.core.executor.worker.runner.graphs
    return 0 if graphs is None else graphs.replays


def piecewise_replays(llm: LLM) -> int:
    """Steps (prefills, mixed) run from the piecewise graphs."""
    pieces = llm.engine.core.executor.worker.runner.pieces
    return 0 if pieces is None else pieces.replays


def greedy_vs_hf(name: str, num_prompts: int = 4, max_tokens: int = 32) -> dict:
    ours, theirs = build_pair(name, torch.float32)
    del ours
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 10000, size=int(rng.integers(16, 200))).tolist() for _ in range(num_prompts)]
    expected = []
    with torch.inference_mode():
        for p in prompts:
            out = theirs.generate(
                torch.tensor([p], device="cuda"),
                attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            expected.append(out[0, len(p) :].tolist())
    del theirs
    gc.collect()
    torch.cuda.empty_cache()
    results = {}
    for eager in (True, False):
        llm = LLM(
            model=str(preset(name)),
            engine_process=False,
            load_format="dummy",
            dtype="float32",
            skip_tokenizer_init=True,
            max_model_len=1024,
            enforce_eager=eager,
            gpu_memory_utilization=0.5,
        )
        outs = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
        )
        results["eager" if eager else "cuda_graphs"] = [o.outputs[0].token_ids for o in outs]
        results["replays_" + ("eager" if eager else "cuda_graphs")] = graph_replays(llm)
        results["piecewise_" + ("eager" if eager else "cuda_graphs")] = piecewise_replays(llm)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return {
        "preset": name,
        "dtype": "float32",
        "prompts": num_prompts,
        "max_tokens": max_tokens,
        "eager_equals_hf": results["eager"] == expected,
        "graphs_equal_hf": results["cuda_graphs"] == expected,
        "graph_replays": results["replays_cuda_graphs"],
        "piecewise_replays": results["piecewise_cuda_graphs"],
        "ok": results["eager"] == expected
        and results["cuda_graphs"] == expected
        and results["replays_cuda_graphs"] > 0
        and results["piecewise_cuda_graphs"] > 0  # the prompts' prefill ran from piecewise graphs
        and results["replays_eager"] == 0
        and results["piecewise_eager"] == 0,
    }


def graphs_vs_eager_bf16(name: str) -> dict:
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 10000, size=int(rng.integers(16, 300))).tolist() for _ in range(24)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    tokens, timing, replays = {}, {}, {}
    for eager in (True, False):
        start = time.perf_counter()
        llm = LLM(
            model=str(preset(name)),
            engine_process=False,
            load_format="dummy",
            skip_tokenizer_init=True,
            max_model_len=2048,
            max_num_batched_tokens=512,  # chunked prompts: the steps with prefill run piecewise
            enforce_eager=eager,
            gpu_memory_utilization=0.5,
        )
        ready = time.perf_counter() - start
        llm.generate(prompts[:2], params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        key = "eager" if eager else "cuda_graphs"
        replays[key] = graph_replays(llm)
        replays[key + "_piecewise"] = piecewise_replays(llm)
        timing[key] = {
            "ready_s": ready,
            "batch_s": time.perf_counter() - start,
            "kv_tokens": llm.engine.kv_capacity_tokens,
        }
        tokens[key] = [o.outputs[0].token_ids for o in outs]
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(tokens["eager"], tokens["cuda_graphs"]))
    return {
        "preset": name,
        "dtype": "bfloat16",
        "requests": len(prompts),
        "identical_requests": same,
        "timing": timing,
        "graph_replays": replays,
        "ok": same == len(prompts)
        and replays["cuda_graphs"] > 0
        and replays["cuda_graphs_piecewise"] > 0
        and replays["eager"] == replays["eager_piecewise"] == 0,
    }


def kernel_tests() -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    return {
        "returncode": proc.returncode,
        "summary": tail,
        "seconds": time.perf_counter() - start,
        "ok": proc.returncode == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip", nargs="*", default=[], help="checks to skip: kernels logits greedy graphs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "git_commit": os.environ.get("PAGEDSERVE_GIT_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or "unknown",
        "checks": {},
    }
    checks = {
        "kernels": kernel_tests,
        "logits": lambda: [compare_logits("smollm2-135m"), compare_logits("llama3-8b", length=128)],
        "greedy": lambda: [greedy_vs_hf("smollm2-135m"), greedy_vs_hf("llama3.2-1b")],
        "graphs": lambda: [graphs_vs_eager_bf16("smollm2-135m")],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in checks.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            report["checks"][name] = {"result": fn(), "seconds": time.perf_counter() - start}
        except Exception as exc:  # record and go on: one failure must not hide the others
            logger.exception("check %s failed", name)
            report["checks"][name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - start,
            }
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({name: report["checks"][name]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
