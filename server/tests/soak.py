#!/usr/bin/env python3
"""A soak of `purehw serve`: N clients for a while, some disconnecting mid-stream; host RSS and
device memory must stay flat (within ±5% of their level after warm-up).

    python3 server/tests/soak.py --base-url http://127.0.0.1:8006/v1 --model smollm2-135m \\
        --pid $(pgrep -f 'purehw serve') --seconds 600 --clients 8

Prints one line per sample and a summary; exits 1 when memory grew (or shrank) past the bound or
a request failed in a way a well-behaved server must not (5xx, broken JSON).
"""

import argparse
import http.client
import json
import random
import re
import sys
import threading
import time
import urllib.parse


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def device_bytes(root):
    """Sum of purehw_device_memory_used_bytes over devices, None when the server has no such metric."""
    u = urllib.parse.urlparse(root)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    vals = [float(m.group(1)) for m in re.finditer(r"^purehw_device_memory_used_bytes(?:\{[^}]*\})? (\S+)$", text, re.M)]
    return sum(vals) if vals else None


class Client(threading.Thread):
    def __init__(self, i, args, stop, errors, counts):
        super().__init__(daemon=True)
        self.i, self.args, self.stop, self.errors, self.counts = i, args, stop, errors, counts
        self.rng = random.Random(1000 + i)

    def run(self):
        u = urllib.parse.urlparse(self.args.base_url)
        while not self.stop.is_set():
            stream = self.rng.random() < 0.7
            drop = stream and self.rng.random() < 0.3
            body = {
                "model": self.args.model,
                "messages": [{"role": "user", "content": f"Tell me about the number {self.rng.randint(1, 10**6)}."}],
                "max_tokens": self.rng.randint(4, self.args.max_tokens),
                "temperature": self.rng.choice([0, 0.7]),
                "stream": stream,
            }
            try:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
                conn.request("POST", u.path.rstrip("/") + "/chat/completions", json.dumps(body),
                             {"Content-Type": "application/json", "Authorization": "Bearer soak"})
                r = conn.getresponse()
                if r.status == 429:  # queue full: fine, try again
                    r.read()
                    self.counts["busy"] += 1
                    time.sleep(0.2)
                    continue
                if r.status != 200:
                    self.errors.append(f"client {self.i}: HTTP {r.status}: {r.read()[:300]!r}")
                    continue
                if drop:
                    # Read a few chunks, then hang up mid-stream.
                    for _ in range(self.rng.randint(1, 4)):
                        if not r.fp.readline():
                            break
                    conn.close()
                    self.counts["dropped"] += 1
                    continue
                data = r.read().decode()
                if not stream:
                    json.loads(data)
                elif "data: [DONE]" not in data:
                    self.errors.append(f"client {self.i}: stream without [DONE]")
                self.counts["done"] += 1
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.errors.append(f"client {self.i}: {type(e).__name__}: {e}")
            finally:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pid", type=int, required=True, help="the server's process id (for its RSS)")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before the baseline")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()
    root = re.sub(r"/v1/?$", "", args.base_url)
    stop = threading.Event()
    errors = []
    counts = {"done": 0, "dropped": 0, "busy": 0}
    clients = [Client(i, args, stop, errors, counts) for i in range(args.clients)]
    for c in clients:
        c.start()
    t0 = time.time()
    samples = []
    every = max(2.0, args.seconds / 60)
    while time.time() - t0 < args.seconds:
        time.sleep(every)
        t = time.time() - t0
        s = (t, rss_bytes(args.pid), device_bytes(root))
        samples.append(s)
        dev = "-" if s[2] is None else f"{s[2] / 2**20:.1f} MiB"
        print(f"t={t:6.0f}s rss={s[1] / 2**20:.1f} MiB device={dev} done={counts['done']} "
              f"dropped={counts['dropped']} busy={counts['busy']} errors={len(errors)}", flush=True)
    stop.set()
    for c in clients:
        c.join(timeout=330)
    ok = not errors
    for e in errors[:10]:
        print("ERROR", e)
    base = [s for s in samples if s[0] >= args.warmup * args.seconds]
    for k, name in [(1, "host RSS"), (2, "device memory")]:
        vals = [s[k] for s in base if s[k] is not None]
        if not vals:
            print(f"{name}: not reported")
            continue
        ref = vals[0]
        lo, hi = min(vals), max(vals)
        spread = max(hi / ref - 1, 1 - lo / ref)
        flat = spread <= args.tolerance
        ok &= flat
        print(f"{name}: after warm-up {ref / 2**20:.1f} MiB, range {lo / 2**20:.1f}-{hi / 2**20:.1f} MiB "
              f"({100 * spread:.1f}% of the first; bound {100 * args.tolerance:.0f}%): {'flat' if flat else 'NOT FLAT'}")
    print(f"requests: {counts['done']} completed, {counts['dropped']} dropped mid-stream, {counts['busy']} turned away (429)")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
