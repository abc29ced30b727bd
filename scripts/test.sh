#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, fetches
# the real default model (cached), and runs every test against a real nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${NATTER_CACHE:-$HOME/.cache/natter}"
# Build outputs and models live outside the clone, so a fresh clone reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"
export PATH="$PATH:$CACHE/bin"

scripts/install-deps.sh --test
cargo build --workspace --bins
"$CARGO_TARGET_DIR/debug/natter-worker" models fetch
cargo test --workspace -- --test-threads 2
