"""``tureen bench fuzz --base-url URL``: property-based fuzzing of a running server or gateway.

Generated cases come from the service's own ``/openapi.json`` through schemathesis (positive and
negative data for every operation); hand-written cases (``tureen.bench.fuzz_cases``) add what a
schema cannot produce: invalid UTF-8, huge bodies, deep nesting, thousands of stop strings, token
ids out of range, slow-loris clients and many concurrent tiny requests. The checks:

- no 5xx other than the documented 503/504;
- every 4xx carries the OpenAI error JSON, and every answer conforms to the documented statuses,
  content types and schemas (schemathesis' conformance checks);
- afterwards the service is healthy: ``/health`` answers 200, and (where ``/metrics`` has them)
  ``vllm:num_requests_running`` is back to 0 and the KV cache back to its idle usage.

Exit code 0 only when every check held. ``--save-result`` writes the full report as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from tureen.bench.fuzz_cases import CASES, CaseResult, Target, response_problems

SETTLE_S = 60.0  # how long in-flight work may take to drain after the run


@dataclass
class OperationResult:
    operation: str
    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # distinct failure -> a curl that reproduces it


@dataclass
class FuzzReport:
    base_url: str
    generated_cases: int = 0
    unexpected_5xx: int = 0
    operations: list[OperationResult] = field(default_factory=list)
    hand_written: list[CaseResult] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        found = [f"{op.operation}: {name}" for op in self.operations for name in op.failures]
        found += [f"{case.name}: {p}" for case in self.hand_written for p in case.problems]
        found += [f"health after the run: {p}" for p in self.health.get("problems", [])]
        return found

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["problems"] = self.problems
        return doc


# --------------------------------------------------------------------------- generated (schemathesis)


def _checks() -> list[Any]:
    from schemathesis.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    return [status_code_conformance, content_type_conformance, response_headers_conformance,
            response_schema_conformance]


def fuzz_operation(operation: Any, base_url: str, headers: dict[str, str], examples: int, seed: int,
                   progress: Any = None, model: str | None = None,
                   result: OperationResult | None = None, max_tokens: int | None = None) -> OperationResult:
    """``examples`` positive and as many negative cases for one operation; every failure recorded."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    result = result or OperationResult(f"{operation.method.upper()} {operation.path}")
    checks = _checks()

    def run_case(case: Any) -> None:
        result.cases += 1
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding, not a crash of the fuzzer
            result.failures.setdefault(f"no answer: {type(exc).__name__}", case.as_curl_command())
            return
        result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
        headers_list = [(k, v) for k, values in response.headers.items() for v in values]
        for problem in response_problems(httpx.Response(response.status_code, headers=headers_list,
                                                        content=response.content)):
            result.failures.setdefault(problem.split(":")[0], case.as_curl_command())
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis' FailureGroup: record, go on
            for failure in getattr(exc, "exceptions", [exc]):
                title = getattr(failure, "title", type(failure).__name__)
                result.failures.setdefault(f"{title} ({response.status_code})", case.as_curl_command())
        if progress is not None:
            progress()

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            strategy = operation.as_strategy(generation_mode=mode).map(
                lambda case: _capped(_served_model(case, model), max_tokens))
        except Exception as exc:  # noqa: BLE001 - e.g. no negative data is possible for a route without inputs
            result.failures.setdefault(f"cannot generate {mode.value} data: {exc}"[:200], "")
            continue
        test = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck), phases=[Phase.generate])(
            hypothesis_seed(seed)(given(case=strategy)(run_case)))
        try:
            test()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - e.g. hypothesis Unsatisfiable for a route with no inputs
            if "Unsatisfiable" not in type(exc).__name__:
                result.failures.setdefault(f"generator error: {type(exc).__name__}: {exc}"[:200], "")
    return result


def _served_model(case: Any, model: str | None) -> Any:
    """Most generated bodies name the served model, so they get past routing into the real checks."""
    body = case.body
    if model and isinstance(body, dict) and isinstance(body.get("model"), str) and hash(str(body)) % 5:
        body["model"] = model
    if model and case.path_parameters and "model_id" in case.path_parameters and hash(str(case.path_parameters)) % 2:
        case.path_parameters["model_id"] = model
    return case


def _capped(case: Any, max_tokens: int | None) -> Any:
    """With ``--max-tokens``: a generation body asks for at most that many tokens (absent: exactly that many).

    Generating is what makes a case slow (seconds on a busy CPU), not what the fuzzing tests; invalid values
    (negative, not an integer) are left as they are, so the validation paths still see them."""
    body = case.body
    if max_tokens is None or not isinstance(body, dict) or not ("prompt" in body or "messages" in body):
        return case
    fields = [f for f in ("max_tokens", "max_completion_tokens") if f in body]
    for name in fields:
        value = body[name]
        if isinstance(value, int) and not isinstance(value, bool) and value > max_tokens:
            body[name] = max_tokens
    if not fields:
        body["max_tokens"] = max_tokens
    return case


def fuzz_generated(base_url: str, headers: dict[str, str], cases: int, seed: int, quiet: bool,
                   model: str | None = None, max_passes: int = 6,
                   max_tokens: int | None = None) -> list[OperationResult]:
    """Spread ``cases`` over the operations; what one with few possible inputs cannot use goes to the rest."""
    import schemathesis
    from rich.progress import Progress

    schema = schemathesis.openapi.from_url(base_url.rstrip("/") + "/openapi.json", headers=headers)
    operations = [r.ok() for r in schema.get_all_operations()]
    results = [OperationResult(f"{op.method.upper()} {op.path}") for op in operations]
    active = list(range(len(operations)))
    with Progress(disable=quiet, transient=True) as progress:
        task = progress.add_task("generated cases", total=cases)
        for attempt in range(max_passes):
            remaining = cases - sum(r.cases for r in results)
            if remaining <= 0 or not active:
                break
            per_mode = max(1, -(-remaining // (2 * len(active))))
            for i in list(active):
                before = results[i].cases
                fuzz_operation(operations[i], base_url, headers, per_mode, seed + 1000 * attempt + i,
                               lambda: progress.advance(task), model, results[i], max_tokens)
                if results[i].cases - before < per_mode:  # exhausted: hypothesis found no new inputs
                    active.remove(i)
    return results


# --------------------------------------------------------------------------- health afterwards


def _metric(text: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def metrics_snapshot(client: httpx.Client) -> dict[str, float | None]:
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return {}
    return {name: _metric(text, name) for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                   "vllm:kv_cache_usage_perc")}


def check_health(target: Target, idle: dict[str, float | None], engine: Target | None = None,
                 settle_s: float = SETTLE_S) -> dict[str, Any]:
    """/health 200, nothing running or waiting, KV usage back to what it was before the run."""
    deadline = time.monotonic() + settle_s
    with target.client() as c, (engine or target).client() as m:
        while True:
            status = _health_status(c)
            now = metrics_snapshot(m)
            settled = (status == 200 and not now.get("vllm:num_requests_running")
                       and not now.get("vllm:num_requests_waiting")
                       and now.get("vllm:kv_cache_usage_perc") == idle.get("vllm:kv_cache_usage_perc"))
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    problems = []
    if status != 200:
        problems.append(f"/health answered {status}")
    if now.get("vllm:num_requests_running"):
        problems.append(f"{now['vllm:num_requests_running']:g} requests still running")
    if now.get("vllm:num_requests_waiting"):
        problems.append(f"{now['vllm:num_requests_waiting']:g} requests still waiting")
    if now.get("vllm:kv_cache_usage_perc") != idle.get("vllm:kv_cache_usage_perc"):
        problems.append(f"KV usage {now.get('vllm:kv_cache_usage_perc')} != idle {idle.get('vllm:kv_cache_usage_perc')}")
    return {"status": status, "metrics": now, "idle_metrics": idle, "problems": problems}


def _health_status(client: httpx.Client) -> int | None:
    try:
        return client.get("/health").status_code
    except httpx.HTTPError:
        return None


# --------------------------------------------------------------------------- the run


def served_model(target: Target) -> str | None:
    with target.client() as c:
        try:
            data = c.get("/v1/models").json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
    return data[0]["id"] if data else None


def run_fuzz(base_url: str, api_key: str | None = None, cases: int = 5000, seed: int = 0,
             hand_written: tuple[str, ...] | None = tuple(CASES), quiet: bool = False,
             case_args: dict[str, dict[str, Any]] | None = None, metrics_url: str | None = None,
             max_tokens: int | None = None) -> FuzzReport:
    """Fuzz ``base_url``; ``metrics_url`` (default: the same) is where running requests and KV usage are read."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = Target(base_url.rstrip("/"), headers, None)
    target.model = served_model(target)
    engine = Target((metrics_url or base_url).rstrip("/"), headers, None)
    with engine.client() as c:
        idle = metrics_snapshot(c)
    report = FuzzReport(target.base_url)
    start = time.monotonic()
    if cases > 0:
        report.operations = fuzz_generated(target.base_url, headers, cases, seed, quiet, target.model,
                                           max_tokens=max_tokens)
    for name in hand_written or ():
        report.hand_written.append(CASES[name](target, **(case_args or {}).get(name, {})))
    report.health = check_health(target, idle, engine)
    report.seconds = round(time.monotonic() - start, 1)
    report.generated_cases = sum(op.cases for op in report.operations)
    report.unexpected_5xx = sum(n for op in report.operations for s, n in op.statuses.items()
                                if s >= 500 and s not in (503, 504))
    report.unexpected_5xx += sum(n for case in report.hand_written for s, n in case.statuses.items()
                                 if s >= 500 and s not in (503, 504))
    return report


def print_report(report: FuzzReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"fuzz {report.base_url}: {report.generated_cases} generated cases in {report.seconds:g} s")
    for column in ("operation / case", "sent", "statuses", "problems"):
        table.add_column(column)
    for op in report.operations:
        table.add_row(op.operation, str(op.cases), _statuses(op.statuses), "\n".join(op.failures) or "-")
    for case in report.hand_written:
        table.add_row(f"{case.name} ({case.note})" if case.note else case.name, str(case.sent),
                      _statuses(case.statuses), "\n".join(case.problems[:5]) or "-")
    console.print(table)
    health = report.health
    console.print(f"after the run: /health {health.get('status')}, metrics {health.get('metrics')}")
    console.print(f"unexpected 5xx: {report.unexpected_5xx}; problems: {len(report.problems)}")


def _statuses(statuses: dict[int, int]) -> str:
    return " ".join(f"{s}x{n}" for s, n in sorted(statuses.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="The service to fuzz, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY' (default: none).")
    parser.add_argument("--cases", type=int, default=5000,
                        help="Generated cases in all, split evenly over the operations and over positive and "
                             "negative data (default: 5000; 0 runs the hand-written cases only).")
    parser.add_argument("--metrics-url", default=None,
                        help="Where to read vllm:num_requests_running and the KV usage for the after-run check "
                             "(for a gateway: one of its engines). Default: --base-url.")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="Cap the generated bodies' max_tokens / max_completion_tokens at this (and set it "
                             "where absent), so a slow CPU engine gets through thousands of cases; invalid values "
                             "stay as generated (default: no cap).")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default: 0).")
    parser.add_argument("--skip-hand-written", action="store_true", help="Only the generated cases.")
    parser.add_argument("--cases-only", default=None,
                        help=f"Comma-separated hand-written cases to run (default: all: {', '.join(CASES)}).")
    parser.add_argument("--save-result", default=None, help="Write the report as JSON to this path.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = tuple(CASES) if args.cases_only is None else tuple(n.strip() for n in args.cases_only.split(","))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"tureen bench fuzz: error: unknown cases {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    report = run_fuzz(args.base_url, args.api_key, args.cases, args.seed, () if args.skip_hand_written else names,
                      metrics_url=args.metrics_url, max_tokens=args.max_tokens)
    print_report(report)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(report.to_json(), f, indent=2, default=str)
    return 0 if not report.problems else 1
