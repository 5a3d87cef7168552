"""The linear kernels share a weight's panels among threads as static ranges with stealing
(``csrc/panels.h``): a thread that is descheduled, or never starts, has its panels done by the
others. Every panel is still computed whole by one thread, in the same order of operations, so
the result does not depend on who computed what: it is bit-identical to one thread's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent

# Five weights, one per kernel (float32, int8 and int4 weight-only, int8 and int4 W8A8, one with
# the fused gate/up), at decode and prefill row counts; prints each result's bytes as hex digests.
SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_quant_kernels import random_weight
    from tureen.executor import cpu_kernels
    ops = cpu_kernels.load_cpu_ops("on", torch.device("cpu"), torch.float32, 64)
    g = torch.Generator().manual_seed(0)
    n, k = 208, 256  # 13 panels; 2 x 104 for the gate/up one
    q8, s8, _ = random_weight(8, n, k, -1, asym=False)
    q4, s4, z4 = random_weight(4, n, k, 64, asym=True)
    weights = [ops.pack_linear(torch.randn(n, k, generator=g)), ops.pack_linear_int8(q8, s8),
               ops.pack_linear_int4(q4, s4, z4, 64), ops.pack_linear_w8a8(q8, s8, None, -1, 8),
               ops.pack_linear_w8a8(q4, s4, z4, 64, 4, gate_up=True)]
    xs = [torch.randn(rows, k, generator=g) for rows in (1, 5, 37)]
    for threads in map(int, sys.argv[2:]):
        torch.set_num_threads(threads)
        outs = [ops.linear(x, w) for _ in range(20) for w in weights for x in xs]
        print(threads, hashlib.sha256(b"".join(o.numpy().tobytes() for o in outs)).hexdigest())
""")


def _digests(env_extra: dict[str, str], *threads: int) -> dict[int, str]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS), *map(str, threads)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {int(t): d for t, d in (line.split() for line in out.stdout.splitlines())}


def test_ranges_whose_threads_never_start_are_stolen():
    """OMP_THREAD_LIMIT=1: a call that splits the panels into six ranges gets a team of one
    thread, which must take every other range from its far end. Nothing is lost or doubled."""
    limited = _digests({"OMP_THREAD_LIMIT": "1"}, 6)
    assert limited == {6: _digests({}, 1)[1]}


def test_oversubscribed_threads_give_the_one_thread_result():
    """Seven threads on this machine's cores are descheduled all the time, so panels really are
    stolen, at random points; the result stays the single thread's, bit for bit."""
    d = _digests({}, 1, 7, 3)
    assert d[7] == d[1] and d[3] == d[1]
