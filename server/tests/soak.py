#!/usr/bin/env python3
"""Soak test for `purehw serve` (run by hand, not in CI: it takes minutes).

N clients loop chat requests for DURATION seconds; every fourth request is streamed and dropped
mid-stream (the client closes the connection after a few chunks). The server's RSS is sampled
from /proc after a warm-up and at the end; the run fails if any response was an error other than
the provoked disconnects, or if the final RSS is more than 10% above the warm-up RSS.

    python3 server/tests/soak.py --base-url http://127.0.0.1:8006 --pid $(pidof purehw) \
        --clients 8 --duration 600
"""

import argparse
import http.client
import json
import random
import sys
import threading
import time
from urllib.parse import urlparse


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a prime number is in two sentences.",
    "List three fruits.",
    "What is the capital of France?",
    "Tell me a very short story about a robot.",
    "Translate 'good morning' into Spanish and French.",
]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.dropped = 0
        self.errors = []
        self.tokens = 0

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                if k == "error":
                    self.errors.append(v)
                else:
                    setattr(self, k, getattr(self, k) + v)


def client(idx, args, stop_at, stats):
    u = urlparse(args.base_url)
    rng = random.Random(idx)
    n = 0
    while time.time() < stop_at:
        n += 1
        drop = n % 4 == 0
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(8, 64),
            "temperature": rng.choice([0, 0.7]),
            "stream": drop or rng.random() < 0.5,
        }
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                stats.add(error=f"client {idx}: HTTP {r.status}: {r.read()[:300]!r}")
                continue
            if body["stream"]:
                chunks = 0
                for line in r:
                    if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                        chunks += 1
                        if drop and chunks >= 3:
                            break
                if drop:
                    stats.add(dropped=1)
                else:
                    stats.add(ok=1, tokens=chunks)
            else:
                v = json.loads(r.read())
                stats.add(ok=1, tokens=v["usage"]["completion_tokens"])
        except Exception as e:  # noqa: BLE001 - any failure is a soak failure
            stats.add(error=f"client {idx}: {type(e).__name__}: {e}")
        finally:
            conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8006")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--warmup", type=float, default=60)
    args = ap.parse_args()

    stats = Stats()
    t0 = time.time()
    stop_at = t0 + args.duration
    threads = [threading.Thread(target=client, args=(i, args, stop_at, stats), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    rss_warm = rss_bytes(args.pid)
    peak = rss_warm
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        peak = max(peak, rss_bytes(args.pid))
    rss_end = rss_bytes(args.pid)
    growth = (rss_end - rss_warm) / rss_warm
    print(
        f"soak: {time.time() - t0:.0f} s, {args.clients} clients, {stats.ok} ok, {stats.dropped} dropped on purpose, "
        f"{len(stats.errors)} errors, {stats.tokens} tokens; RSS after warm-up {rss_warm / 2**20:.1f} MiB, "
        f"peak {peak / 2**20:.1f} MiB, end {rss_end / 2**20:.1f} MiB ({100 * growth:+.1f}%)"
    )
    for e in stats.errors[:20]:
        print("  ", e)
    if stats.errors or growth > 0.10:
        sys.exit(1)


if __name__ == "__main__":
    main()
