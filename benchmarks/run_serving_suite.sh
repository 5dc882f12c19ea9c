#!/usr/bin/env bash
# Online serving on the lent GPU: start `python -m frontend` on a random-weight preset, time it to
# a healthy /health, run benchmarks/serving.py at the given rates, stop the server.
#   MODEL=llama3-8b RATES="12 inf" NUM_PROMPTS=300 bash benchmarks/run_serving_suite.sh
#   MAX_NUM_BATCHED_TOKENS=8192 (the server's default, and vLLM's for its API server) changes the chunk budget
#   MODEL=llama3-70b TP=2 TAG=h200x2_tp2 RATES="2 inf" NUM_PROMPTS=100 bash benchmarks/run_serving_suite.sh
set -u
model=${MODEL:-llama3-8b}
out=${OUT:-benchmarks/results}
tag=${TAG:-h200}
port=${PORT:-8011}
tp=${TP:-1}
batched=${MAX_NUM_BATCHED_TOKENS:-16384}
preset=benchmarks/presets/$model
start=$(date +%s.%N)
python3 -m frontend --model "$preset" --served-model-name "$model" --load-format dummy --skip-tokenizer-init \
  --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens "$batched" --host 127.0.0.1 --port "$port" \
  --tensor-parallel-size "$tp" \
  --disable-log-requests > "$out/server_${model}_${tag}.log" 2>&1 &
server=$!
for _ in $(seq 1 1800); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  sleep 0.1
done
ready=$(python3 -c "import time; print(round(time.time() - $start, 1))")
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
commit=${PAGEDSERVE_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
echo "healthy after ${ready} s"
echo "{\"model\": \"$model\", \"device\": \"$device\", \"git_commit\": \"$commit\", \"time_to_healthy_s\": $ready, \"command\": \"python3 -m frontend --model $preset --load-format dummy --skip-tokenizer-init --max-model-len 2048 --max-num-batched-tokens $batched --tensor-parallel-size $tp\", \"tensor_parallel_size\": $tp, \"max_num_batched_tokens\": $batched}" > "$out/ready_${model}_${tag}.json"
for rate in ${RATES:-12 inf}; do
  n=${NUM_PROMPTS:-300}
  [ "$rate" = inf ] && n=256
  python3 benchmarks/serving.py --base-url "http://127.0.0.1:$port" --model "$model" --num-prompts "$n" \
    --request-rate "$rate" --server-tensor-parallel-size "$tp" --server-pid "$server" --disable-tqdm --out "$out/serving_pagedserve_${model}_rate${rate}_${tag}.json" 2>&1 | tail -16
done
kill -INT $server; wait $server
