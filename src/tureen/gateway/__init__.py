"""tureen's LLM gateway: a separate process that talks HTTP to OpenAI-compatible upstreams.

It authenticates tenants, enforces limits, routes across replicas with retries, breakers and
fallbacks, and accounts usage. It imports nothing from ``tureen.engine`` or ``tureen.executor``.
"""
