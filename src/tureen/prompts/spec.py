"""The typed files of a registry: ``tags.yaml`` and each prompt's ``prompt.yaml``."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

VERSION_RE = re.compile(r"v(\d+)")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TAGS = ("stable", "canary")


def version_number(version: str) -> int:
    match = VERSION_RE.fullmatch(version)
    if not match:
        raise ValueError(f"{version!r} is not a version like v1, v2 ...")
    return int(match.group(1))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variable(Strict):
    """One declared template variable."""

    type: Literal["string", "integer", "enum", "list"] = "string"
    default: Any = None
    values: list[str] | None = Field(None, description="the allowed values of an enum")
    items: Literal["string", "integer"] | None = Field(None, description="element type of a list")
    description: str = ""

    @model_validator(mode="after")
    def _enum_values(self) -> Variable:
        if self.type == "enum" and not self.values:
            raise ValueError("an enum variable needs 'values'")
        return self


class VersionSpec(Strict):
    """What one version is certified for."""

    models: list[str] = Field(default_factory=list, description="models this version was certified on")
    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict, description="request settings (max_tokens...), over the "
                                                                     "prompt's config")


class PromptSpec(Strict):
    """``<name>/prompt.yaml``."""

    type: Literal["text", "chat"] = Field("text", description="text: a system message; chat: whole messages")
    description: str = ""
    variables: dict[str, Variable] = Field(default_factory=dict)
    versions: dict[str, VersionSpec] = Field(default_factory=dict)
    evals: str | None = Field(None, description="eval suite path, relative to the prompt's directory")
    allow_uncertified: Literal["refuse", "warn"] = "refuse"
    config: dict[str, Any] = Field(default_factory=dict, description="free-form settings served with the prompt")

    @field_validator("versions")
    @classmethod
    def _version_names(cls, value: dict[str, VersionSpec]) -> dict[str, VersionSpec]:
        for version in value:
            version_number(version)
        return value


class TagEntry(Strict):
    """One name's line in ``tags.yaml``."""

    stable: str | None = None
    canary: str | None = None
    canary_weight: float = Field(0.0, ge=0, le=100, description="percent of 'stable' requests served the canary")

    @field_validator("stable", "canary")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None:
            version_number(value)
        return value

    def tags(self) -> dict[str, str]:
        return {tag: v for tag in TAGS if (v := getattr(self, tag)) is not None}


def parse_tags(data: Any) -> dict[str, TagEntry]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("tags.yaml must be a mapping of prompt name -> {stable, canary, canary_weight}")
    return {str(name): TagEntry.model_validate(entry or {}) for name, entry in data.items()}
