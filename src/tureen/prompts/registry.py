"""A registry directory loaded into an immutable snapshot; lookup, canary assignment, pinning, rendering.

``Registry`` is the one interface the gateway uses. ``reload_if_changed`` polls ``tags.yaml``'s mtime
and the git HEAD; a change that does not load (bad YAML, unknown version, template syntax error in a
tagged version) is logged and the last good snapshot stays in place.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tureen.prompts.gitrepo import GitRepo
from tureen.prompts.render import RenderError, compile_template, render_text, to_messages, validate_variables
from tureen.prompts.spec import TAGS, PromptSpec, TagEntry, parse_tags, version_number

logger = logging.getLogger("tureen.prompts")
TAGS_FILE = "tags.yaml"
SPEC_FILE = "prompt.yaml"


class PromptError(ValueError):
    """A lookup or render failure the caller can show as a 400 or 404; ``param`` names the culprit."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str = "invalid_prompt"):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class Prompt:
    name: str
    directory: Path
    spec: PromptSpec
    sources: dict[str, str]  # version -> template text
    templates: dict[str, Any]  # version -> compiled template
    broken: dict[str, str]  # version -> syntax error (untagged versions only)

    def versions(self) -> list[str]:
        return sorted(set(self.sources) | set(self.broken), key=version_number)

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None


@dataclass(frozen=True)
class Snapshot:
    prompts: dict[str, Prompt]
    tags: dict[str, TagEntry]
    head: str | None = None
    mtime: float | None = None


@dataclass(frozen=True)
class Resolved:
    """One request's prompt: the version that serves it and the tag it was served under."""

    name: str
    version: str
    tag: str | None  # stable, canary, or None when a version was asked for
    prompt: Prompt = field(repr=False)

    def certified(self, model: str) -> bool:
        spec = self.prompt.spec.versions.get(self.version)
        return spec is not None and model in spec.models

    def render(self, variables: dict[str, Any] | None) -> list[dict[str, str]]:
        if self.version in self.prompt.broken:
            raise PromptError(f"{self.name} {self.version}: {self.prompt.broken[self.version]}", param="prompt")
        where = f"{self.name} {self.version}"
        try:
            values = validate_variables(self.prompt.spec, variables)
            text = render_text(self.prompt.templates[self.version], values, where)
            return to_messages(text, self.prompt.spec.type)
        except RenderError as exc:
            param = f"prompt.variables.{exc.param}" if exc.param else "prompt"
            raise PromptError(str(exc), param=param) from None


def _load_prompt(directory: Path, tagged: set[str]) -> Prompt:
    spec_path = directory / SPEC_FILE
    try:
        spec = PromptSpec.model_validate(yaml.safe_load(spec_path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{spec_path}: {_short(exc)}") from None
    sources, templates, broken = {}, {}, {}
    for path in directory.glob("v*.jinja2"):
        version = path.name[: -len(".jinja2")]
        try:
            version_number(version)
        except ValueError:
            continue
        sources[version] = path.read_text()
        try:
            templates[version] = compile_template(sources[version], f"{directory.name}/{path.name}")
        except RenderError as exc:
            if version in tagged:
                raise ValueError(str(exc)) from None
            broken[version] = str(exc)
    return Prompt(directory.name, directory, spec, sources, templates, broken)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_snapshot(root: Path) -> Snapshot:
    """Read the whole registry; raises ``ValueError`` with one line naming the file and the problem."""
    tags_path = root / TAGS_FILE
    try:
        tags = parse_tags(yaml.safe_load(tags_path.read_text())) if tags_path.exists() else {}
    except (yaml.YAMLError, ValidationError, ValueError) as exc:
        raise ValueError(f"{tags_path}: {_short(exc)}") from None
    prompts: dict[str, Prompt] = {}
    for directory in sorted(p for p in root.iterdir() if (p / SPEC_FILE).is_file()):
        entry = tags.get(directory.name, TagEntry())
        prompts[directory.name] = _load_prompt(directory, set(entry.tags().values()))
    for name, entry in tags.items():
        if name not in prompts:
            raise ValueError(f"{tags_path}: '{name}' has no directory with a {SPEC_FILE}")
        for tag, version in entry.tags().items():
            if version not in prompts[name].sources:
                raise ValueError(f"{tags_path}: {name}.{tag} = {version}, but {name}/{version}.jinja2 does not exist")
    mtime = tags_path.stat().st_mtime if tags_path.exists() else None
    return Snapshot(prompts, tags, GitRepo(root).head(), mtime)


def canary_bucket(name: str, sticky_key: str) -> float:
    """A stable number in [0, 100) for one (prompt, user or key): the same user always lands the same side."""
    digest = hashlib.sha256(f"{name}\x00{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000 / 100


class Registry:
    """The registry at ``root``; thread-safe snapshot swaps, never a half-loaded state."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self.snapshot = load_snapshot(self.root)
        self.last_error: str | None = None

    @classmethod
    def degraded(cls, root: Path | str) -> Registry:
        """The registry at ``root``, or, when it does not load, an empty one holding the error; the
        gateway's poll keeps retrying, so a fixed registry is picked up without a restart."""
        try:
            return cls(root)
        except (ValueError, OSError) as exc:
            registry = cls.__new__(cls)
            registry.root, registry._lock = Path(root), threading.Lock()
            registry.snapshot, registry.last_error = Snapshot({}, {}), str(exc)
            logger.error("prompt registry did not load; prompt requests get 503 until it does: %s", exc)
            return registry

    def reload_if_changed(self) -> bool:
        """Reload when tags.yaml's mtime or the git HEAD moved; True when a new snapshot was taken."""
        tags_path = self.root / TAGS_FILE
        try:
            mtime = tags_path.stat().st_mtime if tags_path.exists() else None
        except OSError:
            mtime = None
        if mtime == self.snapshot.mtime and GitRepo(self.root).head() == self.snapshot.head:
            return False
        return self.reload()

    def reload(self) -> bool:
        try:
            snapshot = load_snapshot(self.root)
        except (ValueError, OSError) as exc:
            if str(exc) != self.last_error:
                logger.error("prompt registry change refused, keeping the last good state: %s", exc)
            self.last_error = str(exc)
            return False
        with self._lock:
            self.snapshot = snapshot
        self.last_error = None
        logger.info("prompt registry reloaded (%d prompts)", len(snapshot.prompts))
        return True

    def names(self) -> list[str]:
        return sorted(self.snapshot.prompts)

    def get(self, name: str) -> Prompt:
        prompt = self.snapshot.prompts.get(name)
        if prompt is None:
            raise PromptError(f"unknown prompt '{name}'", 404, "prompt.name", "prompt_not_found")
        return prompt

    def tags(self, name: str) -> TagEntry:
        return self.snapshot.tags.get(name, TagEntry())

    def resolve(self, name: str, tag: str | None = None, version: str | None = None,
                sticky_key: str | None = None) -> Resolved:
        """The version to serve; ``tag: stable`` goes to the canary for ``canary_weight`` % of sticky keys."""
        snapshot = self.snapshot  # one consistent view for this lookup
        prompt = snapshot.prompts.get(name)
        if prompt is None:
            raise PromptError(f"unknown prompt '{name}'", 404, "prompt.name", "prompt_not_found")
        if version is not None:
            if version not in prompt.sources:
                raise PromptError(f"prompt '{name}' has no version '{version}'", 404, "prompt.version",
                                  "prompt_not_found")
            return Resolved(name, version, None, prompt)
        tag = tag or "stable"
        if tag not in TAGS:
            raise PromptError(f"unknown tag '{tag}' (use stable or canary)", 400, "prompt.tag")
        entry = snapshot.tags.get(name, TagEntry())
        chosen = getattr(entry, tag)
        if chosen is None:
            raise PromptError(f"prompt '{name}' has no '{tag}' version", 404, "prompt.tag", "prompt_not_found")
        if (tag == "stable" and entry.canary and entry.canary_weight > 0 and sticky_key is not None
                and canary_bucket(name, sticky_key) < entry.canary_weight):
            return Resolved(name, entry.canary, "canary", prompt)
        return Resolved(name, chosen, tag, prompt)


def load_registry(root: Path | str) -> Registry:
    root = Path(root)
    if not root.is_dir():
        raise PromptError(f"no prompt registry at {root}", 404)
    return Registry(root)
