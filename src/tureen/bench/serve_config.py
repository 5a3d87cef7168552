"""One typed configuration tree for ``tureen bench serve``.

Built once in ``bench/cli.py`` from the flags and passed down; each field's ``help`` metadata is
written here once and reused as the CLI help text. Nothing here does any I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tureen.errors import ConfigError

ENDPOINTS = ("completions", "chat")
DATASETS = ("random", "prefix", "sharegpt", "jsonl", "cache")
SLO_NAMES = ("ttft", "tpot", "e2el")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def parse_rate(value: str | float) -> float:
    """``"inf"`` or a positive number of requests per second."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"request rate must be a number or 'inf', got {value!r}") from None
    if not rate > 0:
        raise ConfigError(f"request rate must be > 0 (or 'inf'), got {value!r}")
    return rate


def parse_csv_numbers(value: str | list | tuple, kind: type, what: str) -> tuple:
    """``"50,90,99"`` (or an already split list) -> ``(50.0, 90.0, 99.0)``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(kind(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated {kind.__name__}s, got {value!r}") from None
    if not out:
        raise ConfigError(f"{what} is empty")
    return out


def parse_goodput(pairs: list[str] | dict[str, float] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        items = list(pairs.items())
    else:
        items = []
        for pair in pairs:
            name, sep, value = str(pair).partition(":")
            if not sep:
                raise ConfigError(f"goodput SLO must look like NAME:MS (e.g. ttft:500), got {pair!r}")
            items.append((name.strip(), value))
    slos: dict[str, float] = {}
    for name, value in items:
        if name not in SLO_NAMES:
            raise ConfigError(f"goodput SLO name must be one of {', '.join(SLO_NAMES)}, got {name!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"goodput SLO {name} must be a number of milliseconds, got {value!r}") from None
        if ms < 0:
            raise ConfigError(f"goodput SLO {name} must be >= 0 ms, got {ms}")
        slos[name] = ms
    return slos


@dataclass
class TargetConfig:
    """Which server to load and how each request is sent."""

    base_url: str = field(default="http://127.0.0.1:8000", metadata=_help(
        "Server root URL (without /v1); the only host the benchmark talks to."))
    model: str | None = field(default=None, metadata=_help(
        "Model name sent in each request. Default: the first id from GET /v1/models."))
    endpoint: str = field(default="completions", metadata=_help(
        "OpenAI endpoint to load: completions (/v1/completions) or chat (/v1/chat/completions).",
        choices=list(ENDPOINTS)))
    api_key: str | None = field(default=None, metadata=_help(
        "Bearer token for the Authorization header. Default: $OPENAI_API_KEY. Never saved."))
    timeout: float = field(default=300.0, metadata=_help(
        "Per-request time limit in seconds, from send to the end of the stream."))
    ignore_eos: bool = field(default=False, metadata=_help(
        "Send ignore_eos=true so every request generates exactly its output length (vLLM extension)."))
    temperature: float | None = field(default=None, metadata=_help(
        "Sampling temperature sent with each request. Default: 0.0, greedy decoding, as vLLM's "
        "bench serve does (the server's own default would be 1.0)."))
    top_p: float | None = field(default=None, metadata=_help("top_p sent with each request. Default: not sent."))
    top_k: int | None = field(default=None, metadata=_help("top_k sent with each request (vLLM extension). "
                                                           "Default: not sent."))
    min_p: float | None = field(default=None, metadata=_help("min_p sent with each request (vLLM extension). "
                                                             "Default: not sent."))
    tokenizer: str | None = field(default=None, metadata=_help(
        "Local tokenizer directory for building prompts and counting tokens, instead of the "
        "server's /tokenize and /detokenize."))
    speculative_config: str | None = field(default=None, metadata=_help(
        "The server's speculative decoding setting (the JSON given to tureen serve --speculative-config): "
        "recorded with the results, and the server's vllm:spec_decode_* counters are read from /metrics "
        "around each run to report its acceptance rate and mean accepted length."))

    def __post_init__(self) -> None:
        if self.speculative_config is not None:
            from tureen.config import SpeculativeConfig

            SpeculativeConfig.parse(self.speculative_config)  # a bad setting is a clear error here too
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def sampling(self) -> dict[str, Any]:
        """The sampling fields of every request: greedy unless a temperature was given."""
        out: dict[str, Any] = {"temperature": 0.0 if self.temperature is None else self.temperature}
        out.update({name: value for name, value in (("top_p", self.top_p), ("top_k", self.top_k),
                                                    ("min_p", self.min_p)) if value is not None})
        return out

    @property
    def api_path(self) -> str:
        return "/v1/completions" if self.endpoint == "completions" else "/v1/chat/completions"


@dataclass
class WorkloadConfig:
    """What the prompts look like and how many there are."""

    dataset: str = field(default="random", metadata=_help(
        "Prompt source: random (exact token lengths), prefix (shared prefix + random suffix), "
        "sharegpt (ShareGPT JSON file), jsonl (one {\"prompt\", \"output_len\"?} per line) or cache "
        "(repeated and paraphrased questions for the gateway caches; --dataset-path: labelled pairs).",
        choices=list(DATASETS)))
    dataset_path: str | None = field(default=None, metadata=_help(
        "File for the sharegpt and jsonl datasets."))
    num_prompts: int = field(default=100, metadata=_help("Number of requests to send (per sweep level)."))
    input_len: int = field(default=256, metadata=_help(
        "Prompt length in tokens for random/prefix (prefix: the part after the shared prefix)."))
    output_len: int | None = field(default=None, metadata=_help(
        "max_tokens of each request. Default: 128 for random/prefix/jsonl; sharegpt uses each "
        "conversation's reply length."))
    range_ratio: float = field(default=0.0, metadata=_help(
        "Lengths are drawn uniformly from [len*(1-r), len*(1+r)] for random/prefix."))
    prefix_len: int | None = field(default=None, metadata=_help(
        "Tokens of the prefix shared by every prompt. Default: 0 for random, input_len for prefix."))
    seed: int = field(default=0, metadata=_help("Seed for prompts and arrival times."))
    cache_repeat_ratio: float = field(default=0.3, metadata=_help(
        "cache dataset: share of requests that repeat an earlier question word for word."))
    cache_paraphrase_ratio: float = field(default=0.3, metadata=_help(
        "cache dataset: share of requests that paraphrase an earlier question."))

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset in ("sharegpt", "jsonl") and not self.dataset_path:
            raise ConfigError(f"the {self.dataset} dataset needs --dataset-path")
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.input_len < 1:
            raise ConfigError(f"input_len must be >= 1, got {self.input_len}")
        if self.output_len is not None and self.output_len < 1:
            raise ConfigError(f"output_len must be >= 1, got {self.output_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ConfigError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not (0 <= self.cache_repeat_ratio and 0 <= self.cache_paraphrase_ratio
                and self.cache_repeat_ratio + self.cache_paraphrase_ratio <= 1):
            raise ConfigError("cache_repeat_ratio and cache_paraphrase_ratio must be >= 0 and sum to at most 1")
        if self.prefix_len is None:
            self.prefix_len = self.input_len if self.dataset == "prefix" else 0
        if self.prefix_len < 0:
            raise ConfigError(f"prefix_len must be >= 0, got {self.prefix_len}")

    @property
    def default_output_len(self) -> int:
        return self.output_len if self.output_len is not None else 128


@dataclass
class LoadConfig:
    """How requests arrive and how many may be in flight."""

    request_rate: float = field(default=math.inf, metadata=_help(
        "Mean arrivals per second, or inf to send every request at once.", parse=parse_rate))
    burstiness: float = field(default=1.0, metadata=_help(
        "Gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier, > 1 more even."))
    max_concurrency: int | None = field(default=None, metadata=_help(
        "Most requests in flight at once (client-side semaphore). Default: unbounded."))
    warmup: int = field(default=0, metadata=_help(
        "Requests sent (and not measured) before the timed run."))
    max_duration: float | None = field(default=None, metadata=_help(
        "Overall deadline in seconds for one run; requests still open then are cancelled and "
        "counted as failures. Default: arrival span + timeout * ceil(N / concurrency) + 30."))
    sweep_concurrency: tuple[int, ...] | None = field(default=None, metadata=_help(
        "Run once per max-concurrency level, e.g. 1,2,4,8,16,32, and print one row per level.",
        parse=lambda v: parse_csv_numbers(v, int, "sweep_concurrency")))

    def __post_init__(self) -> None:
        self.request_rate = parse_rate(self.request_rate)
        if not self.burstiness > 0:
            raise ConfigError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.max_duration is not None and not self.max_duration > 0:
            raise ConfigError(f"max_duration must be > 0 seconds, got {self.max_duration}")
        if self.sweep_concurrency is not None:
            self.sweep_concurrency = parse_csv_numbers(self.sweep_concurrency, int, "sweep_concurrency")
            if min(self.sweep_concurrency) < 1:
                raise ConfigError(f"sweep_concurrency levels must be >= 1, got {self.sweep_concurrency}")


@dataclass
class ReportConfig:
    """What is computed from the measurements and where it is written."""

    goodput: dict[str, float] = field(default_factory=dict, metadata=_help(
        "Service-level objectives in ms, e.g. ttft:500 tpot:50 e2el:10000; goodput counts the "
        "requests per second that meet all of them.", parse=parse_goodput, nargs="+",
        metavar="NAME:MS"))
    percentiles: tuple[float, ...] = field(default=(50.0, 90.0, 95.0, 99.0), metadata=_help(
        "Comma-separated percentiles to report for TTFT, TPOT, ITL and E2EL.",
        parse=lambda v: parse_csv_numbers(v, float, "percentiles")))
    save_result: Path | None = field(default=None, metadata=_help(
        "Write every metric plus per-request records to this JSON file."))
    plot: Path | None = field(default=None, metadata=_help(
        "Write a PNG: the throughput/p99-latency trade-off across a sweep, and the TTFT/E2E "
        "latency distribution."))

    def __post_init__(self) -> None:
        self.goodput = parse_goodput(self.goodput)
        self.percentiles = parse_csv_numbers(self.percentiles, float, "percentiles")
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise ConfigError(f"percentiles must be in [0, 100], got {self.percentiles}")
        if self.save_result is not None:
            self.save_result = Path(self.save_result)
        if self.plot is not None:
            self.plot = Path(self.plot)


@dataclass
class ServeBenchConfig:
    target: TargetConfig = field(default_factory=TargetConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServeBenchConfig":
        """Build the tree from flat keyword arguments (the CLI and tests use this)."""
        parts: dict[str, dict[str, Any]] = {}
        for section, sub in SECTIONS.items():
            names = {f.name for f in fields(sub)}
            parts[section] = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if kwargs:
            raise ConfigError(f"unknown bench serve option(s): {', '.join(sorted(kwargs))}")
        return cls(**{section: SECTIONS[section](**values) for section, values in parts.items()})

    def describe(self) -> dict[str, Any]:
        """The run's settings for the result JSON (the API key is left out)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for f in fields(SECTIONS[section]):
                if f.name == "api_key":
                    continue
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, Path):
                    value = str(value)
                elif isinstance(value, tuple):
                    value = list(value)
                elif isinstance(value, float) and math.isinf(value):
                    value = "inf"
                out[f.name] = value
        return out


SECTIONS = {"target": TargetConfig, "workload": WorkloadConfig, "load": LoadConfig, "report": ReportConfig}


def bench_serve_fields() -> list[tuple[str, Any]]:
    """Every flat option as ``(section, dataclass Field)``, for building CLI flags."""
    return [(section, f) for section, sub in SECTIONS.items() for f in fields(sub)]
