#!/usr/bin/env bash
# Device run for issue 4: "20b with --max-model-len 131072 fits in 24 GB". Serves a synthetic
# 20b (Unsloth NF4) on the CUDA backend with --gpu-memory-utilization set so that the server
# may use 24 GiB of the card (utilization = 24 GiB / total), sends one chat request, and checks
# that the GPU's memory.used stays within 24 GiB. Then checks that a budget too small for one
# 131072-token sequence (19 GiB) fails at startup with a clear error.
#
# Runs on the GPU machine from the repository root, without a Rust toolchain: the release
# binary is carried as carry/gptoss (`cargo build --release -p gptoss-cli`, copy
# target/release/gptoss there). Logs and a summary go under $OUT. About 1-2 minutes (the 20b
# synthesis, ~25 s, only when /tmp/m20 is missing).
#
#   OUT=/tmp/out bash scripts/device_kv_fit.sh
set -uo pipefail

BIN=${GPTOSS_BIN:-./carry/gptoss}
MODEL=${MODEL_DIR:-/tmp/m20}
PORT=${PORT:-8011}
LIMIT_GIB=${LIMIT_GIB:-24}
CONTEXT=131072
OUT=${OUT:-/tmp/device_kv_fit}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$@" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | head -1)
# Rounded down, so utilization x total never exceeds the limit (the driver's total, which the
# server multiplies by, is a little below nvidia-smi's).
util_for() { awk -v t="$total_mib" -v g="$1" 'BEGIN { u = g * 1024 / t; if (u > 1) u = 1; printf "%.4f", int(u * 10000) / 10000 }'; }
util=$(util_for "$LIMIT_GIB")
say "GPU total ${total_mib} MiB; --gpu-memory-utilization ${util} = ${LIMIT_GIB} GiB"

if [ ! -f "$MODEL/config.json" ]; then
  t0=$(date +%s)
  "$BIN" synth --preset 20b --layout unsloth-nf4 --out "$MODEL" >"$OUT/synth.log" 2>&1 \
    || { say "FAIL: synth"; cat "$OUT/synth.log"; exit 1; }
  say "synthesized $MODEL in $(( $(date +%s) - t0 )) s"
fi

server=""
stop_server() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -INT "$server"
    for _ in $(seq 1 40); do kill -0 "$server" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
  server=""
}
trap stop_server EXIT

# 1. 24 GiB: must start, answer, and stay within 24 GiB.
t0=$(date +%s)
"$BIN" serve "$MODEL" --device cuda --port "$PORT" --max-model-len "$CONTEXT" \
  --gpu-memory-utilization "$util" --served-model-name gpt-oss-20b-synthetic \
  >"$OUT/serve.log" 2>&1 &
server=$!
up=0
for _ in $(seq 1 240); do
  if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then up=1; break; fi
  kill -0 "$server" 2>/dev/null || break
  sleep 0.25
done
if [ "$up" != 1 ]; then
  say "FAIL: the server did not come up with ${LIMIT_GIB} GiB; its log:"
  tee -a "$summary" <"$OUT/serve.log"
  exit 1
fi
say "server up in $(( $(date +%s) - t0 )) s; startup lines:"
grep -E "^(KV cache|note:|serving)" "$OUT/serve.log" | tee -a "$summary"

curl -sS -m 60 "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "gpt-oss-20b-synthetic", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16}' \
  >"$OUT/chat.json"
if grep -q '"choices"' "$OUT/chat.json"; then
  say "chat request: ok ($(grep -o '"usage":{[^}]*}' "$OUT/chat.json"))"
else
  say "FAIL: chat request:"; tee -a "$summary" <"$OUT/chat.json"; echo
fi
nvidia-smi --query-gpu=memory.used,memory.total --format=csv | tee "$OUT/memory_serving.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >>"$OUT/memory_serving.txt" 2>&1
used_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
limit_mib=$(( LIMIT_GIB * 1024 ))
if [ "$used_mib" -le "$limit_mib" ]; then
  say "PASS: memory.used while serving ${used_mib} MiB <= ${limit_mib} MiB (${LIMIT_GIB} GiB)"
  fit=0
else
  say "FAIL: memory.used while serving ${used_mib} MiB > ${limit_mib} MiB (${LIMIT_GIB} GiB)"
  fit=1
fi
stop_server
tail -2 "$OUT/serve.log" >>"$summary"

# 2. 19 GiB cannot hold one 131072-token sequence next to the weights: a clear startup error.
small=$(util_for 19)
"$BIN" serve "$MODEL" --device cuda --port "$PORT" --max-model-len "$CONTEXT" \
  --gpu-memory-utilization "$small" >"$OUT/serve_small.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
  kill -0 "$server" 2>/dev/null || break
  if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  sleep 0.25
done
if kill -0 "$server" 2>/dev/null; then
  say "note: --gpu-memory-utilization $small (19 GiB) started anyway:"
  grep -E "^KV cache" "$OUT/serve_small.log" | tee -a "$summary"
  stop_server
else
  wait "$server"; rc=$?
  server=""
  say "--gpu-memory-utilization $small (19 GiB): exit code $rc, error:"
  grep -E "^(Error|error)" -A3 "$OUT/serve_small.log" | tee -a "$summary"
fi
exit "$fit"
