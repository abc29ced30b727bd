"""The onnxruntime side of the NER benchmark: the original ONNX model on the same
texts, windows and thread count as `natter-worker bench-ner`.

    python3 scripts/bench_ner_onnxruntime.py MODEL_DIR THREADS TOKENS,TOKENS,... RUNS
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

SENTENCE = "Maria Gonzalez moved from 42 Oak Street in Springfield to Boston; write to maria.gonzalez@example.com or call 555-0134. "

model_dir, threads, lengths, runs = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4])
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
session = ort.InferenceSession(f"{model_dir}/model_q4.onnx", opts, providers=["CPUExecutionProvider"])
cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")


def windows(n, size=510, overlap=127):
    start, out = 0, []
    while True:
        end = min(start + size, n)
        out.append((start, end))
        if end >= n:
            return out
        start += size - overlap


def run(ids):
    for start, end in windows(len(ids)):
        arr = np.array([[cls] + ids[start:end] + [sep]], dtype=np.int64)
        session.run(["logits"], {"input_ids": arr, "attention_mask": np.ones_like(arr), "token_type_ids": np.zeros_like(arr)})


print(f"onnxruntime {ort.__version__}, {threads} threads, {runs} runs after one warm-up")
print("| tokens | mean latency ms | texts/s |")
print("|---:|---:|---:|")
for target in lengths:
    text = ""
    while count(text) < target:
        text += SENTENCE
    words = text.split(" ")
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(" ".join(words[:mid])) < target:
            lo = mid + 1
        else:
            hi = mid
    text = " ".join(words[:lo])
    ids = tok.encode(text, add_special_tokens=False).ids
    run(ids)
    started = time.perf_counter()
    for _ in range(runs):
        tok.encode(text, add_special_tokens=False)
        run(ids)
    mean = (time.perf_counter() - started) / runs
    print(f"| {len(ids)} | {mean * 1e3:.1f} | {1 / mean:.1f} |")
