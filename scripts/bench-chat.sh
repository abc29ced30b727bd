#!/usr/bin/env bash
# Chat speed, natter beside llama.cpp on the same GGUF files and thread count:
# prompt processing (512 tokens) and decoding (128 tokens) single-stream, decode
# speed at context depths 100 and 2000, and 8 concurrent streams (aggregate
# decode, time to first token of a request arriving while 7 stream) against
# llama-server with 8 parallel slots. llama.cpp is built once from the
# llama-cpp-python source distribution, which vendors it, into the cache outside
# this tree (about 10 minutes on 2 cores).
# Usage: scripts/bench-chat.sh [THREADS] [MODEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"
threads="${1:-2}"
shift || true
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(smollm2-135m-instruct qwen2-5-coder-0-5b-instruct)

llama="$CACHE/llama.cpp"
version=0.3.36
if [[ ! -x "$llama/build/bin/llama-bench" || ! -x "$llama/build/bin/llama-server" ]]; then
  command -v cmake >/dev/null || { apt-get install -y -qq cmake || python3 -m pip install -q cmake; hash -r; }
  mkdir -p "$llama/src"
  # The sdist only: `--no-binary :all:` would try to build cmake from source too.
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$llama/src"
  tar -xzf "$llama/src/llama_cpp_python-$version.tar.gz" -C "$llama/src"
  cmake -S "$llama/src/llama_cpp_python-$version/vendor/llama.cpp" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  cmake --build "$llama/build" -j"$(nproc)" --target llama-bench llama-server
fi

cargo build -q --release -p natter-worker
worker="$CARGO_TARGET_DIR/release/natter-worker"
port=18089
for model in "${models[@]}"; do
  "$worker" models fetch "$model" >/dev/null
  file="$("$worker" models path "$model")"
  echo "== $model ($file), $threads threads"
  echo "-- natter"
  "$worker" bench --model "$model" --threads "$threads" --prompt-tokens 512 --gen-tokens 128 --runs 3 \
    --depths 100,2000 --streams 8
  echo "-- llama.cpp $version (llama-bench: pp512 and tg128, 3 runs; tg32 at depths 100 and 2000)"
  "$llama/build/bin/llama-bench" -m "$file" -t "$threads" -p 512 -n 128 -r 3 -o md
  "$llama/build/bin/llama-bench" -m "$file" -t "$threads" -p 0 -n 32 -d 100,2000 -r 2 -o md
  echo "-- llama.cpp $version (llama-server, 8 parallel slots, continuous batching)"
  "$llama/build/bin/llama-server" -m "$file" -t "$threads" -tb "$threads" -np 8 -c 16384 \
    --host 127.0.0.1 --port "$port" >/tmp/natter-llama-server.log 2>&1 &
  server=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    kill -0 "$server" || { cat /tmp/natter-llama-server.log; exit 1; }
    sleep 0.5
  done
  python3 scripts/bench_chat_server.py --url "http://127.0.0.1:$port" --pid "$server" --streams 8 --gen 128
  kill "$server"; wait "$server" 2>/dev/null || true
done
