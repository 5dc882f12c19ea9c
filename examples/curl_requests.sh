#!/usr/bin/env bash
# Every route of a running pagedserve server, with curl.
#
#   make serve            # or: python -m frontend --model smollm2-135m-instruct [--api-key KEY]
#   examples/curl_requests.sh [http://localhost:8000]
#
# Set PAGEDSERVE_API_KEY when the server was started with --api-key.
set -euo pipefail

BASE="${1:-http://localhost:8000}"
AUTH=(-H "Authorization: Bearer ${PAGEDSERVE_API_KEY:-unused}")
JSON=(-H "Content-Type: application/json")
MODEL="$(curl -sf "${AUTH[@]}" "$BASE/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"

say() { printf '\n### %s\n' "$*"; }

say "health (200 while the engine is alive, 503 once it is not) and version"
curl -s -o /dev/null -w '%{http_code}\n' "$BASE/health"
curl -s "$BASE/version"; echo

say "models"
curl -s "${AUTH[@]}" "$BASE/v1/models"; echo

say "completion (greedy, with top-2 logprobs)"
curl -s "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d "{
  \"model\": \"$MODEL\", \"prompt\": \"The capital of France is\",
  \"max_tokens\": 8, \"temperature\": 0, \"logprobs\": 2, \"stop\": [\"\\n\"]
}"; echo

say "completion, streamed, with a final usage chunk"
curl -sN "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d "{
  \"model\": \"$MODEL\", \"prompt\": [\"Once upon a time\", \"def fibonacci(n):\"],
  \"max_tokens\": 8, \"stream\": true, \"stream_options\": {\"include_usage\": true}
}"

say "chat completion"
curl -s "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"temperature\": 0, \"max_completion_tokens\": 32,
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]
}"; echo

say "chat completion, streamed (vLLM extras: top_k, repetition_penalty)"
curl -sN "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/chat/completions" -d "{
  \"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 16, \"top_k\": 40, \"repetition_penalty\": 1.1,
  \"messages\": [{\"role\": \"user\", \"content\": \"Name three colours.\"}]
}"

say "tokenize and detokenize"
curl -s "${JSON[@]}" "$BASE/tokenize" -d '{"prompt": "Hello world", "return_token_strs": true}'; echo
curl -s "${JSON[@]}" "$BASE/detokenize" -d '{"tokens": [19556, 905]}'; echo

say "an error is OpenAI-shaped and names the field"
curl -s "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d "{\"model\": \"$MODEL\", \"prompt\": \"hi\", \"temperature\": -1}"; echo

say "metrics (Prometheus; vLLM's names under pagedserve:)"
curl -s "$BASE/metrics" | grep -E '^pagedserve:(num_requests|kv_cache_usage|request_success_total)'
