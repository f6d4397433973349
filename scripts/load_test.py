#!/usr/bin/env python3
"""Load test for a running `gptoss serve` (standard library only, so it runs anywhere).

N concurrent clients each send streaming /v1/completions requests (raw prompt, fixed
max_tokens) for a fixed number of rounds; the script reports requests/s, generated tokens/s,
time to first token (p50/p99) and inter-token latency, then reads the KV block gauges from
/metrics to check that every block was returned. Loopback only.

    python3 scripts/load_test.py --base-url http://127.0.0.1:8000 --clients 64 --rounds 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def one_request(url, model, prompt, max_tokens, api_key):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "temperature": 0})
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
            times.append(time.perf_counter())
    conn.close()
    if not times:
        raise RuntimeError("no tokens streamed")
    ttft = times[0] - t0
    itl = [b - a for a, b in zip(times, times[1:])]
    return ttft, itl, len(times), times[-1] - t0


def metrics(url):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        out[name] = value
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="The history of the printing press begins")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    model = a.model
    if model is None:
        u = urllib.parse.urlparse(a.base_url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]

    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(a.rounds):
            try:
                res = one_request(a.base_url, model, f"{a.prompt} ({i}.{r})", a.max_tokens, a.api_key)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(0.5)
    m = metrics(a.base_url)
    used = {k: v for k, v in m.items() if "kv_blocks_used" in k}

    ttfts = [r[0] for r in results]
    itls = [x for r in results for x in r[1]]
    tokens = sum(r[2] for r in results)
    summary = {
        "clients": a.clients, "requests": len(results), "errors": len(errors),
        "wall_s": round(wall, 3), "requests_per_s": round(len(results) / wall, 2),
        "generated_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
        "itl_p50_ms": round(1000 * percentile(itls, 50), 2), "itl_p99_ms": round(1000 * percentile(itls, 99), 2),
        "kv_blocks_used_after": used,
    }
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        for k, v in summary.items():
            print(f"{k:>24}: {v}")
        for e in errors[:5]:
            print("error:", e)
    ok = not errors and all(float(v) == 0 for v in used.values())
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
