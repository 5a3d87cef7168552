"""Changes to a registry: scaffold a version, the promotion gate, tag moves committed to git, rollback."""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tureen.prompts.evals import SuiteResult
from tureen.prompts.gitrepo import GitError, GitRepo
from tureen.prompts.registry import SPEC_FILE, TAGS_FILE, PromptError, Registry, load_snapshot
from tureen.prompts.spec import NAME_RE, TagEntry, parse_tags, version_number

FIRST_TEMPLATE = "You are a helpful assistant for {{ product }}.\nAnswer in {{ language }}.\n"


def _dump(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def scaffold(root: Path, name: str) -> list[Path]:
    """``new NAME``: the next version from the latest, or a first version, prompt.yaml and an eval skeleton."""
    if not NAME_RE.fullmatch(name):
        raise PromptError(f"'{name}' is not a prompt name (lowercase letters, digits, '.', '_', '-')")
    directory = root / name
    spec_path = directory / SPEC_FILE
    if spec_path.exists():
        spec = yaml.safe_load(spec_path.read_text()) or {}
        versions = sorted((p.name[:-7] for p in directory.glob("v*.jinja2")), key=version_number)
        latest = versions[-1]
        new = f"v{version_number(latest) + 1}"
        (directory / f"{new}.jinja2").write_text((directory / f"{latest}.jinja2").read_text())
        previous = (spec.get("versions") or {}).get(latest, {})
        spec.setdefault("versions", {})[new] = {"models": list(previous.get("models", []))}
        _dump(spec_path, spec)
        return [directory / f"{new}.jinja2", spec_path]
    (directory / "evals").mkdir(parents=True, exist_ok=True)
    (directory / "v1.jinja2").write_text(FIRST_TEMPLATE)
    _dump(spec_path, {"type": "text", "description": f"{name} system prompt",
                      "variables": {"product": {"type": "string", "default": "tureen"},
                                    "language": {"type": "enum", "values": ["English", "French"],
                                                 "default": "English"}},
                      "versions": {"v1": {"models": []}}, "evals": f"evals/{name}.yaml",
                      "allow_uncertified": "refuse"})
    _dump(directory / "evals" / f"{name}.yaml",
          {"threshold": 1.0, "concurrency": 4, "max_latency_growth_pct": 50, "max_tokens": 16,
           "cases": [{"description": "answers a greeting", "vars": {"product": "tureen"}, "user": "Hello!",
                      "assert": [{"type": "not-contains", "value": "I cannot"}]}]})
    return [directory / "v1.jinja2", spec_path, directory / "evals" / f"{name}.yaml"]


def diff_versions(registry: Registry, name: str, v1: str, v2: str) -> str:
    prompt = registry.get(name)
    for v in (v1, v2):
        if v not in prompt.sources:
            raise PromptError(f"prompt '{name}' has no version '{v}'", 404)
    lines = list(difflib.unified_diff(prompt.sources[v1].splitlines(keepends=True),
                                      prompt.sources[v2].splitlines(keepends=True),
                                      f"{name}/{v1}.jinja2", f"{name}/{v2}.jinja2"))
    models = {v: prompt.spec.versions[v].models if v in prompt.spec.versions else [] for v in (v1, v2)}
    if models[v1] != models[v2]:
        lines.append(f"certified models: {v1} {models[v1]} -> {v2} {models[v2]}\n")
    return "".join(lines)


def ever_tagged(repo: GitRepo, root: Path) -> dict[str, set[str]]:
    """Every version any committed tags.yaml (or the working one) has named, by prompt."""
    tagged: dict[str, set[str]] = {}
    texts = [repo.committed_text(root / TAGS_FILE, c["sha"]) for c in repo.log(root / TAGS_FILE)]
    if (root / TAGS_FILE).exists():
        texts.append((root / TAGS_FILE).read_text())
    for text in texts:
        try:
            tags = parse_tags(yaml.safe_load(text or "") or {})
        except Exception:  # an old malformed commit names nothing
            continue
        for name, entry in tags.items():
            tagged.setdefault(name, set()).update(entry.tags().values())
    return tagged


def edited_tagged_versions(repo: GitRepo, root: Path, rev: str = "HEAD") -> list[str]:
    """Tagged versions whose template differs from the one at ``rev``: tagged versions are immutable."""
    edited = []
    for name, versions in ever_tagged(repo, root).items():
        for version in sorted(versions):
            path = root / name / f"{version}.jinja2"
            committed = repo.committed_text(path, rev)
            if committed is not None and (not path.exists() or path.read_text() != committed):
                edited.append(f"{name}/{version}.jinja2")
    return edited


def preflight(repo: GitRepo, root: Path, name: str, version: str | None = None) -> None:
    """What every tag move checks first: a git work tree, a clean tags.yaml, untouched tagged versions."""
    if not repo.is_repo():
        raise PromptError(f"{root} is not inside a git repository")
    if (root / TAGS_FILE).exists() and repo.dirty(root / TAGS_FILE):
        raise PromptError(f"{root / TAGS_FILE} has uncommitted changes: commit or discard them first")
    edited = edited_tagged_versions(repo, root)
    if edited:
        raise PromptError(f"tagged versions are immutable, but these were edited: {', '.join(edited)}; "
                          f"make a new version with 'tureen prompts new {name}'")
    if version is not None:
        path = root / name / f"{version}.jinja2"
        if repo.committed_text(path) is None or repo.dirty(path):
            raise PromptError(f"{name}/{version}.jinja2 is not committed as it is: commit it before tagging it")


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def gate(new: SuiteResult, stable: SuiteResult | None, threshold: float, max_latency_growth_pct: float,
         latency_slack_ms: float = 0.0) -> GateDecision:
    """Refuse below the threshold, on a regression against the current stable, or on p95 latency growth."""
    reasons = []
    if new.pass_rate < threshold:
        reasons.append(f"pass rate {new.pass_rate:.0%} is below the threshold {threshold:.0%}")
    if stable is not None:
        if new.pass_rate < stable.pass_rate:
            reasons.append(f"regression: {new.pass_rate:.0%} against {stable.pass_rate:.0%} for stable "
                           f"{stable.version}")
        limit = max(stable.p95_latency_ms * (1 + max_latency_growth_pct / 100),
                    stable.p95_latency_ms + latency_slack_ms)
        if new.p95_latency_ms > limit:
            reasons.append(f"p95 latency {new.p95_latency_ms:.0f} ms grew more than {max_latency_growth_pct:g}% "
                           f"over stable {stable.version}'s {stable.p95_latency_ms:.0f} ms")
    return GateDecision(not reasons, reasons)


def results_path(root: Path, name: str, suite_path: Path, version: str) -> Path:
    return suite_path.parent / "results" / f"{name}-{version}.json"


def write_results(path: Path, new: SuiteResult, stable: SuiteResult | None, decision: GateDecision | None,
                  forced: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"finished_at": time.time(), "candidate": new.to_json(), "stable": stable.to_json() if stable else None,
            "gate": None if decision is None else {"passed": decision.passed, "reasons": decision.reasons},
            "forced": forced}
    path.write_text(json.dumps(body, indent=2) + "\n")


def _score(result: SuiteResult | None) -> str:
    if result is None:
        return "n/a"
    return f"{result.pass_rate:.3f} ({result.passed}/{len(result.cases)}), p95 {result.p95_latency_ms:.0f} ms"


def commit_message(action: str, name: str, tag: str, old: str | None, new: str | None, who: str, *,
                   score: SuiteResult | None = None, stable_score: SuiteResult | None = None,
                   forced: bool = False, reasons: list[str] | None = None, weight: float | None = None) -> str:
    score_text = f"eval {score.passed}/{len(score.cases)}" if score else "no eval"
    subject = f"prompts: {action} {name} {tag} {old or 'none'} -> {new or 'none'} ({score_text}" \
              f"{', FORCED' if forced else ''})"
    lines = [subject, "", f"who: {who}", f"what: {action} {tag}", f"prompt: {name}", f"from: {old or 'none'}",
             f"to: {new or 'none'}", f"score: {_score(score)}", f"stable-score: {_score(stable_score)}",
             f"forced: {'yes' if forced else 'no'}"]
    if weight is not None:
        lines.append(f"canary-weight: {weight:g}")
    lines += [f"refused-by-gate: {r}" for r in reasons or []]
    return "\n".join(lines) + "\n"


def read_tags(root: Path) -> dict:
    path = root / TAGS_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def move_tag(root: Path, name: str, tag: str, version: str | None, weight: float | None) -> tuple[str | None, dict]:
    """The new tags.yaml content with ``name.tag = version``; returns the old version too. Validates it loads."""
    data = read_tags(root)
    entry = TagEntry.model_validate(data.get(name) or {})
    old = getattr(entry, tag)
    changes: dict = {tag: version}
    if tag == "canary" and weight is not None:
        changes["canary_weight"] = weight
    if tag == "stable" and entry.canary == version:  # the canary graduated
        changes.update(canary=None, canary_weight=0.0)
    entry = entry.model_copy(update=changes)
    data[name] = {k: v for k, v in entry.model_dump().items() if v is not None and not (k == "canary_weight" and
                                                                                       not entry.canary)}
    return old, data


def commit_tags(root: Path, data: dict, extra: list[Path], message: str) -> str:
    """Write tags.yaml, check that the registry still loads, commit it with the results in one commit."""
    path = root / TAGS_FILE
    before = path.read_text() if path.exists() else None
    _dump(path, data)
    try:
        load_snapshot(root)
    except ValueError as exc:
        _restore(path, before)
        raise PromptError(f"the new tags.yaml would not load: {exc}") from None
    try:
        return GitRepo(root).commit([path, *extra], message)
    except GitError:
        _restore(path, before)  # a failed commit leaves tags.yaml as it was
        raise


def _restore(path: Path, before: str | None) -> None:
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(before)


def previous_stable(repo: GitRepo, root: Path, name: str, current: str | None) -> str | None:
    """The stable version before ``current``, from the git history of tags.yaml (newest first)."""
    for entry in repo.log(root / TAGS_FILE):
        text = repo.committed_text(root / TAGS_FILE, entry["sha"]) or ""
        try:
            stable = parse_tags(yaml.safe_load(text) or {}).get(name, TagEntry()).stable
        except Exception:
            continue
        if stable is not None and stable != current:
            return stable
    return None
