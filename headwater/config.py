"""The sources file (headwater.yaml): which sources exist, how to reach them, who may read them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

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
