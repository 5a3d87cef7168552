"""fp8 weights on CPU: the int8 GEMM on requantized weights against the float32 GEMM on dequantized ones.

Usage: python scripts/bench_fp8_cpu_path.py   (one thread; the demo model's layer shapes; random weights)

Prints the relative weight error of each path against the float weights and the time of one pass
over the demo model's qkv / o / gate_up / down projections at 1 and 32 rows (median of 15 runs,
the two paths interleaved so that a busy machine slows both alike). The README quotes it.
"""

from __future__ import annotations

import statistics
import time

import torch

from tureen.executor.cpu_kernels import load_cpu_ops
from tureen.executor.quantization.weights import fp8_to_int8, quantize_fp8

SHAPES = [(640, 384), (384, 384), (2048, 384), (384, 1024)]  # demo model: qkv, o, gate_up, down (N, K)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ops = load_cpu_ops("on", torch.device("cpu"), torch.float32, 64)
    layers, err = [], {"fp8": 0.0, "fp8->int8": 0.0, "norm": 0.0}
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        f8 = quantize_fp8(w)
        i8 = fp8_to_int8(f8)
        err["fp8"] += float(((f8.dequantize() - w) ** 2).sum())
        err["fp8->int8"] += float(((i8.dequantize() - w) ** 2).sum())
        err["norm"] += float((w ** 2).sum())
        layers.append((k, {"float32": ops.pack_linear(f8.dequantize()), "int8": ops.pack_linear_int8(i8.q, i8.scale)}))
    print(f"relative weight error: fp8 {(err['fp8'] / err['norm']) ** 0.5:.4f}, "
          f"fp8 then int8 {(err['fp8->int8'] / err['norm']) ** 0.5:.4f}")
    for rows in (1, 32):
        times: dict[str, list[float]] = {"float32": [], "int8": []}
        for _ in range(15):
            for path in times:
                start = time.perf_counter()
                for _ in range(20):
                    for k, packed in layers:
                        ops.linear(torch.randn(rows, k), packed[path])
                times[path].append((time.perf_counter() - start) / 20)
        f, i = statistics.median(times["float32"]), statistics.median(times["int8"])
        print(f"{rows} rows: float32 {f * 1e6:.0f} us, int8 {i * 1e6:.0f} us per pass ({f / i:.2f}x)")


if __name__ == "__main__":
    main()
