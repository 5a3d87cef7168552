"""Sandboxed Jinja2 rendering with ``StrictUndefined`` and typed variables."""

from __future__ import annotations

import re
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tureen.prompts.spec import PromptSpec, Variable

ROLE_LINE = re.compile(r"^###\s*(system|user|assistant|developer)\s*$", re.MULTILINE)
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


class RenderError(ValueError):
    """A variable or template problem; ``param`` names the variable when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def compile_template(source: str, where: str):
    try:
        return _ENV.from_string(source)
    except TemplateSyntaxError as exc:
        raise RenderError(f"{where}: template syntax error at line {exc.lineno}: {exc.message}") from None


def _coerce(name: str, var: Variable, value: Any) -> Any:
    if var.type == "string":
        if not isinstance(value, str):
            raise RenderError(f"variable '{name}' must be a string", name)
        return value
    if var.type == "integer":
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RenderError(f"variable '{name}' must be an integer", name)
        return value
    if var.type == "enum":
        if value not in (var.values or []):
            raise RenderError(f"variable '{name}' must be one of {', '.join(var.values or [])}", name)
        return value
    if isinstance(value, str):  # a list given on a command line: comma-separated
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise RenderError(f"variable '{name}' must be a list", name)
    if var.items:
        item = Variable(type=var.items)
        return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    return value


def validate_variables(spec: PromptSpec, given: dict[str, Any] | None) -> dict[str, Any]:
    """Declared variables, typed; a missing, unknown or wrong-typed one raises ``RenderError`` naming it."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(spec.variables))
    if unknown:
        raise RenderError(f"unknown variable '{unknown[0]}' (declared: {', '.join(spec.variables) or 'none'})",
                          unknown[0])
    values: dict[str, Any] = {}
    for name, var in spec.variables.items():
        if name in given:
            values[name] = _coerce(name, var, given[name])
        elif var.default is not None:
            values[name] = var.default
        else:
            raise RenderError(f"missing variable '{name}' ({var.type})", name)
    return values


def render_text(template, values: dict[str, Any], where: str) -> str:
    try:
        return template.render(**values).strip()
    except UndefinedError as exc:
        raise RenderError(f"{where}: undefined in template: {exc.message}") from None
    except SecurityError as exc:
        raise RenderError(f"{where}: refused by the sandbox: {exc}") from None
    except Exception as exc:  # a template error at render time (bad filter argument, division by zero...)
        raise RenderError(f"{where}: template failed: {type(exc).__name__}: {exc}") from None


def to_messages(text: str, prompt_type: str) -> list[dict[str, str]]:
    """A ``text`` prompt is one system message; a ``chat`` prompt splits on ``### role`` lines."""
    if prompt_type == "text":
        return [{"role": "system", "content": text}]
    parts = ROLE_LINE.split(text)
    if parts[0].strip():
        raise RenderError("a chat template must start with a '### system' (or user/assistant) line")
    return [{"role": role, "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
