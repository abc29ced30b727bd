#!/usr/bin/env bash
# OCR latency and accuracy: natter (tract) beside RapidOCR (onnxruntime) running
# the same PP-OCR networks, and Tesseract 5, on the rendered test images.
# Usage: scripts/bench-ocr.sh [THREADS] [RUNS]   (default: 2 threads, 5 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"
threads="${1:-2}"
runs="${2:-5}"
python3 -c "import rapidocr_onnxruntime" 2>/dev/null || python3 -m pip install -q rapidocr-onnxruntime==1.4.4
if ! command -v tesseract >/dev/null; then
  root=""; [[ $(id -u) -eq 0 ]] || root=sudo
  $root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $root apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null
fi
scripts/install-deps.sh --test >/dev/null
cargo build -q --release -p natter-worker
cargo build -q --release -p natter-worker --features testkit --example ocr_samples
worker="$CARGO_TARGET_DIR/release/natter-worker"
"$worker" models fetch ppocr-v5 ppocr-v4 >/dev/null

samples="$CACHE/bench-ocr"
"$CARGO_TARGET_DIR/release/examples/ocr_samples" "$samples" >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for model in ppocr-v5 ppocr-v4; do
  RUST_LOG=warn "$worker" bench-ocr --model "$model" --threads "$threads" --runs "$runs" --json "$samples" >"$out/natter-$model"
done
BENCH_THREADS="$threads" python3 scripts/bench_ocr_reference.py rapidocr "$samples" "$runs" "$("$worker" models path ppocr-v5)" >"$out/rapidocr-ppocr-v5"
BENCH_THREADS="$threads" python3 scripts/bench_ocr_reference.py rapidocr "$samples" "$runs" >"$out/rapidocr-ppocr-v4"
OMP_THREAD_LIMIT="$threads" python3 scripts/bench_ocr_reference.py tesseract "$samples" "$runs" >"$out/tesseract"

python3 - "$out" "$threads" <<'PY'
import json, os, sys
out, threads = sys.argv[1], sys.argv[2]
load = lambda name: {r["image"]: r for r in map(json.loads, open(os.path.join(out, name)))}
runs = {name: load(name) for name in os.listdir(out)}
images = sorted(runs["tesseract"])
print(f"OCR, {threads} threads, mean latency per image (ms) and character error rate")
for model in ["ppocr-v5", "ppocr-v4"]:
    natter, rapid, tess = runs[f"natter-{model}"], runs[f"rapidocr-{model}"], runs["tesseract"]
    print(f"\n{model}: natter (tract) vs RapidOCR (onnxruntime, same networks) vs Tesseract 5")
    print("| image | natter ms | RapidOCR ms | Tesseract ms | natter/RapidOCR | natter/Tesseract | natter CER | RapidOCR CER | Tesseract CER |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    tot = [0.0, 0.0, 0.0]
    for image in images:
        n, r, t = natter[image], rapid[image], tess[image]
        tot = [tot[0] + n["ms"], tot[1] + r["ms"], tot[2] + t["ms"]]
        print(f"| {image} | {n['ms']:.0f} | {r['ms']:.0f} | {t['ms']:.0f} | {n['ms']/r['ms']:.2f} | {n['ms']/t['ms']:.2f} "
              f"| {n['cer']*100:.1f}% | {r['cer']*100:.1f}% | {t['cer']*100:.1f}% |")
    mean = lambda run: sum(run[i]["cer"] for i in images) / len(images) * 100
    print(f"| all | {tot[0]:.0f} | {tot[1]:.0f} | {tot[2]:.0f} | {tot[0]/tot[1]:.2f} | {tot[0]/tot[2]:.2f} "
          f"| {mean(natter):.1f}% | {mean(rapid):.1f}% | {mean(tess):.1f}% |")
PY
