"""Prompt registries in real git repositories, for the prompt tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def make_repo(tmp: Path) -> Path:
    """A git repository with an empty ``prompts/`` registry; returns the registry directory."""
    tmp.mkdir(parents=True, exist_ok=True)
    git(tmp, "init", "-q", "-b", "main")
    git(tmp, "config", "user.name", "Test Author")
    git(tmp, "config", "user.email", "author@example.com")
    root = tmp / "prompts"
    root.mkdir()
    return root


def write_prompt(root: Path, name: str, templates: dict[str, str], models: dict[str, list[str]] | None = None,
                 variables: dict | None = None, evals: list | dict | None = None, **spec) -> Path:
    directory = root / name
    (directory / "evals").mkdir(parents=True, exist_ok=True)
    for version, text in templates.items():
        (directory / f"{version}.jinja2").write_text(text)
    models = models or {}
    body = {"variables": variables or {}, "versions": {v: {"models": models.get(v, ["m"]), **spec.pop(f"{v}_spec", {})}
                                                       for v in templates},
            "evals": f"evals/{name}.yaml", **spec}
    (directory / "prompt.yaml").write_text(yaml.safe_dump(body))
    if evals is not None:
        (directory / "evals" / f"{name}.yaml").write_text(yaml.safe_dump(evals))
    return directory


def write_tags(root: Path, tags: dict) -> None:
    (root / "tags.yaml").write_text(yaml.safe_dump(tags))


def commit_all(root: Path, message: str = "registry") -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
