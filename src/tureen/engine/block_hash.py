"""How the prefix cache names a full KV block: the hash strategy (``--prefix-caching-hash-algo``).

A block's hash chains its parent block's hash and its own tokens, so equal hashes mean equal
prefixes; the cache trusts that. Python's ``hash()`` of a tuple is neither collision-resistant nor
secret, so a tenant who can craft token sequences could make two different prefixes share a block
(and read another's KV), or predict hashes. The strategies here:

- ``sha256``: SHA-256 over the parent digest and the tokens as little-endian uint32 bytes
  (what vLLM moved to). Collision-resistant; the default.
- ``blake2b``: keyed BLAKE2b-256 with a random key drawn when the engine starts: collision-resistant
  and also unpredictable from outside the process.
- ``builtin``: Python's ``hash()``, fastest, for trusted single-tenant use only.

A request's ``cache_salt`` (vLLM's request field; the gateway can set one per tenant) is mixed into
its *first* block, so the whole chain differs: requests with different salts never share a
block, and one tenant cannot learn another's prompts from prefix-cache timing.
``tureen bench block-hash`` measures what each strategy costs per engine step.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from array import array
from collections.abc import Hashable, Sequence
from typing import Protocol

HASH_ALGOS = ("sha256", "blake2b", "builtin")
_LITTLE = sys.byteorder == "little"


class BlockHasher(Protocol):
    name: str

    def __call__(self, parent: Hashable | None, tokens: Sequence[int], salt: str | None = None) -> Hashable:
        """The hash of a full block after ``parent`` (None for the first block; ``salt`` only there)."""


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 (the same bytes on every machine)."""
    packed = array("I", tokens)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


def _prefix(parent: Hashable | None, salt: str | None) -> bytes:
    if parent is not None:
        return b"p" + parent  # type: ignore[operator]  # a digest of this same strategy
    return b"s" + salt.encode() + b"\0" if salt is not None else b"r"


class Sha256Hasher:
    name = "sha256"

    def __call__(self, parent: Hashable | None, tokens: Sequence[int], salt: str | None = None) -> bytes:
        return hashlib.sha256(_prefix(parent, salt) + token_bytes(tokens)).digest()


class KeyedBlake2Hasher:
    name = "blake2b"

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)

    def __call__(self, parent: Hashable | None, tokens: Sequence[int], salt: str | None = None) -> bytes:
        return hashlib.blake2b(_prefix(parent, salt) + token_bytes(tokens), key=self.key, digest_size=32).digest()


class BuiltinHasher:
    name = "builtin"

    def __call__(self, parent: Hashable | None, tokens: Sequence[int], salt: str | None = None) -> int:
        return hash((parent, tuple(tokens))) if salt is None else hash((parent, salt, tuple(tokens)))


def make_block_hasher(algo: str) -> BlockHasher:
    hashers = {"sha256": Sha256Hasher, "blake2b": KeyedBlake2Hasher, "builtin": BuiltinHasher}
    if algo not in hashers:
        raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}, got {algo!r}")
    return hashers[algo]()
