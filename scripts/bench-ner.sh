#!/usr/bin/env bash
# NER speed, natter (candle) beside onnxruntime on the original ONNX model, same
# texts, windows and threads. Usage: scripts/bench-ner.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"
threads="${1:-2}"
python3 -c "import onnxruntime, tokenizers" 2>/dev/null || python3 -m pip install -q onnxruntime tokenizers
cargo build -q --release -p natter-worker
"$CARGO_TARGET_DIR/release/natter-worker" models fetch rampart-pii >/dev/null
echo "== natter (candle)"
"$CARGO_TARGET_DIR/release/natter-worker" bench-ner --threads "$threads"
echo "== onnxruntime"
OMP_NUM_THREADS="$threads" python3 scripts/bench_ner_onnxruntime.py "$NATTER_MODELS_DIR/rampart-pii" "$threads" 64,256,1024 20
