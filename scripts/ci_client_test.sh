#!/usr/bin/env bash
# CI: start `gptoss serve` on the bundled demo model and run the official `openai` Python client
# against it (scripts/openai_client_test.py). Loopback only; the server is always stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TMPDIR:-/tmp}/gptoss-client-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r scripts/requirements-client.txt

cargo build -q -p gptoss-cli
bin=target/debug/gptoss
port=$(( 20000 + RANDOM % 20000 ))
key="ci-$RANDOM$RANDOM"
export GPTOSS_CACHE="${TMPDIR:-/tmp}/gptoss-ci-cache"
log="${TMPDIR:-/tmp}/gptoss-serve-ci.log"

"$bin" serve --host 127.0.0.1 --port "$port" --api-key "$key" --device cpu >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "server exited early:"; cat "$log"; exit 1; fi
  sleep 0.5
done

OPENAI_API_KEY="$key" "$venv/bin/python" scripts/openai_client_test.py \
  --base-url "http://127.0.0.1:$port/v1" --api-key "$key"
