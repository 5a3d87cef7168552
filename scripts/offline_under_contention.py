"""Offline decode speed of the demo model with and without a competing process that keeps a
quarter of one core busy (0.5 ms busy in every 2 ms), as an API server or a load generator does.
It shows what a kernel's thread schedule costs when a core is taken away mid-step.

Usage: python scripts/offline_under_contention.py [--hog] [LABEL]
Prints: LABEL batch1 <best of 3, 256 tokens> tok/s  batch32 <64 requests, 128 in / 128 out> tok/s.
"""
import multiprocessing as mp
import sys
import time


def hog() -> None:
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.0005:
            pass
        time.sleep(0.0015)


def measure() -> tuple[float, float]:
    from tureen import LLM, SamplingParams

    llm = LLM(max_num_seqs=32)
    llm.generate([[5, 6, 7, 8] * 16], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    one = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        llm.generate([[9, 10, 11] * 20], one, use_tqdm=False)
        best = max(best, 256 / (time.perf_counter() - t))
    prompts = [[(i * 7 + j) % 8000 + 10 for j in range(128)] for i in range(64)]
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)
    return best, 64 * 128 / (time.perf_counter() - t)


if __name__ == "__main__":
    args = sys.argv[1:]
    with_hog = "--hog" in args
    label = " ".join(a for a in args if a != "--hog") or ("with hog" if with_hog else "idle")
    proc = mp.Process(target=hog, daemon=True) if with_hog else None
    if proc:
        proc.start()
    try:
        batch1, batch32 = measure()
    finally:
        if proc:
            proc.terminate()
    print(f"{label} batch1 {batch1:.0f} tok/s  batch32 {batch32:.0f} tok/s", flush=True)
