"""``tureen prompts list|show|render|new|diff|eval|promote|rollback|history``.

Works on a registry directory inside a git work tree (``--registry``, default ``./prompts``). Every
tag move is one git commit of ``tags.yaml`` (and the eval results), with who, what, from, to and the
score in its message. The eval endpoint's API key comes from ``--api-key-env NAME`` (default
``OPENAI_API_KEY``), never from a flag value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from tureen.prompts import lifecycle
from tureen.prompts.evals import Judge, SuiteResult, Target, load_suite, run_suite
from tureen.prompts.gitrepo import GitError, GitRepo
from tureen.prompts.registry import PromptError, Registry, Resolved

console = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("prompts", help="The prompt registry: versions, tags, evals, promotion.",
                                   description=(__doc__ or "").replace("``", ""),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=Path("prompts"), help="registry directory (./prompts)")
    actions = parser.add_subparsers(dest="prompts_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="Every prompt with its versions and tags.")
    show = actions.add_parser("show", help="One version's template and settings.")
    show.add_argument("name")
    _pick(show)
    render = actions.add_parser("render", help="Render a version to chat messages (JSON).")
    render.add_argument("name")
    _pick(render)
    render.add_argument("--var", action="append", default=[], metavar="K=V", help="a variable (repeatable)")
    render.add_argument("--user", help="sticky key for the canary assignment of tag 'stable'")
    new = actions.add_parser("new", help="Scaffold the next version (or a new prompt).")
    new.add_argument("name")
    diff = actions.add_parser("diff", help="Unified diff of two versions.")
    diff.add_argument("name")
    diff.add_argument("v1")
    diff.add_argument("v2")
    ev = actions.add_parser("eval", help="Run a version's eval suite against a live endpoint.")
    ev.add_argument("name")
    ev.add_argument("--version", required=True)
    _endpoint(ev)
    promote = actions.add_parser("promote", help="Eval, gate, then move a tag (one git commit).")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--to", choices=["stable", "canary"], required=True)
    promote.add_argument("--canary-weight", type=float, help="percent of 'stable' traffic for the canary")
    promote.add_argument("--max-latency-growth", type=float, help="p95 growth allowed, percent (suite default 50)")
    promote.add_argument("--force", action="store_true", help="move the tag even if the gate refuses (recorded)")
    _endpoint(promote)
    rollback = actions.add_parser("rollback", help="Move 'stable' back to the previous stable version.")
    rollback.add_argument("name")
    history = actions.add_parser("history", help="Tag moves of a prompt, from git.")
    history.add_argument("name")
    check = actions.add_parser("check", help="CI check: the registry loads and no tagged version was edited.")
    check.add_argument("--against", default="HEAD", metavar="REV",
                       help="compare tagged versions with this git revision (e.g. origin/main in a pull request)")
    parser.set_defaults(func=run)


def _pick(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tag", choices=["stable", "canary"])
    group.add_argument("--version")


def _endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model to run on (default: the version's first certified model)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-url", help="judge endpoint for llm-rubric (overrides the suite's judge)")
    p.add_argument("--judge-model", default=None)


def run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.prompts_command](args)
    except (PromptError, GitError) as exc:
        err.print(f"error: {exc}", markup=False)
        return 1


def _registry(args) -> Registry:
    if not args.registry.is_dir():
        raise PromptError(f"no prompt registry at {args.registry} (use --registry or 'tureen prompts new NAME')")
    try:
        return Registry(args.registry)
    except ValueError as exc:
        raise PromptError(str(exc)) from None


def cmd_list(args) -> int:
    registry = _registry(args)
    table = Table("name", "type", "versions", "stable", "canary", "certified (stable)")
    for name in registry.names():
        prompt, tags = registry.get(name), registry.tags(name)
        canary = f"{tags.canary} ({tags.canary_weight:g}%)" if tags.canary else "-"
        spec = prompt.spec.versions.get(tags.stable or "")
        table.add_row(name, prompt.spec.type, " ".join(prompt.versions()), tags.stable or "-", canary,
                      ", ".join(spec.models) if spec else "-")
    console.print(table)
    return 0


def _resolve(registry: Registry, args, sticky: str | None = None) -> Resolved:
    if args.version is None and args.tag is None:
        prompt, tags = registry.get(args.name), registry.tags(args.name)
        if tags.stable is None:  # an untagged prompt: its latest version
            return registry.resolve(args.name, version=prompt.latest())
    return registry.resolve(args.name, tag=args.tag, version=args.version, sticky_key=sticky)


def cmd_show(args) -> int:
    registry = _registry(args)
    resolved = _resolve(registry, args)
    spec = resolved.prompt.spec
    tags = [t for t, v in registry.tags(args.name).tags().items() if v == resolved.version]
    certified = spec.versions[resolved.version].models if resolved.version in spec.versions else []
    console.print(f"[bold]{resolved.name} {resolved.version}[/bold]  type: {spec.type}  "
                  f"tags: {', '.join(tags) or '-'}  certified: {', '.join(certified) or '-'}")
    for name, var in spec.variables.items():
        extra = f" one of {var.values}" if var.values else ""
        console.print(f"  {name}: {var.type}{extra}" + (f" = {var.default!r}" if var.default is not None else ""),
                      markup=False)
    console.print("---", markup=False)
    console.print(resolved.prompt.sources[resolved.version].rstrip("\n"), markup=False)
    return 0


def _parse_vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PromptError(f"--var {item!r}: use K=V")
        out[key] = value
    return out


def cmd_render(args) -> int:
    registry = _registry(args)
    resolved = _resolve(registry, args, sticky=args.user)
    messages = resolved.render(_parse_vars(args.var))
    console.print(f"# {resolved.name} {resolved.version} ({resolved.tag or 'by version'})", markup=False)
    print(json.dumps(messages, indent=2, ensure_ascii=False))
    return 0


def cmd_new(args) -> int:
    args.registry.mkdir(parents=True, exist_ok=True)
    for path in lifecycle.scaffold(args.registry, args.name):
        console.print(f"wrote {path}", markup=False)
    return 0


def cmd_diff(args) -> int:
    text = lifecycle.diff_versions(_registry(args), args.name, args.v1, args.v2)
    sys.stdout.write(text or f"{args.v1} and {args.v2} are identical\n")
    return 0


def _target(args, resolved: Resolved) -> Target:
    spec = resolved.prompt.spec.versions.get(resolved.version)
    model = args.model or (spec.models[0] if spec and spec.models else None)
    if model is None:
        raise PromptError(f"{resolved.name} {resolved.version} lists no certified model: pass --model")
    return Target(args.base_url, model, os.environ.get(args.api_key_env))


def _suite(args, registry: Registry, name: str):
    prompt = registry.get(name)
    if not prompt.spec.evals:
        raise PromptError(f"{name}/prompt.yaml names no eval suite ('evals: evals/{name}.yaml')")
    path = prompt.directory / prompt.spec.evals
    suite = load_suite(path)
    if args.judge_url:
        suite.judge = Judge(base_url=args.judge_url, model=args.judge_model or "judge")
    return path, suite


def _run_eval(suite, resolved: Resolved, target: Target) -> SuiteResult:
    columns = (TextColumn(f"eval {resolved.name} {resolved.version} on {target.model}"), BarColumn(),
               MofNCompleteColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("cases", total=len(suite.cases))
        result = asyncio.run(run_suite(suite, resolved, target, lambda _: progress.advance(task)))
    _print_result(result)
    return result


def _print_result(result: SuiteResult) -> None:
    table = Table("case", "pass", "latency ms", "assertions", "output", title=f"{result.prompt} {result.version}")
    for case in result.cases:
        failed = [f"{a.type}: {a.reason}" for a in case.assertions if not a.passed]
        table.add_row(case.description or "-", "yes" if case.passed else "NO", f"{case.latency_ms:.0f}",
                      case.error or ("; ".join(failed) if failed else f"{len(case.assertions)} ok"),
                      case.output[:40])
    console.print(table)
    console.print(f"pass rate {result.pass_rate:.0%} ({result.passed}/{len(result.cases)}), "
                  f"p95 latency {result.p95_latency_ms:.0f} ms", markup=False)


def cmd_eval(args) -> int:
    registry = _registry(args)
    resolved = registry.resolve(args.name, version=args.version)
    path, suite = _suite(args, registry, args.name)
    result = _run_eval(suite, resolved, _target(args, resolved))
    out = lifecycle.results_path(args.registry, args.name, path, args.version)
    lifecycle.write_results(out, result, None, None, False)
    console.print(f"results: {out}", markup=False)
    return 0 if result.pass_rate >= suite.threshold else 1


def _gate_runs(args, registry: Registry, name: str, version: str):
    """The candidate's and the current stable's runs of the suite, on the same model and endpoint."""
    path, suite = _suite(args, registry, name)
    candidate = registry.resolve(name, version=version)
    target = _target(args, candidate)
    if not candidate.certified(target.model) and not args.force:
        raise PromptError(f"{name} {version} is not certified for model '{target.model}' (prompt.yaml "
                          f"versions.{version}.models)")
    new = _run_eval(suite, candidate, target)
    stable_version = registry.tags(name).stable
    stable = None
    if stable_version is not None and stable_version != version:
        stable = _run_eval(suite, registry.resolve(name, version=stable_version), target)
    growth = args.max_latency_growth if args.max_latency_growth is not None else suite.max_latency_growth_pct
    return path, new, stable, lifecycle.gate(new, stable, suite.threshold, growth,
                                                       suite.latency_slack_ms)


def cmd_promote(args) -> int:
    root, repo = args.registry, GitRepo(args.registry)
    lifecycle.preflight(repo, root, args.name, args.version)
    registry = _registry(args)
    if args.version not in registry.get(args.name).sources:
        raise PromptError(f"prompt '{args.name}' has no version '{args.version}'")
    suite_path, new, stable, decision = _gate_runs(args, registry, args.name, args.version)
    results = lifecycle.results_path(root, args.name, suite_path, args.version)
    lifecycle.write_results(results, new, stable, decision, args.force)
    if not decision.passed:
        for reason in decision.reasons:
            err.print(f"gate: {reason}", markup=False)
        if not args.force:
            err.print(f"refused: {args.name} {args.to} stays {registry.tags(args.name).tags().get(args.to, 'none')}"
                      f" (results in {results})", markup=False)
            return 1
    old, data = lifecycle.move_tag(root, args.name, args.to, args.version, args.canary_weight if args.to ==
                                   "canary" else None)
    weight = data[args.name].get("canary_weight") if args.to == "canary" else None
    message = lifecycle.commit_message("promote", args.name, args.to, old, args.version, repo.user(), score=new,
                                       stable_score=stable, forced=args.force and not decision.passed,
                                       reasons=decision.reasons, weight=weight)
    sha = lifecycle.commit_tags(root, data, [results], message)
    console.print(f"{args.name} {args.to}: {old or 'none'} -> {args.version}  (commit {sha[:10]})", markup=False)
    return 0


def cmd_rollback(args) -> int:
    root, repo = args.registry, GitRepo(args.registry)
    lifecycle.preflight(repo, root, args.name)
    registry = _registry(args)
    registry.get(args.name)
    current = registry.tags(args.name).stable
    target = lifecycle.previous_stable(repo, root, args.name, current)
    if target is None:
        raise PromptError(f"'{args.name}' has no earlier stable version in the history of tags.yaml")
    _, data = lifecycle.move_tag(root, args.name, "stable", target, None)
    message = lifecycle.commit_message("rollback", args.name, "stable", current, target, repo.user())
    sha = lifecycle.commit_tags(root, data, [], message)
    console.print(f"{args.name} stable: {current} -> {target}  (rollback, commit {sha[:10]})", markup=False)
    return 0


def cmd_history(args) -> int:
    repo = GitRepo(args.registry)
    table = Table("date", "commit", "who", "what", "from", "to", "score")
    for entry in repo.log(args.registry / lifecycle.TAGS_FILE):
        fields = dict(line.split(": ", 1) for line in entry["body"].splitlines() if ": " in line)
        if fields.get("prompt") != args.name:
            continue
        what = fields.get("what", "") + (" (forced)" if fields.get("forced") == "yes" else "")
        table.add_row(entry["date"][:19], entry["sha"][:10], fields.get("who", entry["author"]), what,
                      fields.get("from", ""), fields.get("to", ""), fields.get("score", ""))
    console.print(table)
    return 0


def cmd_check(args) -> int:
    registry = _registry(args)
    edited = lifecycle.edited_tagged_versions(GitRepo(args.registry), args.registry, args.against)
    if edited:
        raise PromptError(f"tagged versions are immutable, but these differ from {args.against}: "
                          f"{', '.join(edited)}")
    broken = [f"{n}/{v}: {e}" for n in registry.names() for v, e in registry.get(n).broken.items()]
    for line in broken:
        err.print(f"warning: untagged version does not compile: {line}", markup=False)
    console.print(f"ok: {len(registry.names())} prompts, tags valid, tagged versions unchanged since "
                  f"{args.against}", markup=False)
    return 0


COMMANDS = {"check": cmd_check, "list": cmd_list, "show": cmd_show, "render": cmd_render, "new": cmd_new,
            "diff": cmd_diff, "eval": cmd_eval, "promote": cmd_promote, "rollback": cmd_rollback,
            "history": cmd_history}
