#!/usr/bin/env python3
"""Batching through `purehw serve`, with nothing but the standard library (for machines without
the openai SDK): one streamed completion alone, then N at once; prints both rates and the
aggregate speed-up, and checks that the greedy text of the first prompt is the same alone and in
the batch.

    python3 server/tests/streams.py --base-url http://127.0.0.1:8006/v1 --model gemma3-270m --streams 16
"""

import argparse
import http.client
import json
import sys
import multiprocessing as mp
import time
import urllib.parse

TOPICS = ["the ocean", "mountains", "a city at night", "a robot", "the moon", "a forest", "a train journey",
          "winter", "a lighthouse", "the desert", "a library", "a storm", "a garden", "an old ship", "a market",
          "the stars", "a bridge", "a volcano", "a violin", "a snowy village"]


def stream(base, model, prompt, max_tokens, out, i):
    u = urllib.parse.urlparse(base)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t = time.time()
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        conn.request("POST", u.path.rstrip("/") + "/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out[i] = {"error": f"HTTP {r.status}: {r.read()[:300]!r}"}
            return
        text, tokens, first = [], 0, None
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for c in ev.get("choices", []):
                if c.get("text"):
                    first = first or time.time()
                    text.append(c["text"])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
        out[i] = {"text": "".join(text), "tokens": tokens, "secs": time.time() - t, "ttft": (first or time.time()) - t}
    except (OSError, http.client.HTTPException, ValueError) as e:
        out[i] = {"error": f"{type(e).__name__}: {e}"}


def stream_proc(base, model, prompt, max_tokens, go, q, i):
    """`stream` in a child process: waits for `go`, then puts (i, result) on `q`."""
    out = [None]
    go.wait()
    stream(base, model, prompt, max_tokens, out, 0)
    q.put((i, out[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--min-speedup", type=float, default=0.0)
    args = ap.parse_args()
    prompts = [f"Here is a long, detailed story about {TOPICS[i % len(TOPICS)]}. It begins:" for i in range(args.streams)]
    warm = [None]
    stream(args.base_url, args.model, "Hello", 4, warm, 0)
    alone = [None]
    stream(args.base_url, args.model, prompts[0], args.max_tokens, alone, 0)
    a = alone[0]
    if "error" in a:
        print("FAIL single request:", a["error"])
        sys.exit(1)
    single = a["tokens"] / a["secs"]
    res = [None] * args.streams
    ctx = mp.get_context("fork")
    go, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=stream_proc, args=(args.base_url, args.model, p, args.max_tokens, go, q, i))
             for i, p in enumerate(prompts)]
    for x in procs:
        x.start()
    time.sleep(0.5)
    t = time.time()
    go.set()
    for _ in procs:
        i, r = q.get()
        res[i] = r
    for x in procs:
        x.join()
    wall = time.time() - t
    errors = [r["error"] for r in res if "error" in r]
    if errors:
        print("FAIL concurrent requests:", errors[:3])
        sys.exit(1)
    total = sum(r["tokens"] for r in res)
    agg = total / wall
    print(f"one request alone: {a['tokens']} tokens in {a['secs']:.3f} s = {single:.1f} tok/s (first token {a['ttft'] * 1e3:.1f} ms)")
    print(f"{args.streams} at once: {total} tokens in {wall:.3f} s = {agg:.1f} tok/s aggregate")
    print(f"speed-up: {agg / single:.2f}x")
    same = res[0]["text"] == a["text"]
    print("greedy text alone == in the batch:", same)
    ok = same and agg / single >= args.min_speedup
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
