"""The offline Python API, in the shape vLLM users know."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Sequence
from typing import Any

from tureen.config import EngineConfig
from tureen.engine.llm_engine import LLMEngine
from tureen.errors import EngineStepError, InvalidRequestError
from tureen.outputs import RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams
from tureen.tokenizer import Tokenizer

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Generate from a Hugging Face checkpoint (a local directory or a hub id).

    ``model=None`` uses the built-in demo model, which has RANDOM weights. Engine options are the
    flat fields of ``tureen.config.EngineConfig``: ``max_model_len``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``block_size``, ``enable_prefix_caching``, ``kv_cache_memory``
    (the CPU KV-cache byte budget, e.g. ``"512MiB"``), ``gpu_memory_utilization``, ``dtype``,
    ``seed``, ``device``, ``num_gpu_blocks_override``, ``chat_template``, ``revision``.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults applied."""
        defaults = self.llm_engine.tokenizer.generation_defaults
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return SamplingParams(**{k: defaults[k] for k in keys if defaults.get(k) is not None})

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 priority: Sequence[int] | None = None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise InvalidRequestError("priority must have one entry per prompt", param="priority")
        engine = self.llm_engine
        # Validate everything before anything runs: one bad prompt rejects the batch up front.
        core = [engine.processor.process(str(next(self._ids)), prompt, _final_only(sp), priority=prio)
                for prompt, sp, prio in zip(prompts, params, priorities)]
        for sp in params:
            engine.check_structured_outputs(sp)
        for req in core:
            engine.add_core_request(req)
        request_ids = [req.request_id for req in core]
        return self._run(request_ids, sys.stderr.isatty() if use_tqdm is None else use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to each conversation (with ``tools``, as
        transformers passes them), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tools=tools)
                   for conv in conversations]
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(ids, sampling_params, use_tqdm=use_tqdm)
        for out, text in zip(outs, prompts):
            out.prompt = text
        return outs

    def _params_per_prompt(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise InvalidRequestError("sampling_params must be one object or one per prompt", param="sampling_params")
        return list(sampling_params)

    def _run(self, request_ids: list[str], progress: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        with _progress(progress, len(request_ids)) as advance:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.error is not None:
                        engine.abort_all()
                        engine.step()
                        raise EngineStepError(out.error)
                    if out.finished:
                        done[out.request_id] = out
                        advance(sum(len(c.token_ids) for c in out.outputs))
        return [done[rid] for rid in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # a single token-id prompt
        return [prompts]
    return prompts


def _final_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)


class _progress:
    """A rich progress bar over finished requests (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda tokens: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn(), console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task("gen", total=self.total, tokens=0)
        counted = [0]

        def advance(tokens: int) -> None:
            counted[0] += tokens
            self.bar.update(task, advance=1, tokens=counted[0])
        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
