"""Benchmark workloads: random, prefix, ShareGPT, JSONL, and cache (repeated and paraphrased) prompts.

Random and prefix prompts have an exact token length under the target's tokenizer: a window of
ids is taken from a pool of tokenized filler text, decoded, and re-encoded; if the round trip
changed the count (merges across the cut), the text is trimmed or extended and checked again,
a bounded number of times.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tureen.bench.serve_config import WorkloadConfig
from tureen.bench.token_codec import TokenCodec
from tureen.errors import ConfigError

logger = logging.getLogger("tureen.bench")

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "la", "zu", "chi", "ben",
              "mar", "tor", "el", "an", "is", "or", "ur", "qua", "fen", "gil", "son", "ta", "re")
_FIT_TRIES = 6
_MIN_POOL_TOKENS = 4096


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens under the codec; 0 when unknown (the server's usage fills it in)
    expected_output_len: int
    kind: str = ""  # the cache dataset: "fresh", "repeat" or "paraphrase"
    sampling: dict = field(default_factory=dict)  # extra request fields (the cache dataset: temperature 0)


def build_samples(workload: WorkloadConfig, codec: TokenCodec | None) -> list[SampleRequest]:
    """``workload.num_prompts`` requests, deterministic for a given seed."""
    rng = np.random.default_rng(workload.seed)
    if workload.dataset in ("random", "prefix"):
        if codec is None:
            raise ConfigError(f"the {workload.dataset} dataset needs a tokenizer: the server has no "
                              "/tokenize endpoint, so pass --tokenizer PATH")
        return random_samples(workload, codec, rng)
    if workload.dataset == "sharegpt":
        return sharegpt_samples(workload, codec, rng)
    if workload.dataset == "cache":
        return cache_samples(workload, codec, rng)
    return jsonl_samples(workload, codec)


def sample_lengths(length: int, range_ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integers drawn uniformly from ``[length*(1-r), length*(1+r)]`` (at least 1)."""
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_samples(workload: WorkloadConfig, codec: TokenCodec, rng: np.random.Generator) -> list[SampleRequest]:
    n = workload.num_prompts
    input_lens = sample_lengths(workload.input_len, workload.range_ratio, n, rng)
    output_lens = sample_lengths(workload.default_output_len, workload.range_ratio, n, rng)
    prefix_len = int(workload.prefix_len or 0)
    _check_fits(codec, prefix_len + int(input_lens.max()) + int(output_lens.max()))
    pool = _token_pool(codec, rng, max(_MIN_POOL_TOKENS, 4 * (prefix_len + int(input_lens.max()))))
    prefix = ""
    if prefix_len:
        prefix, got = fit_text(codec, codec.decode(_window(pool, int(rng.integers(len(pool))), prefix_len)),
                               prefix_len, _filler(pool, rng))
        prefix_len = got
    samples = []
    for i in range(n):
        target = prefix_len + int(input_lens[i])
        suffix = codec.decode(_window(pool, int(rng.integers(len(pool))), int(input_lens[i])))
        prompt, got = fit_text(codec, prefix + suffix, target, _filler(pool, rng))
        samples.append(SampleRequest(prompt, got, int(output_lens[i])))
    return samples


def fit_text(codec: TokenCodec, text: str, target: int, filler: Callable[[int], list[int]]) -> tuple[str, int]:
    """Trim or extend ``text`` until it encodes to exactly ``target`` tokens (bounded tries).

    Returns the text and its actual length, which differs from ``target`` only when the
    tokenizer never settled within the tries.
    """
    ids = codec.encode(text)
    for _ in range(_FIT_TRIES):
        if len(ids) == target:
            return text, target
        if len(ids) > target:
            text = codec.decode(ids[:target])
        else:
            text = text + codec.decode(filler(target - len(ids)))
        ids = codec.encode(text)
    if len(ids) != target:
        logger.warning("prompt has %d tokens instead of %d after %d tries", len(ids), target, _FIT_TRIES)
    return text, len(ids)


def _check_fits(codec: TokenCodec, longest: int) -> None:
    limit = codec.max_model_len
    if limit is not None and longest > limit:
        raise ConfigError(f"the longest request needs {longest} tokens (prefix + input + output) but the "
                          f"server's max_model_len is {limit}; lower --input-len/--output-len/--prefix-len")


def _token_pool(codec: TokenCodec, rng: np.random.Generator, size: int) -> list[int]:
    """At least ``size`` token ids of pronounceable filler text."""
    pool: list[int] = []
    for _ in range(16):  # each round adds ~size/2 tokens or more; bounded anyway
        if len(pool) >= size:
            break
        pool.extend(codec.encode(_filler_text(rng, max(64, size // 2))))
    if not pool:
        raise ConfigError("the tokenizer returned no tokens for the filler text")
    return pool


def _filler_text(rng: np.random.Generator, n_words: int) -> str:
    picks = rng.integers(len(_SYLLABLES), size=(n_words, 3))
    sizes = rng.integers(1, 4, size=n_words)
    words = ["".join(_SYLLABLES[j] for j in row[:k]) for row, k in zip(picks, sizes)]
    return " ".join(words) + "."


def _window(pool: list[int], start: int, length: int) -> list[int]:
    """``length`` ids from ``pool`` starting at ``start``, wrapping around."""
    start %= len(pool)
    out = pool[start: start + length]
    while len(out) < length:  # at most length // len(pool) + 1 rounds
        out = out + pool[: length - len(out)]
    return out


def _filler(pool: list[int], rng: np.random.Generator) -> Callable[[int], list[int]]:
    return lambda k: _window(pool, int(rng.integers(len(pool))), k)


def sharegpt_samples(workload: WorkloadConfig, codec: TokenCodec | None,
                     rng: np.random.Generator) -> list[SampleRequest]:
    """First human turn as the prompt; the reply's token count as the output length."""
    if codec is None and workload.output_len is None:
        raise ConfigError("the sharegpt dataset needs a tokenizer (server /tokenize or --tokenizer) "
                          "to measure reply lengths, or a fixed --output-len")
    pairs = _sharegpt_pairs(_load_json(workload.dataset_path))
    limit = codec.max_model_len if codec is not None else None
    samples: list[SampleRequest] = []
    for idx in rng.permutation(len(pairs)):
        if len(samples) == workload.num_prompts:
            break
        prompt, reply = pairs[idx]
        prompt_len = len(codec.encode(prompt)) if codec is not None else 0
        output_len = workload.output_len or len(codec.encode(reply))
        if prompt_len < 4 and codec is not None or output_len < 4 and workload.output_len is None:
            continue  # vLLM's ShareGPT filter: too short to time
        if limit is not None and prompt_len + output_len > limit:
            continue
        samples.append(SampleRequest(prompt, prompt_len, output_len))
    return _cycle(samples, workload.num_prompts, workload.dataset_path)


def _sharegpt_pairs(data: Any) -> list[tuple[str, str]]:
    if not isinstance(data, list):
        raise ConfigError("a ShareGPT file must hold a JSON list of {\"conversations\": [...]} entries")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        roles = [(t.get("from"), t.get("value")) for t in turns if isinstance(t, dict)]
        for i, (role, value) in enumerate(roles[:-1]):
            if role == "human" and isinstance(value, str) and value.strip():
                reply = roles[i + 1]
                if reply[0] == "gpt" and isinstance(reply[1], str):
                    pairs.append((value, reply[1]))
                break
    return pairs


def jsonl_samples(workload: WorkloadConfig, codec: TokenCodec | None) -> list[SampleRequest]:
    """One ``{"prompt": str, "output_len"?: int}`` per line, in file order."""
    path = Path(str(workload.dataset_path))
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {str(path)!r}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if len(samples) == workload.num_prompts:
            break
        if not line.strip():
            continue
        samples.append(_jsonl_sample(line, lineno, path, workload, codec))
    return _cycle(samples, workload.num_prompts, str(path))


def _jsonl_sample(line: str, lineno: int, path: Path, workload: WorkloadConfig,
                  codec: TokenCodec | None) -> SampleRequest:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise ConfigError(f"{where}: each line needs a non-empty string \"prompt\"")
    output_len = row.get("output_len", workload.default_output_len)
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ConfigError(f"{where}: \"output_len\" must be a positive integer, got {output_len!r}")
    prompt_len = len(codec.encode(row["prompt"])) if codec is not None else 0
    return SampleRequest(row["prompt"], prompt_len, output_len)


def _load_json(path: str | None) -> Any:
    try:
        with open(str(path), encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"dataset {path!r} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def _cycle(samples: list[SampleRequest], n: int, source: str | None) -> list[SampleRequest]:
    """Repeat the usable samples to reach ``n`` requests (with a warning)."""
    if not samples:
        raise ConfigError(f"dataset {source!r} has no usable prompts")
    if len(samples) < n:
        logger.warning("dataset %s has %d usable prompts; repeating them to send %d", source, len(samples), n)
    return [samples[i % len(samples)] for i in range(n)]


def cache_samples(workload: WorkloadConfig, codec: TokenCodec | None,
                  rng: np.random.Generator) -> list[SampleRequest]:
    """Questions for the gateway caches: each request is an exact repeat of an earlier one (share
    ``cache_repeat_ratio``), a paraphrase of an earlier one (``cache_paraphrase_ratio``), or a new
    question. The questions are labelled pairs (``--dataset-path``, default the gateway's shipped
    set): a paraphrase is the other side of a ``same`` pair. Greedy (temperature 0), so the exact
    tier may answer."""
    from tureen.gateway.cache.calibrate import read_pairs, shipped_pairs

    pairs = read_pairs(Path(workload.dataset_path) if workload.dataset_path else shipped_pairs())
    paraphrase: dict[str, str | None] = {}
    for p in pairs:  # one entry per question; a question of both a same and a different pair keeps its paraphrase
        if p["same"] or p["a"] not in paraphrase:
            paraphrase[p["a"]] = p["b"] if p["same"] else None
    fresh = list(paraphrase.items())
    order = [fresh[i] for i in rng.permutation(len(fresh))]
    asked: list[tuple[str, str | None]] = []
    samples: list[SampleRequest] = []
    for _ in range(workload.num_prompts):
        draw = rng.random()
        paraphrasable = [q for q in asked if q[1] is not None]
        if asked and draw < workload.cache_repeat_ratio:
            text, kind = asked[int(rng.integers(len(asked)))][0], "repeat"
        elif paraphrasable and draw < workload.cache_repeat_ratio + workload.cache_paraphrase_ratio:
            text, kind = paraphrasable[int(rng.integers(len(paraphrasable)))][1], "paraphrase"
        else:
            question = order[len(asked) % len(order)]
            asked.append(question)
            text, kind = question[0], "fresh"
        prompt_len = len(codec.encode(text)) if codec is not None else 0
        samples.append(SampleRequest(text, prompt_len, workload.default_output_len, kind, {"temperature": 0}))
    return samples
