"""Decode-only cost per output token of tureen bench spec's methods at batch 1 on the demo model: process CPU
time, single-threaded, the prefill step and the first decode step excluded (the machine may be shared: CPU time is
the steadier figure). Usage: python scripts/spec_decode_cpu.py none,ngram,self-int8 64 2   (methods, tokens, repeats)"""
import os, sys, time, statistics
from pathlib import Path
import torch
torch.set_num_threads(1)
from tureen import LLM, SamplingParams
from tureen.bench.spec import METHODS, workload_prompts

demo = Path(os.path.expanduser("~/.cache/tureen/demo-llama-v1"))
methods = sys.argv[1].split(",")
n_out = int(sys.argv[2]) if len(sys.argv) > 2 else 64
kw = dict(dtype="float32", kv_cache_memory="256MiB", max_num_seqs=64)
llms = {m: LLM(str(demo), speculative_config=None if m == "none" else {**METHODS[m], "num_speculative_tokens": 4,
                                                                       "disable_by_batch_size": 16}, **kw)
        for m in methods}
tok = next(iter(llms.values())).get_tokenizer()
params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
res = {}
for rep in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
    for workload in ("echo", "ordinary"):
        (prompt,) = workload_prompts(tok, workload, 1, 0)
        for m, llm in llms.items():
            eng = llm.llm_engine
            timer = eng.enable_step_timing()
            eng.add_request(f"{workload}{rep}{m}", prompt, params)
            eng.step(); eng.step()  # the prefill, and the first decode (a draft's prefill)
            timer.reset()
            before = len(eng.scheduler.running[0].output_token_ids) if eng.scheduler.running else 0
            c0, w0 = time.process_time(), time.perf_counter()
            outs = []
            while eng.has_unfinished_requests():
                outs += eng.step()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            toks = n_out - before
            phases = {k: round(v["cpu_us"] * timer.steps / toks) for k, v in timer.report().items()
                      if not k.startswith("layer.")}
            res.setdefault((workload, m), []).append(1e3 * cpu / toks)
            print(f"{workload:8s} rep{rep} {m:10s} cpu/token {1e3*cpu/toks:6.2f} ms wall/token {1e3*wall/toks:6.2f} ms "
                  f"steps {timer.steps} tokens {toks} phase cpu_us/token {phases}", flush=True)
for (w, m), v in res.items():
    print(f"MEDIAN {w:8s} {m:10s} cpu/token {statistics.median(v):.2f} ms  tok/s(cpu) {1e3/statistics.median(v):.0f}")
