#!/usr/bin/env bash
# The single-GPU benchmark suite, as run on the lent H200: results land in ${OUT:-benchmarks/results}.
set -u
out=${OUT:-benchmarks/results}
tag=${TAG:-h200}
for model in ${MODELS:-smollm2-135m llama3.2-1b llama3-8b}; do
  python3 benchmarks/throughput.py --model "$model" --out "$out/throughput_${model}_${tag}.json" 2>&1 | grep -E "output_tokens_per_s|Traceback|Error" 
  python3 benchmarks/latency.py --model "$model" --out "$out/latency_${model}_${tag}.json" 2>&1 | grep -E "ms_per_output_token_median|ttft_ms_median|Traceback|Error"
done
