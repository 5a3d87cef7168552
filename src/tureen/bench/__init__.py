"""Benchmarks: ``tureen bench serve`` (load-test an OpenAI-compatible server, measured like
``vllm bench serve``) and ``tureen bench throughput`` (offline engine throughput)."""
