#!/usr/bin/env bash
# Speech-to-text speed: natter (candle) beside faster-whisper (CTranslate2) running
# the very same model.bin on the same audio with the same threads.
# Usage: scripts/bench-asr.sh [THREADS] [MODEL]   (default: 2 threads, whisper-base)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"
threads="${1:-2}"
model="${2:-whisper-base}"
python3 -c "import faster_whisper" 2>/dev/null || python3 -m pip install -q faster-whisper
command -v espeak-ng >/dev/null && command -v ffmpeg >/dev/null || scripts/install-deps.sh --test
cargo build -q --release -p natter-worker
worker="$CARGO_TARGET_DIR/release/natter-worker"
"$worker" models fetch "$model" >/dev/null

audio="$CACHE/bench-audio"
mkdir -p "$audio"
if [[ ! -f "$audio/clip-2min.ogg" ]]; then
  espeak-ng -v en-us -s 135 -g 3 -w "$audio/sentences.wav" \
    "Good morning everyone. Thank you for coming to the meeting today. We need to finish the project before the end of the month. Please send me your report by Friday."
  ffmpeg -y -loglevel error -i "$audio/sentences.wav" -c:a libopus -b:a 32k "$audio/voice-14s.ogg"
  paragraph="The library opens at nine in the morning and closes at six in the evening. Children can borrow up to five books at a time. The reading room on the second floor is quiet, and there are tables near the windows. On Saturdays there is a story hour for young readers. "
  espeak-ng -v en-us -s 135 -g 3 -w "$audio/long.wav" "$(for _ in 1 2 3 4 5 6; do printf '%s' "$paragraph"; done)"
  ffmpeg -y -loglevel error -i "$audio/long.wav" -c:a libopus -b:a 32k "$audio/clip-2min.ogg"
  rm -f "$audio/sentences.wav" "$audio/long.wav"
fi
files=("$audio/voice-14s.ogg" "$audio/clip-2min.ogg")

echo "== natter (candle)"
natter_out=$(RUST_LOG=warn "$worker" bench-asr --model "$model" --threads "$threads" --runs 2 "${files[@]}" 2>/dev/null)
echo "$natter_out"
echo "== faster-whisper (CTranslate2)"
fw_out=$(OMP_NUM_THREADS="$threads" python3 scripts/bench_asr_faster_whisper.py "$("$worker" models path "$model")" "$threads" 2 "${files[@]}")
echo "$fw_out"
echo "== real-time factor, natter / faster-whisper (below 1: natter is faster)"
paste <(echo "$natter_out" | awk -F'|' '/\| [a-z0-9-]+\.(ogg|wav)/ {print $2, $5}') \
      <(echo "$fw_out" | awk -F'|' '/\| [a-z0-9-]+\.(ogg|wav)/ {print $5}') |
  awk '{printf "%-18s natter %.3f  faster-whisper %.3f  ratio %.2f\n", $1, $2, $3, $2/$3}'
