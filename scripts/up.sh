#!/usr/bin/env bash
# Brings natter up on one machine: nats-server with JetStream (data under ./data)
# unless NATS_URL points elsewhere, the default model, one worker and the
# dashboard. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/env.sh
export NATTER_HTTP_ADDR="${NATTER_HTTP_ADDR:-127.0.0.1:8080}"

scripts/install-deps.sh
echo "building natter (release; the first build takes a few minutes)"
cargo build --release --workspace --bins
bin="$CARGO_TARGET_DIR/release"

pids=()
cleanup() { trap - EXIT INT TERM; for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [[ -z "${NATS_URL:-}" ]]; then
  mkdir -p data/nats
  nats-server -a 127.0.0.1 -p 4222 -js -sd data/nats >data/nats-server.log 2>&1 &
  pids+=($!)
  export NATS_URL="nats://127.0.0.1:4222"
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
  echo "nats-server with JetStream on $NATS_URL (data in ./data/nats)"
fi

"$bin/natter-worker" models fetch
"$bin/natter-worker" &
pids+=($!)
"$bin/natter-bots" &
pids+=($!)
echo
echo "natter is up: open http://$NATTER_HTTP_ADDR/  (OpenAI API at http://$NATTER_HTTP_ADDR/v1)"
echo "Ctrl-C stops it."
wait -n "${pids[@]}"
