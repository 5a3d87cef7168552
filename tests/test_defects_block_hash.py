"""Prefix-cache block hashes: collision-resistant, optionally keyed, and separated per tenant by a salt.

Issue 18, section 5: Python's ``hash()`` of a tuple is neither collision-resistant nor secret, so
the default is SHA-256 over the token bytes; ``cache_salt`` keeps tenants' cached blocks apart.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tureen.config import CacheConfig
from tureen.engine.block_hash import BuiltinHasher, KeyedBlake2Hasher, Sha256Hasher, make_block_hasher, token_bytes
from tureen.engine.kv_cache import KVCacheManager
from tureen.engine.request import Request
from tureen.errors import ConfigError
from tureen.sampling_params import SamplingParams

HASHERS = [Sha256Hasher(), KeyedBlake2Hasher(), BuiltinHasher()]


def req(rid: str, prompt, salt: str | None = None) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=1, cache_salt=salt)
    return Request(rid, list(prompt), params, max_tokens=1, arrival_time=0.0)


def test_sha256_is_the_documented_digest_of_the_token_bytes():
    tokens = [1, 2, 70000]
    assert token_bytes(tokens) == (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (70000).to_bytes(4, "little")
    first = Sha256Hasher()(None, tokens)
    assert first == hashlib.sha256(b"r" + token_bytes(tokens)).digest()
    assert Sha256Hasher()(first, tokens) == hashlib.sha256(b"p" + first + token_bytes(tokens)).digest()


@pytest.mark.parametrize("hasher", HASHERS, ids=lambda h: h.name)
def test_hash_depends_on_tokens_parent_and_salt(hasher):
    a = hasher(None, [1, 2, 3, 4])
    assert hasher(None, [1, 2, 3, 4]) == a
    assert hasher(None, [1, 2, 3, 5]) != a
    assert hasher(a, [1, 2, 3, 4]) != a
    assert hasher(None, [1, 2, 3, 4], "tenant-a") != a != hasher(None, [1, 2, 3, 4], "tenant-b")
    assert hasher(None, [1, 2, 3, 4], "tenant-a") != hasher(None, [1, 2, 3, 4], "tenant-b")


def test_the_keyed_hash_is_secret_per_process_and_sha256_is_stable():
    script = "from tureen.engine.block_hash import {0}; print({0}()(None, [5, 6, 7, 8]).hex())"

    def run(name: str) -> str:
        return subprocess.run([sys.executable, "-c", script.format(name)], capture_output=True, text=True,
                              check=True).stdout
    assert run("KeyedBlake2Hasher") != run("KeyedBlake2Hasher")  # a fresh secret key per engine process
    assert run("Sha256Hasher") == run("Sha256Hasher") == Sha256Hasher()(None, [5, 6, 7, 8]).hex() + "\n"


@pytest.mark.parametrize("algo", ["sha256", "blake2b", "builtin"])
def test_salt_separates_tenants_in_the_cache(algo):
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True, hasher=make_block_hasher(algo))
    prompt = range(12)
    first = req("a", prompt, salt="tenant-a")
    assert kv.allocate_slots(first, 12)
    table = list(first.block_ids)
    kv.free(first)
    assert kv.get_computed_blocks(req("b", prompt, salt="tenant-b")) == []  # another tenant: no hit
    assert kv.get_computed_blocks(req("c", prompt)) == []  # unsalted is its own tenant too
    hits = kv.get_computed_blocks(req("d", prompt, salt="tenant-a"))  # same tenant: the cached prefix
    assert [b.block_id for b in hits] == table[:2]  # (12 - 1) // 4 full blocks: the last token is recomputed


def test_config_picks_the_strategy_and_sha256_is_default():
    assert CacheConfig().prefix_caching_hash_algo == "sha256"
    with pytest.raises(ConfigError):
        CacheConfig(prefix_caching_hash_algo="md5")
    with pytest.raises(ValueError):
        make_block_hasher("md5")


def test_the_scheduler_uses_the_configured_hasher():
    from tureen.config import SchedulerConfig
    from tureen.engine.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(), CacheConfig(prefix_caching_hash_algo="blake2b"), max_model_len=64,
                      num_blocks=8)
    assert sched.kv.hasher.name == "blake2b"


def test_the_server_passes_cache_salt_to_the_engine():
    from tureen.server.protocol import CompletionRequest

    body = CompletionRequest.model_validate({"prompt": "x", "cache_salt": "tenant-a"})
    assert body.to_sampling_params({}).cache_salt == "tenant-a"
    with pytest.raises(Exception):
        CompletionRequest.model_validate({"prompt": "x", "cache_salt": ""})
