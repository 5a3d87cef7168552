"""Added latency on a miss: the gateway's own time before the response starts (x-tureen-overhead-duration-ms,
which excludes the upstream's time), cache off vs exact+semantic, requests interleaved one at a time.
Every question is new (a unique number), so both tiers miss; the semantic tier still embeds, searches, verifies."""
import json, statistics, sys, time
import httpx
from tureen.gateway.cache.calibrate import read_pairs, shipped_pairs

ports = dict(zip(("off", "exact", "both"), sys.argv[2:5] if len(sys.argv) > 4 else (4201, 4202, 4203)))
texts = [p["a"] for p in read_pairs(shipped_pairs())] + [p["b"] for p in read_pairs(shipped_pairs())]
n = int(sys.argv[1]) if len(sys.argv) > 1 else 150
RUN = int(time.time())
got = {k: [] for k in ports}
ttft = {k: [] for k in ports}
with httpx.Client(timeout=60) as c:
    for i in range(n):
        for name, port in ports.items():
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"{texts[i % len(texts)]} (case {i}, run {RUN})"}],
                    "temperature": 0, "max_tokens": 4}
            t = time.perf_counter()
            r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
            ttft[name].append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200 and r.headers.get("x-tureen-cache", "miss") == "miss", (r.status_code, r.text[:200])
            got[name].append(float(r.headers["x-tureen-overhead-duration-ms"]))
out = {k: {"p50_overhead_ms": statistics.median(v), "p90_overhead_ms": sorted(v)[int(0.9 * len(v))],
           "p50_total_ms": statistics.median(ttft[k])} for k, v in got.items()}
print(json.dumps(out, indent=1))
for k in ("exact", "both"):
    print(f"added p50 on a miss, {k} vs off: {out[k]['p50_overhead_ms'] - out['off']['p50_overhead_ms']:.2f} ms")
