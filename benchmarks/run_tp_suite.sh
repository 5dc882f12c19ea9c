#!/usr/bin/env bash
# Tensor-parallel checks and benchmarks on a lent machine of several H200s. Each stage writes its
# JSON under $OUT/tp/ and everything ends up in $OUT/tp_<stages>.tar (the device tool returns at
# most 8 files). Every step has its own time limit, so one that hangs cannot take the rest down.
# STAGES takes several, run in order: STAGES="tp4 serve".
#   STAGES=check bash benchmarks/run_tp_suite.sh   # TP equality (fp32), graphs vs eager, all-reduce
#   STAGES=check2 bash benchmarks/run_tp_suite.sh  # the two-GPU part of check (nvidia-h200-x2)
#   STAGES=tp2   bash benchmarks/run_tp_suite.sh   # llama3-8b and llama3-70b offline + latency, TP=2
#   STAGES=tp4   bash benchmarks/run_tp_suite.sh   # llama3-70b offline + latency, TP=4
#   STAGES=serve bash benchmarks/run_tp_suite.sh   # llama3-70b served at TP=2 and TP=4
set -u
stages=${STAGES:-check}
base=${OUT:-benchmarks/results}
out=$base/tp
tag=${TAG:-h200}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS NAME CMD...: run with a limit, log to $out/NAME.log, show the summary lines
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   rc=$? after $SECONDS s in all"
  grep -E "output_tokens_per_s\"|ms_per_output_token_median|TP CHECK|healthy after|Traceback|Error:" "$out/$name.log" | head -8
}
for stage in $stages; do
case $stage in
  check)
    step 420 tp_check python3 tests/gpu/tp_check.py --presets smollm2-135m llama3-8b --tp 1 2 3 4 \
      --graphs-tp 2 --out "$out" --name "tp_check_${tag}"
    step 90 allreduce_2 python3 benchmarks/allreduce_bench.py --world-size 2 --hidden 8192 \
      --out "$out/allreduce_2gpu_${tag}.json"
    step 90 allreduce_4 python3 benchmarks/allreduce_bench.py --world-size 4 --hidden 8192 \
      --out "$out/allreduce_4gpu_${tag}.json"
    ;;
  check2)  # the two-GPU subset of check: all-reduce, then llama3-8b TP=2 against TP=1 (fp32)
    step 90 allreduce_2 python3 benchmarks/allreduce_bench.py --world-size 2 --hidden 8192 \
      --out "$out/allreduce_2gpu_${tag}.json"
    step 200 tp_check python3 tests/gpu/tp_check.py --presets llama3-8b --tp 1 2 --skip-graphs-check \
      --out "$out" --name "tp_check_${tag}"
    ;;
  tp2)
    step 120 thr_8b_tp2 env CUDA_VISIBLE_DEVICES=0,1 python3 benchmarks/throughput.py --model llama3-8b --tensor-parallel-size 2 \
      --out "$out/throughput_llama3-8b_tp2_${tag}.json"
    step 80 lat_8b_tp2 env CUDA_VISIBLE_DEVICES=0,1 python3 benchmarks/latency.py --model llama3-8b --tensor-parallel-size 2 \
      --out "$out/latency_llama3-8b_tp2_${tag}.json"
    step 220 thr_70b_tp2 env CUDA_VISIBLE_DEVICES=0,1 python3 benchmarks/throughput.py --model llama3-70b --tensor-parallel-size 2 \
      --out "$out/throughput_llama3-70b_tp2_${tag}.json"
    step 140 lat_70b_tp2 env CUDA_VISIBLE_DEVICES=0,1 python3 benchmarks/latency.py --model llama3-70b --tensor-parallel-size 2 --repeats 3 \
      --out "$out/latency_llama3-70b_tp2_${tag}.json"
    ;;
  tp4)
    step 60 allreduce_4 python3 benchmarks/allreduce_bench.py --world-size 4 --hidden 8192 \
      --out "$out/allreduce_4gpu_${tag}.json"
    step 130 thr_70b_tp4 python3 benchmarks/throughput.py --model llama3-70b --tensor-parallel-size 4 \
      --out "$out/throughput_llama3-70b_tp4_${tag}.json"
    step 90 lat_70b_tp4 python3 benchmarks/latency.py --model llama3-70b --tensor-parallel-size 4 --repeats 3 \
      --out "$out/latency_llama3-70b_tp4_${tag}.json"
    ;;
  serve)
    step 150 serve_70b_tp2 env CUDA_VISIBLE_DEVICES=0,1 MODEL=llama3-70b TP=2 TAG="${tag}_tp2" \
      RATES="${RATES_TP2:-2}" NUM_PROMPTS="${NUM_PROMPTS:-100}" OUT="$out" bash benchmarks/run_serving_suite.sh
    step 200 serve_70b_tp4 env MODEL=llama3-70b TP=4 TAG="${tag}_tp4" \
      RATES="${RATES_TP4:-2 4}" NUM_PROMPTS="${NUM_PROMPTS:-100}" OUT="$out" bash benchmarks/run_serving_suite.sh
    ;;
  *) echo "unknown STAGE $stage"; exit 2 ;;
esac
done
tar -cf "$base/tp_${stages// /_}.tar" -C "$base" tp
echo "results in $base/tp_${stages// /_}.tar"
