"""Eval suites: cases with variables, user messages and promptfoo-named assertions, run against a live endpoint.

A suite file is a YAML list of cases, or a mapping with ``cases`` and suite settings::

    threshold: 1.0                # pass rate needed (default 100%)
    concurrency: 4                # parallel requests, bounded
    max_latency_growth_pct: 50    # promote refuses a p95 latency this much above the current stable's...
    latency_slack_ms: 50          # ...and at least this many ms above it (smaller growth is noise)
    pricing: {input_cost_per_token: 0.0, output_cost_per_token: 0.0}   # for ``cost``
    judge: {base_url: http://127.0.0.1:9000/v1, model: judge}          # for ``llm-rubric``
    cases:
      - description: greets
        vars: {customer: Ada}
        messages: [{role: user, content: "hello"}]     # or  user: "hello"
        assert:
          - {type: equals, value: "..."}
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tureen.prompts.registry import PromptError, Resolved

ASSERTION_TYPES = ("equals", "contains", "icontains", "regex", "is-json", "contains-json", "not-contains",
                   "latency", "cost", "llm-rubric")


class Assertion(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal[ASSERTION_TYPES]  # type: ignore[valid-type]
    value: Any = None
    threshold: float | None = None  # latency (ms) and cost bounds

    @model_validator(mode="after")
    def _needs(self) -> Assertion:
        if self.type in ("equals", "contains", "icontains", "regex", "not-contains", "llm-rubric") and \
                not isinstance(self.value, str):
            raise ValueError(f"assertion '{self.type}' needs a string 'value'")
        if self.type in ("latency", "cost") and self.threshold is None:
            raise ValueError(f"assertion '{self.type}' needs a 'threshold'")
        if self.type == "regex":
            re.compile(self.value)
        return self


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    description: str = ""
    vars: dict[str, Any] = Field(default_factory=dict)
    messages: list[dict[str, str]] = Field(default_factory=list)
    user: str | None = None
    asserts: list[Assertion] = Field(default_factory=list, alias="assert")

    def user_messages(self) -> list[dict[str, str]]:
        return self.messages + ([{"role": "user", "content": self.user}] if self.user is not None else [])


class Judge(BaseModel):
    base_url: str
    model: str = "judge"
    api_key_env: str | None = None


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(1.0, ge=0, le=1)
    concurrency: int = Field(4, ge=1, le=64)
    max_latency_growth_pct: float = Field(50.0, ge=0)
    latency_slack_ms: float = Field(50.0, ge=0, description="p95 growth below this many ms is noise, never a "
                                                            "regression")
    temperature: float = 0.0
    max_tokens: int = Field(32, ge=1)
    pricing: dict[str, float] = Field(default_factory=dict)
    judge: Judge | None = None
    cases: list[Case] = Field(min_length=1)


def load_suite(path: Path) -> Suite:
    try:
        data = yaml.safe_load(path.read_text())
        return Suite.model_validate({"cases": data} if isinstance(data, list) else data)
    except FileNotFoundError:
        raise PromptError(f"no eval suite at {path}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in detail["loc"]) + ": " + detail["msg"] if detail else str(exc)
        raise PromptError(f"{path}: {where}") from None


@dataclass
class AssertionResult:
    type: str
    passed: bool
    reason: str = ""


@dataclass
class CaseResult:
    description: str
    passed: bool
    output: str
    latency_ms: float
    cost: float
    assertions: list[AssertionResult] = field(default_factory=list)
    error: str | None = None


@dataclass
class SuiteResult:
    prompt: str
    version: str
    model: str
    cases: list[CaseResult]
    threshold: float

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def pass_rate(self) -> float:
        return self.passed / len(self.cases) if self.cases else 0.0

    @property
    def p95_latency_ms(self) -> float:
        values = sorted(c.latency_ms for c in self.cases)
        return values[max(0, math.ceil(0.95 * len(values)) - 1)] if values else 0.0

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "version": self.version, "model": self.model, "threshold": self.threshold,
                "pass_rate": self.pass_rate, "passed": self.passed, "total": len(self.cases),
                "p95_latency_ms": self.p95_latency_ms, "cases": [asdict(c) for c in self.cases]}


def _extract_json(text: str) -> Any:
    """The first JSON object or array inside ``text`` (promptfoo's contains-json), or raise ValueError."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text[i:])[0]
            except ValueError:
                continue
    raise ValueError("no JSON found in the output")


def _schema_check(value: Any, schema: Any) -> str | None:
    if not schema:
        return None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"schema: {exc.message}"
    return None


def check_json(kind: str, output: str, schema: Any) -> AssertionResult:
    try:
        value = json.loads(output) if kind == "is-json" else _extract_json(output)
    except ValueError as exc:
        return AssertionResult(kind, False, f"not JSON: {exc}")
    problem = _schema_check(value, schema)
    return AssertionResult(kind, problem is None, problem or "")


def check_deterministic(a: Assertion, output: str, latency_ms: float, cost: float) -> AssertionResult:
    checks = {
        "equals": lambda: output == a.value,
        "contains": lambda: a.value in output,
        "icontains": lambda: a.value.lower() in output.lower(),
        "not-contains": lambda: a.value not in output,
        "regex": lambda: re.search(a.value, output) is not None,
        "latency": lambda: latency_ms <= a.threshold,
        "cost": lambda: cost <= a.threshold,
    }
    if a.type in ("is-json", "contains-json"):
        return check_json(a.type, output, a.value)
    ok = checks[a.type]()
    reason = "" if ok else {"latency": f"{latency_ms:.0f} ms > {a.threshold} ms",
                            "cost": f"{cost:.6g} > {a.threshold}"}.get(a.type, f"output {output[:80]!r}")
    return AssertionResult(a.type, ok, reason)


JUDGE_SYSTEM = ("You grade an AI output against a rubric. Reply with JSON only: "
                '{"pass": true or false, "score": a number from 0 to 1, "reason": "one sentence"}.')


def v1_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _api_key(env_name: str | None) -> str | None:
    return os.environ.get(env_name) if env_name else None


async def judge_rubric(client: httpx.AsyncClient, judge: Judge | None, rubric: str, output: str) -> AssertionResult:
    """promptfoo's llm-rubric: the judge model decides; an unreachable or unclear judge is a failure."""
    if judge is None:
        return AssertionResult("llm-rubric", False, "no judge configured (suite 'judge' or --judge-url)")
    body = {"model": judge.model, "temperature": 0, "messages": [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Rubric:\n{rubric}\n\nOutput:\n{output}"}]}
    key = _api_key(judge.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = await client.post(v1_url(judge.base_url) + "/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        verdict = _extract_json(r.json()["choices"][0]["message"]["content"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        return AssertionResult("llm-rubric", False, f"judge failed: {type(exc).__name__}")
    if not isinstance(verdict, dict) or not isinstance(verdict.get("pass"), bool):
        return AssertionResult("llm-rubric", False, "judge gave no boolean 'pass'")
    return AssertionResult("llm-rubric", verdict["pass"], str(verdict.get("reason", ""))[:200])


@dataclass
class Target:
    """The live endpoint an eval runs against."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0


def _request_body(suite: Suite, resolved: Resolved, case: Case, model: str) -> dict:
    config = {**resolved.prompt.spec.config, **resolved.prompt.spec.versions.get(resolved.version).config} \
        if resolved.version in resolved.prompt.spec.versions else dict(resolved.prompt.spec.config)
    body = {"model": model, "temperature": suite.temperature, "max_tokens": suite.max_tokens}
    body.update({k: v for k, v in config.items() if k not in ("model", "messages", "stream")})
    body["messages"] = resolved.render(case.vars) + case.user_messages()
    return body


async def run_case(client: httpx.AsyncClient, suite: Suite, resolved: Resolved, case: Case,
                   target: Target) -> CaseResult:
    try:
        body = _request_body(suite, resolved, case, target.model)
    except PromptError as exc:
        return CaseResult(case.description, False, "", 0.0, 0.0, error=str(exc))
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    started = time.perf_counter()
    try:
        r = await client.post(v1_url(target.base_url) + "/chat/completions", json=body, headers=headers)
        latency_ms = (time.perf_counter() - started) * 1000
        r.raise_for_status()
        data = r.json()
        output = data["choices"][0]["message"].get("content") or ""
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        return CaseResult(case.description, False, "", (time.perf_counter() - started) * 1000, 0.0,
                          error=f"request failed: {type(exc).__name__}: {str(exc)[:200]}")
    usage = data.get("usage") or {}
    cost = (usage.get("prompt_tokens", 0) * suite.pricing.get("input_cost_per_token", 0.0)
            + usage.get("completion_tokens", 0) * suite.pricing.get("output_cost_per_token", 0.0))
    results = []
    for a in case.asserts:
        if a.type == "llm-rubric":
            results.append(await judge_rubric(client, suite.judge, a.value, output))
        else:
            results.append(check_deterministic(a, output, latency_ms, cost))
    return CaseResult(case.description, all(x.passed for x in results), output, latency_ms, cost, results)


async def run_suite(suite: Suite, resolved: Resolved, target: Target, on_case=None) -> SuiteResult:
    """Every case once, at most ``suite.concurrency`` at a time; results in the suite's order."""
    gate = asyncio.Semaphore(suite.concurrency)

    async def one(client: httpx.AsyncClient, case: Case) -> CaseResult:
        async with gate:
            result = await run_case(client, suite, resolved, case, target)
        if on_case is not None:
            on_case(result)
        return result

    async with httpx.AsyncClient(timeout=target.timeout_s) as client:
        cases = await asyncio.gather(*(one(client, c) for c in suite.cases))
    return SuiteResult(resolved.name, resolved.version, target.model, list(cases), suite.threshold)
