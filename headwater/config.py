"""The sources file (headwater.yaml): which sources exist, how to reach them, who may read them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from headwater.errors import HeadwaterError

_SECRET_KEY = re.compile(r"(secret|password|token|api_?key|private_?key)", re.IGNORECASE)


class ConfigError(HeadwaterError):
    """The sources file is missing, malformed, or names something that does not exist."""


class SecretRef(BaseModel):
    """A reference to a credential: an environment variable or a Prefect Secret block."""

    env: str | None = None
    prefect_secret: str | None = None

    def resolve(self) -> SecretStr:
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} is not set")
            return SecretStr(value)
        if self.prefect_secret:
            from prefect.blocks.system import Secret

            return SecretStr(str(Secret.load(self.prefect_secret).get()))
        raise ConfigError("a secret reference needs `env` or `prefect_secret`")


class Schedule(BaseModel):
    cron: str | None = None
    interval_s: int | None = None


class QualityThresholds(BaseModel):
    """Batch-level limits past which a sync stops before it damages a good index."""

    max_failed_share: float = Field(
        default=0.2, ge=0, le=1,
        description="A batch in which more documents than this fail to parse stops the run.")
    min_batch_for_failed_share: int = Field(
        default=5, ge=1, description="Smaller batches are judged per document only.")
    max_delete_share: float = Field(
        default=0.5, ge=0, le=1,
        description="A run that would delete more of the source's index than this stops.")
    min_indexed_for_delete_guard: int = Field(
        default=10, ge=0, description="Sources this small may delete freely.")
    # Row-level expectations (expectations/*.json): a document that breaks one is quarantined.
    min_document_chars: int = Field(
        default=1, ge=0, description="A parsed document with less text is rejected.")
    max_document_chars: int = Field(
        default=5_000_000, ge=1, description="A parsed document with more text is rejected.")
    min_printable_ratio: float = Field(
        default=0.95, ge=0, le=1,
        description="Share of characters that must not be control or replacement characters.")
    max_residual_pii_score: float = Field(
        default=0.5, ge=0, le=1,
        description="With a policy, chunks with personal data scored above this are rejected.")


class Throttling(BaseModel):
    """How long a connector waits out a throttling or briefly unavailable source (429/503):
    the server's Retry-After when given, else exponential backoff with full jitter."""

    attempts: int = Field(default=6, ge=1, description="Tries per request before giving up.")
    base_s: float = Field(default=0.5, gt=0, description="First backoff without Retry-After.")
    cap_s: float = Field(default=60.0, gt=0, description="The longest single wait.")


class Retention(BaseModel):
    """How long a source's documents may stay indexed, judged by their source-side
    modification time; a source without `retention:` keeps them as long as the source does."""

    days: int = Field(ge=1, description="Documents last modified longer ago leave the index.")


class Notifications(BaseModel):
    """How a source's change notifications prove where they come from. Without a `secret` the
    source accepts none: its changes are found by its scheduled syncs only."""

    secret: SecretRef | None = Field(
        default=None,
        description="Key of the HMAC-SHA256 signature over a notification's body; for SharePoint "
        "the subscription's clientState, for S3 the shared secret of its header.")


# Least to most strict: when frameworks disagree about an entity type, the stricter one wins.
Action = Literal["keep", "mask", "encrypt", "hash", "redact"]
Classification = Literal["public", "internal", "confidential", "restricted"]


class PatternSpec(BaseModel):
    """One regular expression of a custom recognizer, with the confidence a match earns."""

    regex: str
    score: float = Field(default=0.6, gt=0, le=1)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, regex: str) -> str:
        try:
            re.compile(regex)
        except re.error as error:
            raise ValueError(f"regex {regex!r} does not compile: {error}") from error
        return regex


class CustomRecognizer(BaseModel):
    """A source's own kind of personal data: patterns (raised by context words), a deny list."""

    entity: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    patterns: list[PatternSpec] = Field(default_factory=list)
    context: list[str] = Field(default_factory=list)
    deny_list: list[str] = Field(default_factory=list)
    classification: Classification = "confidential"

    @model_validator(mode="after")
    def _finds_something(self) -> CustomRecognizer:
        if not (self.patterns or self.deny_list):
            raise ValueError(f"recognizer {self.entity} needs `patterns` or a `deny_list`")
        return self


class Compliance(BaseModel):
    """How a source's `policy` applies: per-entity overrides, own recognizers, keys, default
    classification. The subject-index and hash key is process-wide: HEADWATER_SUBJECT_KEY."""

    classification: Classification = Field(
        default="internal", description="The least a document of this source is classified.")
    actions: dict[str, Action] = Field(
        default_factory=dict, description="Entity type -> action, over the frameworks' choice.")
    recognizers: list[CustomRecognizer] = Field(default_factory=list)
    encryption_key: SecretRef | None = Field(
        default=None, description="A Fernet key, needed when any entity type is encrypted.")
    min_score: float = Field(
        default=0.4, ge=0, le=1,
        description="Findings scored below this are left alone (a bare phone number is 0.4).")
    disabled_recognizers: list[str] = Field(
        default_factory=list,
        description="Predefined Presidio recognizers (by class name, e.g. PhoneRecognizer) this "
        "source does without; one that finds a type the policy removes is refused.")


class SourceConfig(BaseModel):
    """One source: a name, a connector type, its parameters, schedule, policy and readers."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    schedule: Schedule | None = None
    policy: list[str] = Field(default_factory=list)
    # Readers per path prefix; the longest matching prefix wins ("" matches everything).
    principals: dict[str, list[str]] = Field(default_factory=lambda: {"": []})
    # Documents per batch: big enough that per-task overhead and padding stay small.
    batch_size: int = Field(default=128, ge=1, le=1000)
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    throttling: Throttling = Field(default_factory=Throttling)
    compliance: Compliance = Field(default_factory=Compliance)
    notifications: Notifications = Field(default_factory=Notifications)
    retention: Retention | None = None
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("params")
    @classmethod
    def _no_literal_secrets(cls, params: dict[str, Any]) -> dict[str, Any]:
        for key, value in params.items():
            if _SECRET_KEY.search(key) and isinstance(value, str):
                raise ValueError(
                    f"params.{key} is a literal secret: write {{env: VAR}} or "
                    "{prefect_secret: block-name} instead"
                )
        return params

    def principals_for(self, path: str) -> list[str]:
        best = max((p for p in self.principals if path.startswith(p)), key=len, default=None)
        return sorted(self.principals[best]) if best is not None else []

    def secret(self, key: str) -> SecretStr:
        return SecretRef.model_validate(self.params[key]).resolve()


class SourcesFile(BaseModel):
    sources: list[SourceConfig] = Field(default_factory=list)


def load_sources(path: Path) -> dict[str, SourceConfig]:
    if not path.is_file():
        raise ConfigError(f"sources file {path} does not exist (set HEADWATER_CONFIG)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        parsed = SourcesFile.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as error:
        raise ConfigError(f"sources file {path} is invalid", str(error)) from error
    names = [s.name for s in parsed.sources]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"sources file {path} names {sorted(duplicates)} more than once")
    return {s.name: s.model_copy(update={"base_dir": path.parent}) for s in parsed.sources}


def source_config(path: Path, name: str) -> SourceConfig:
    sources = load_sources(path)
    if name not in sources:
        raise ConfigError(f"no source named {name!r} in {path}; known: {sorted(sources)}")
    return sources[name]
