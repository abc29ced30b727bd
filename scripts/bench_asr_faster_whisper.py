"""faster-whisper (CTranslate2) on the same model.bin, files and thread count as
`natter-worker bench-asr`, with the same decoding: greedy, temperature fallback,
no-speech and compression-ratio checks, timestamps on.

Usage: python3 scripts/bench_asr_faster_whisper.py MODEL_DIR THREADS RUNS FILE...
MODEL_DIR is natter's converted directory; its model.bin and the original
CTranslate2 config (ctranslate2.json) are what faster-whisper loads.
"""
import os
import sys
import tempfile
import time

from faster_whisper import WhisperModel

model_dir, threads, runs, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

# faster-whisper wants model.bin + its own config.json side by side.
ct2 = tempfile.mkdtemp()
os.symlink(os.path.join(model_dir, "model.bin"), os.path.join(ct2, "model.bin"))
os.symlink(os.path.join(model_dir, "ctranslate2.json"), os.path.join(ct2, "config.json"))
for name in ("tokenizer.json", "vocabulary.txt"):
    os.symlink(os.path.join(model_dir, name), os.path.join(ct2, name))
model = WhisperModel(ct2, device="cpu", compute_type="default", cpu_threads=threads, num_workers=1)


def transcribe(path):
    started = time.perf_counter()
    segments, info = model.transcribe(path, beam_size=1, best_of=1, vad_filter=False)
    text = " ".join(s.text.strip() for s in segments)
    return time.perf_counter() - started, info, text


transcribe(files[0])
print(f"faster-whisper {model_dir}, {threads} threads, compute type {model.model.compute_type}, best of {runs} runs")
print("| file | audio s | wall s | real-time factor | language | transcript |")
print("|---|---:|---:|---:|---|---|")
for path in files:
    wall, info, text = min((transcribe(path) for _ in range(runs)), key=lambda r: r[0])
    short = text if len(text) <= 80 else text[:77] + "..."
    print(f"| {os.path.basename(path)} | {info.duration:.1f} | {wall:.2f} | {wall / info.duration:.3f} | {info.language} | {short} |")
