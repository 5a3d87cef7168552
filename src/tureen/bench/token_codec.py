"""Token codecs for the benchmark: the server's ``/tokenize`` + ``/detokenize``, or a local tokenizer.

Both are synchronous on purpose: prompts are built before the timed run (and the Locust file,
which runs under gevent, reuses them), so nothing here needs an event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import httpx

from tureen.errors import ConfigError, TureenError


class ServerUnavailableError(TureenError):
    """The benchmarked server could not be reached or answered something unusable."""


class TokenCodec(Protocol):
    """Text <-> token ids, counting only the text's own tokens (no BOS/EOS)."""

    max_model_len: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ServerCodec:
    """vLLM-style ``POST /tokenize`` and ``POST /detokenize`` on the benchmarked server.

    The body asks for ``add_special_tokens: false`` (vLLM's field); servers that ignore it and
    add a BOS anyway are handled too: the codec measures that overhead once, on an empty
    prompt, and strips it.
    """

    def __init__(self, client: httpx.Client, model: str) -> None:
        self._client = client
        self._model = model
        first = self._tokenize("")
        self._special = len(first["tokens"])
        self.max_model_len: int | None = first.get("max_model_len")

    @classmethod
    def probe(cls, client: httpx.Client, model: str) -> "ServerCodec | None":
        """The codec, or None when the server has no tokenize endpoints (hosted APIs)."""
        try:
            return cls(client, model)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (404, 405, 501):
                return None
            raise ServerUnavailableError(f"/tokenize answered HTTP {exc.response.status_code}") from exc
        except httpx.TransportError as exc:
            raise ServerUnavailableError(f"cannot reach {client.base_url}: {exc}") from exc

    def _tokenize(self, text: str) -> dict[str, Any]:
        resp = self._client.post("/tokenize", json={"model": self._model, "prompt": text,
                                                        "add_special_tokens": False})
        resp.raise_for_status()
        body = resp.json()
        if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
            raise ServerUnavailableError(f"/tokenize returned no token list: {str(body)[:200]}")
        return body

    def encode(self, text: str) -> list[int]:
        tokens = self._tokenize(text)["tokens"]
        # Special tokens the server adds (BOS first, EOS last) are not part of the text.
        return tokens[self._special:] if self._special and len(tokens) >= self._special else tokens

    def decode(self, ids: list[int]) -> str:
        resp = self._client.post("/detokenize", json={"model": self._model, "tokens": list(ids)})
        resp.raise_for_status()
        body = resp.json()
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ServerUnavailableError(f"/detokenize returned no prompt: {str(body)[:200]}")
        return body["prompt"]


class LocalCodec:
    """A tokenizer directory on this machine (``--tokenizer PATH``).

    Uses ``tureen.tokenizer.Tokenizer`` when that module is present, else the ``tokenizers``
    library on the directory's ``tokenizer.json``.
    """

    max_model_len: int | None = None

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"tokenizer path {str(path)!r} does not exist")
        self._tok = _load_local(path)

    def encode(self, text: str) -> list[int]:
        try:
            out = self._tok.encode(text, add_special_tokens=False)
        except TypeError:
            out = self._tok.encode(text)
        return list(getattr(out, "ids", out))

    def decode(self, ids: list[int]) -> str:
        try:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        except TypeError:
            return self._tok.decode(list(ids))


def _load_local(path: Path) -> Any:
    try:
        from tureen.tokenizer import Tokenizer  # the project's tokenizer, when built
    except ImportError:
        Tokenizer = None
    if Tokenizer is not None:
        return Tokenizer.from_pretrained(str(path))
    from tokenizers import Tokenizer as HFTokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no tokenizer.json in {str(path)!r}")
    return HFTokenizer.from_file(str(file))
