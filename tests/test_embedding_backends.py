"""Embedding backends: close to torch fp32, exported once and offline, chosen only within the
accuracy guard, and named on every vector they index."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FolderSource, bearer

from headwater.config import SourceConfig
from headwater.settings import Settings
from tasks import embedding_backends as backends
from tasks.embed import load_model, model_path, query_encoder
from tasks.embedding_backends import BackendUnavailable, GuardResult
from tasks.ingest import processing_fingerprint

MODEL = "all-MiniLM-L6-v2"
SENTENCES = [
    "Annual leave is 25 days a year.",
    "Connect to the VPN with the corporate client before opening internal sites.",
    "The pump station on the north bank is inspected every Monday by the duty engineer, who "
    "records pressure, flow and any leaks in the maintenance log before noon.",
    "ok",
]
# Lowest cosine to torch fp32 over SENTENCES, per backend. int8 matrix products lose more,
# most on the shortest text: 0.970 measured for "ok" on AVX2 with the attention's projections
# in int8 too (0.99 to 0.995 for the others; 0.977 the lowest over the guard's 600 passages).
COSINE_BOUND = {"onnx": 0.99, "openvino": 0.99, "openvino-int8": 0.99, "onnx-int8": 0.96,
                "torch-bf16": 0.99}
NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16\n"


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache dir of this session's own, every ONNX/OpenVINO file exported into it with the
    network refused: export reads the installed model only."""
    cache = tmp_path_factory.mktemp("model-cache")

    def refuse(*_: object) -> None:
        raise OSError("the export tried to reach the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setenv("HF_HUB_OFFLINE", "1")
        for backend in ("onnx-int8", "openvino-int8"):  # their fp32 sources come with them
            backends.exported_model(cache, model_path(MODEL), backend)
    yield cache


def _embedder(backend: str, cache: Path) -> backends.Embedder:
    return backends.load_embedder(MODEL, model_path(MODEL), load_model(MODEL), backend, cache)


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "openvino", "openvino-int8",
                                     "torch-bf16"])
def test_every_backend_gives_normalised_vectors_close_to_torch_fp32(
        backend: str, export_cache: Path) -> None:
    # torch-bf16 runs emulated on a CPU without native bf16: the numbers hold, the speed not.
    vectors = _embedder(backend, export_cache).encode(SENTENCES)
    reference = load_model(MODEL).encode(SENTENCES, normalize_embeddings=True)

    assert vectors.shape == (len(SENTENCES), 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    cosine = np.sum(vectors * reference, axis=1)
    assert cosine.min() >= COSINE_BOUND[backend], cosine


@pytest.mark.parametrize("backend", ["onnx-int8", "openvino-int8"])
def test_int8_lanes_give_each_text_its_own_vector_as_one_lane_does(
        backend: str, export_cache: Path) -> None:
    # Texts run on several threads (streams) at once; each row must still land on its text.
    path = backends.exported_model(export_cache, model_path(MODEL), backend)
    texts = [f"{sentence} ({n})" for n in range(5) for sentence in SENTENCES]

    def embedder(lanes: int) -> backends.Embedder:
        return backends.Embedder(MODEL, backend, load_model(MODEL),
                                 run=backends.int8_runner(backend, path, lanes),
                                 max_batch=backends.INT8_CPU_BATCH_SIZE, lanes=lanes)

    assert np.array_equal(embedder(3).encode(texts), embedder(1).encode(texts))


def test_the_first_model_call_ends_before_the_lanes_start() -> None:
    # OpenVINO's bindings set up static state on their first call, and two threads doing it at
    # once deadlocked a sync (each holding what the other waited for: the GIL, a static's
    # guard), in about one fresh process of four under a busy GIL.
    calls: list[tuple[str, float, float]] = []

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        started = time.perf_counter()
        time.sleep(0.02)
        calls.append((threading.current_thread().name, started, time.perf_counter()))
        return np.ones((len(feed["input_ids"]), 384), dtype=np.float32)

    embedder = backends.Embedder(MODEL, "openvino-int8", load_model(MODEL), run=run,
                                 max_batch=1, lanes=2)
    embedder.encode(SENTENCES)
    first, *rest = sorted(calls, key=lambda c: c[1])
    assert first[0] == threading.current_thread().name
    assert rest and all(c[0].startswith("embed-lane") and c[1] >= first[2] for c in rest)
    calls.clear()
    embedder.encode(SENTENCES)  # later calls go to the lanes at once
    assert all(c[0].startswith("embed-lane") for c in calls)


@pytest.mark.parametrize("backend", ["onnx-int8", "openvino-int8"])
def test_int8_gives_a_text_the_same_vector_whatever_it_is_embedded_with(
        backend: str, export_cache: Path) -> None:
    # Dynamic quantization scales activations per model call: one text a call keeps the
    # embedding cache's promise that a text's vector is a function of the text alone.
    embedder = _embedder(backend, export_cache)
    alone = embedder.encode(["ok"])
    assert np.array_equal(embedder.encode(SENTENCES, batch_size=32)[SENTENCES.index("ok")],
                          alone[0])


def test_export_is_cached_so_a_second_load_exports_nothing(export_cache: Path) -> None:
    files = {b: backends.backend_file(export_cache, model_path(MODEL), b)
             for b in ("onnx", "onnx-int8", "openvino", "openvino-int8")}
    made = {b: p.stat().st_mtime_ns for b, p in files.items()}
    exports = dict(backends.EXPORTS)

    for backend in files:
        _embedder(backend, export_cache).encode(["again"])

    assert {b: p.stat().st_mtime_ns for b, p in files.items()} == made
    assert dict(backends.EXPORTS) == exports
    assert all(exports[b] >= 1 for b in files)


def test_concurrent_first_uses_export_once(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()

    def slow_export(model_dir: str, source: Path | None, out: Path) -> None:
        started.set()
        threading.Event().wait(0.5)  # long enough for the other caller to reach the lock
        out.write_bytes(b"graph")

    monkeypatch.setitem(backends._EXPORT_STEPS, "openvino", slow_export)
    before = backends.EXPORTS["openvino"]
    found: list[Path] = []
    callers = [threading.Thread(target=lambda: found.append(
        backends.exported_model(tmp_path, model_path(MODEL), "openvino"))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert started.is_set() and len(set(found)) == 1 and found[0].read_bytes() == b"graph"
    assert backends.EXPORTS["openvino"] - before == 1


def test_bf16_is_refused_on_a_cpu_without_native_bf16(tmp_path: Path) -> None:
    assert not backends.has_native_bf16(backends.cpu_flags(NO_BF16))
    with pytest.raises(BackendUnavailable, match="native bf16"):
        backends.resolve_backend("torch-bf16", model_path(MODEL), tmp_path,
                                 flags=backends.cpu_flags(NO_BF16), cuda=False)
    assert backends.resolve_backend("torch-bf16", model_path(MODEL), tmp_path,
                                    flags=backends.cpu_flags(WITH_BF16),
                                    cuda=False) == "torch-bf16"


def test_this_machine_refuses_bf16_unless_its_cpu_has_it(tmp_path: Path) -> None:
    flags = backends.cpu_flags()
    if backends.has_native_bf16(flags):
        assert backends.resolve_backend("torch-bf16", model_path(MODEL), tmp_path) == "torch-bf16"
    else:
        with pytest.raises(BackendUnavailable):
            backends.resolve_backend("torch-bf16", model_path(MODEL), tmp_path)


def _result(backend: str, speedup: float, recall_delta: float = 0.0,
            ndcg_delta: float = 0.0) -> GuardResult:
    return GuardResult(backend, 80.0 + recall_delta, 70.0 + ndcg_delta, recall_delta,
                       ndcg_delta, 0.99, 0.97, speedup)


def test_auto_chooses_the_fastest_backend_within_the_guard_and_never_one_that_failed() -> None:
    results = [_result("torch", 1.0), _result("onnx", 1.2),
               _result("onnx-int8", 1.9, recall_delta=-0.6),  # fastest, but lost recall
               _result("openvino-int8", 1.5, ndcg_delta=-0.5),  # on the limit: passes
               _result("openvino", 1.7, ndcg_delta=+0.51)]  # "within" cuts both ways
    assert backends.choose_backend(results) == "openvino-int8"
    asked_by_fp32 = GuardResult("onnx-int8", 80.0, 70.0, 0.0, 0.0, 0.99, 0.97, 1.9,
                                mixed_recall_delta=-0.8)  # an fp32 question misses int8 text
    assert backends.choose_backend([_result("onnx", 1.2), asked_by_fp32]) == "onnx"
    assert backends.choose_backend([_result("onnx-int8", 3.0, -2.0)]) == "torch"
    assert backends.choose_backend([]) == "torch"
    for isa, measured in backends.MEASURED.items():
        chosen = backends.choose_backend(measured)
        assert chosen == "torch" or next(r for r in measured if r.backend == chosen).passed, isa


def test_auto_reads_this_machines_guard_file(tmp_path: Path) -> None:
    model_dir = model_path(MODEL)
    backends.write_guard(backends.guard_file(tmp_path, model_dir), model_dir,
                         [_result("torch", 1.0), _result("onnx-int8", 2.0, recall_delta=-1.0),
                          _result("onnx", 1.3)])
    assert backends.resolve_backend("auto", model_dir, tmp_path, cuda=False) == "onnx"


def test_a_guard_file_of_another_recipe_is_not_trusted(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Measured before a backend's settings changed, its figures are not the backend's now.
    model_dir = model_path(MODEL)
    path = backends.guard_file(tmp_path, model_dir)
    backends.write_guard(path, model_dir, [_result("torch", 1.0), _result("onnx", 1.3)])
    monkeypatch.setattr(backends, "RUN_RECIPE", backends.RUN_RECIPE + 1)
    assert backends.read_guard(path, model_dir) is None


def test_auto_uses_a_cuda_gpu_in_fp16_and_fp16_needs_one(tmp_path: Path) -> None:
    model_dir = model_path(MODEL)
    assert backends.resolve_backend("auto", model_dir, tmp_path, cuda=True) == "torch-fp16"
    with pytest.raises(BackendUnavailable, match="CUDA"):
        backends.resolve_backend("torch-fp16", model_dir, tmp_path, cuda=False)


def test_fingerprint_changes_with_the_model_but_not_with_the_backend() -> None:
    config = SourceConfig(name="handbook", type="folder", params={"root": "docs"})

    def fingerprint(**fields: str) -> str:
        return processing_fingerprint(Settings(**fields), config, None)

    assert fingerprint(embedding_backend="torch") == fingerprint(embedding_backend="onnx-int8")
    assert fingerprint(embedding_model=MODEL) != fingerprint(
        embedding_model="sentence-transformers/all-mpnet-base-v2")


def test_sync_on_a_non_default_backend_tags_each_vector_with_model_and_backend(
        folder: FolderSource, export_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headwater.settings import get_settings

    monkeypatch.setenv("HEADWATER_EMBEDDING_BACKEND", "onnx-int8")
    monkeypatch.setenv("HEADWATER_CACHE_DIR", str(export_cache))
    get_settings.cache_clear()
    folder.write("leave.md", "# Leave\n\nAnnual leave is 25 days a year.\n")
    folder.write("vpn.txt", "Connect to the VPN with the corporate client.\n")

    summary = folder.sync()

    assert (summary["new"], summary["embedded"]) == (2, 2)
    objects = list(folder.client.collections.use(folder.collection).iterator(
        include_vector=True))
    assert {(o.properties["embedding_model"], o.properties["embedding_backend"])
            for o in objects} == {(MODEL, "onnx-int8")}
    # Dynamic quantization scales activations per batch, so the same batch gives the same
    # vectors (a text in another batch moves a little, within the guard).
    expected = _embedder("onnx-int8", export_cache).encode([o.properties["text"] for o in objects])
    for obj, vector in zip(objects, expected, strict=True):
        assert np.allclose(obj.vector["default"], vector, atol=1e-5)
    # Cached apart from torch fp32's vectors, so a cached vector's tag stays true.
    hashes = [o.properties["text_hash"] for o in objects]
    assert len(folder.store.cached_vectors(f"{MODEL}/onnx-int8", hashes)) == 2
    assert folder.store.cached_vectors(MODEL, hashes) == {}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_query_encoder_embeds_questions_on_the_configured_backend(
        export_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headwater.settings import get_settings

    monkeypatch.setenv("HEADWATER_EMBEDDING_BACKEND", "onnx-int8")
    monkeypatch.setenv("HEADWATER_CACHE_DIR", str(export_cache))
    get_settings.cache_clear()
    question = "How many days of annual leave do we get?"
    int8 = _embedder("onnx-int8", export_cache).encode([question])[0]
    fp32 = load_model(MODEL).encode([question], normalize_embeddings=True)[0]
    try:
        assert query_encoder(MODEL).model.backend == "onnx-int8"
        assert np.allclose(query_encoder(MODEL).encode(question), int8, atol=1e-5)
        assert np.allclose(query_encoder(MODEL, "torch").encode(question), fp32, atol=1e-5)
    finally:
        get_settings.cache_clear()


def test_the_api_asks_an_int8_index_with_the_int8_vector_of_the_question(
        folder: FolderSource, export_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    import tasks.answer
    from headwater.api import create_app

    monkeypatch.setenv("HEADWATER_EMBEDDING_BACKEND", "onnx-int8")
    monkeypatch.setenv("HEADWATER_CACHE_DIR", str(export_cache))
    folder.write("leave.md", "# Leave\n\nEvery employee has 25 days of annual leave a year.\n")
    folder.write("vpn.txt", "Connect to the VPN with the corporate client before opening "
                            "internal sites.\n")
    folder.write("pump.md", "# BP-200 pump\n\nThe BP-200 pump moves 200 litres of water per "
                            "minute and is serviced once a year.\n")
    assert folder.sync()["new"] == 3
    asked: list[np.ndarray] = []
    retrieve = tasks.answer.retrieve

    def seen(client: object, collection: str, question: str, vector: np.ndarray,
             *args: object, **kwargs: object) -> object:
        asked.append(np.asarray(vector))
        return retrieve(client, collection, question, vector, *args, **kwargs)

    monkeypatch.setattr(tasks.answer, "retrieve", seen)
    secret = "test-signing-secret-of-enough-length"
    settings = Settings(collection=folder.collection, jwt_secret=secret,
                        state_db_url=folder.env["HEADWATER_STATE_DB_URL"])
    question = "How many days of annual leave do we get?"

    with TestClient(create_app(settings)) as api:
        answer = api.post("/v1/query", json={"question": question},
                          headers={"Authorization": "Bearer "
                                   + bearer(secret, "ann", ["staff"])})
        ready = api.get("/readyz").json()

    assert answer.status_code == 200, answer.text
    assert answer.json()["sources"][0]["doc_id"] == "leave.md"
    assert ready["model"] == "ok"
    int8 = _embedder("onnx-int8", export_cache).encode([question])[0]
    fp32 = load_model(MODEL).encode([question], normalize_embeddings=True)[0]
    assert len(asked) == 1 and _cosine(asked[0], int8) > 0.99999
    # int8 moves a question's vector measurably off torch fp32's: the check above tells them apart.
    assert _cosine(asked[0], fp32) < 0.9999
