#!/usr/bin/env python3
"""llama.cpp's llama-server under the load natter-worker's chat bench applies:
N streams at once (aggregate decode tokens/s once every stream has its first
token), and the time to first token of a request arriving while N-1 others
stream, beside the same request alone. Prints one markdown row.

Usage: bench_chat_server.py --url http://127.0.0.1:18089 --pid PID [--streams 8]
"""
import argparse
import json
import threading
import time
import urllib.request

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "


def stream(url, prompt, n_predict, record):
    body = json.dumps({
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
        "stream": True,
    }).encode()
    request = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type": "application/json"})
    record["sent"] = time.monotonic()
    with urllib.request.urlopen(request) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") and "first" not in record:
                record["first"] = time.monotonic()
            if event.get("stop"):
                record["done"] = time.monotonic()
                record["predicted"] = event.get("timings", {}).get("predicted_n", n_predict)
                record["prompt_n"] = event.get("timings", {}).get("prompt_n")


def run_all(url, prompt, n_predict, count):
    records = [{} for _ in range(count)]
    threads = [threading.Thread(target=stream, args=(url, prompt, n_predict, r)) for r in records]
    for t in threads:
        t.start()
    return records, threads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="sentences in the prompt (about 14 tokens each)")
    parser.add_argument("--gen", type=int, default=128)
    args = parser.parse_args()
    prompt = SENTENCE * args.repeat

    idle = {}
    stream(args.url, prompt, args.gen, idle)
    idle_ttft = (idle["first"] - idle["sent"]) * 1e3

    records, threads = run_all(args.url, prompt, args.gen, args.streams)
    for t in threads:
        t.join()
    all_first = max(r["first"] for r in records)
    last = max(r["done"] for r in records)
    generated = sum(r["predicted"] for r in records)
    started = min(r["sent"] for r in records)
    aggregate = (generated - args.streams) / (last - all_first)
    whole = generated / (last - started)

    busy, busy_threads = run_all(args.url, prompt, args.gen * 2, args.streams - 1)
    while not all("first" in r for r in busy):
        time.sleep(0.01)
    time.sleep(0.3)
    late = {}
    stream(args.url, prompt, 8, late)
    loaded_ttft = (late["first"] - late["sent"]) * 1e3
    for t in busy_threads:
        t.join()

    with open(f"/proc/{args.pid}/status") as status:
        rss = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
    print(f"| streams | prompt tokens each | generated | aggregate tok/s (whole run) | aggregate decode tok/s "
          f"| TTFT idle ms | TTFT with {args.streams - 1} streaming ms | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.streams} | {idle.get('prompt_n')} | {generated} | {whole:.1f} | {aggregate:.1f} "
          f"| {idle_ttft:.1f} | {loaded_ttft:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
