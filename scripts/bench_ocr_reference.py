#!/usr/bin/env python3
"""The reference OCR engines on the same images as `natter-worker bench-ocr`.

    bench_ocr_reference.py rapidocr SAMPLES RUNS [MODEL_DIR]   RapidOCR (onnxruntime);
        with MODEL_DIR (natter's ppocr-v5 directory) it runs the PP-OCRv5 networks
        natter runs, else the PP-OCRv4 ones bundled with rapidocr-onnxruntime.
    bench_ocr_reference.py tesseract SAMPLES RUNS              Tesseract 5 (eng, --psm 3)

Prints one JSON object per image: image, ms (mean of RUNS after a warm-up), cer, text.
The CER is computed exactly as natter's bench does it (whitespace runs count as one space).
"""
import json
import os
import subprocess
import sys
import tempfile
import time


def cer(expected, got):
    a = " ".join(expected.split())
    b = " ".join(got.split())
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        diagonal, row[0] = row[0], i
        for j in range(1, len(b) + 1):
            substitution = diagonal + (a[i - 1] != b[j - 1])
            diagonal = row[j]
            row[j] = min(substitution, row[j] + 1, row[j - 1] + 1)
    return row[len(b)] / max(len(a), 1)


def rapidocr_reader(model_dir):
    from rapidocr_onnxruntime import RapidOCR

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    # Detection on the same image size as natter (longer side at most 960);
    # RapidOCR's default scales the shorter side up to 736 instead.
    kwargs = {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "det_limit_side_len": 960,
        "det_limit_type": "max",
    }
    if model_dir:
        # natter's keys.txt has the CTC blank first and the space last;
        # RapidOCR adds both itself.
        keys = open(os.path.join(model_dir, "keys.txt"), encoding="utf-8").read().split("\n")
        if keys and keys[-1] == "":
            keys.pop()
        stripped = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
        stripped.write("\n".join(keys[1:-1]) + "\n")
        stripped.close()
        kwargs.update(
            det_model_path=os.path.join(model_dir, "det.onnx"),
            rec_model_path=os.path.join(model_dir, "rec.onnx"),
            rec_keys_path=stripped.name,
        )
    engine = RapidOCR(**kwargs)

    def read(path):
        result, _ = engine(path)
        return "\n".join(line[1] for line in (result or []))

    return read


def tesseract_read(path):
    out = subprocess.run(["tesseract", path, "-", "-l", "eng", "--psm", "3"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main():
    engine, samples, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    read = rapidocr_reader(sys.argv[4] if len(sys.argv) > 4 else None) if engine == "rapidocr" else tesseract_read
    for name in sorted(os.listdir(samples)):
        if not name.endswith((".png", ".jpg")):
            continue
        path = os.path.join(samples, name)
        expected = open(os.path.splitext(path)[0] + ".txt", encoding="utf-8").read()
        text = read(path)
        started = time.perf_counter()
        for _ in range(runs):
            read(path)
        ms = (time.perf_counter() - started) * 1e3 / runs
        print(json.dumps({"image": name, "ms": ms, "cer": cer(expected, text), "text": text}), flush=True)


if __name__ == "__main__":
    main()
