"""Embedding backends: the model's transformer on torch, ONNX Runtime or OpenVINO, fp32 or int8."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import version
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from headwater.errors import HeadwaterError

BACKENDS = ("torch", "torch-bf16", "torch-fp16", "onnx", "onnx-int8", "openvino",
            "openvino-int8")
REFERENCE = "torch"
# Bump when the export recipe changes: files exported by an older recipe are then not reused.
EXPORT_RECIPE = 2
# Bump when how a backend runs changes (batching, threads, quantization settings): a guard
# file measured before is then not trusted, and `auto` falls back to MEASURED until re-run.
RUN_RECIPE = 2
# A backend may move recall@5 and nDCG@10 by at most half a point (of 100) from torch fp32.
GUARD_POINTS = 0.5
GPU_BATCH_SIZE = 256
# Dynamic int8 on CPU embeds one text per model call, a call per core at once, each on one
# thread: nothing is padded, which on AVX2 saved more than larger matrix products gain
# (docs/benchmarks.md), and a text's vector no longer depends on the texts batched with it
# (activation scales are taken per call), so the same text always gets the same vector.
INT8_CPU_BATCH_SIZE = 1
# OpenVINO quantizes a weight-compressed model's activations to int8 on the fly, one scale per
# group of a token's values (on CPUs with int8 dot products). Its default groups of 32 cost
# more than they save: on AVX-512 VNNI, 128 was the fastest of the sizes tried (32 to 1536),
# at a cosine to fp32 of 0.9992 (0.9984 at 384; docs/benchmarks.md).
OPENVINO_INT8_GROUP_SIZE = 128
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Exports run in this process, by backend file (tests check the cache spares them).
EXPORTS: Counter[str] = Counter()


class BackendUnavailable(HeadwaterError):
    """The configured embedding backend cannot run on this machine or for this model."""


# -- the machine --------------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags, from /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: Iterable[str]) -> bool:
    # Without these, torch emulates bf16 and is slower than fp32 while losing precision.
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def instruction_set(flags: Iterable[str]) -> str:
    """The CPU class int8 and bf16 kernels depend on: measured guard results hold per class."""
    flags = set(flags)
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "baseline"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_backend(backend: str, flags: Iterable[str], cuda: bool) -> None:
    """Refuse a backend this machine cannot run as it promises."""
    if backend not in BACKENDS:
        raise BackendUnavailable(
            f"unknown embedding backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    if backend == "torch-bf16" and not has_native_bf16(flags):
        raise BackendUnavailable(
            "HEADWATER_EMBEDDING_BACKEND=torch-bf16 needs a CPU with native bf16 (avx512_bf16 "
            "or amx_bf16); this one has neither, so bf16 would be emulated: slower than fp32 "
            "and less precise. Use auto, onnx or onnx-int8.")
    if backend == "torch-fp16" and not cuda:
        raise BackendUnavailable(
            "HEADWATER_EMBEDDING_BACKEND=torch-fp16 needs a CUDA GPU, and none is visible.")


# -- the accuracy guard -------------------------------------------------------------------------


@dataclass
class GuardResult:
    """One backend measured against torch fp32 on the same benchmark and the same texts."""

    backend: str
    recall_at_5: float  # in points (0..100)
    ndcg_at_10: float
    recall_delta: float  # backend minus torch fp32, in points
    ndcg_delta: float
    cosine_mean: float  # to the torch fp32 vector of the same text
    cosine_min: float
    speedup: float  # chunks/s over torch fp32's, measured interleaved under the same load
    # The same deltas with questions embedded by torch fp32 (the API's query encoder) and
    # passages by the backend: an index of one backend is asked by the other.
    mixed_recall_delta: float = 0.0
    mixed_ndcg_delta: float = 0.0

    @property
    def passed(self) -> bool:
        deltas = (self.recall_delta, self.ndcg_delta, self.mixed_recall_delta,
                  self.mixed_ndcg_delta)
        return all(abs(d) <= GUARD_POINTS for d in deltas)


def choose_backend(results: Sequence[GuardResult]) -> str:
    """The fastest backend that passed the guard; torch fp32, the reference, when none did."""
    passed = [r for r in results if r.passed]
    return max(passed, key=lambda r: r.speedup).backend if passed else REFERENCE


# Measured by bench/embedding.py (figures in docs/benchmarks.md), per instruction set: what
# `auto` uses on a machine without its own guard file. A class not listed gets torch fp32.
MEASURED: dict[str, list[GuardResult]] = {
    # AMD EPYC, 2 vCPUs, quiet (load 1.6 to 1.9, the benchmark's own), 7 interleaved rounds of
    # 96 passages; 600 python3.11-doc section headings over 600 passages. Fields as GuardResult.
    # Run recipe 1: the openvino rows predate run recipe 2 (a request per thread; for int8 one
    # text a request on a stream per core, activation groups of 128) and are not re-measured;
    # onnx-int8, the class's choice, runs as it did.
    "avx2": [
        GuardResult("torch", 76.83, 66.73, 0.0, 0.0, 1.0, 1.0, 1.0),
        GuardResult("onnx", 76.83, 66.73, 0.0, 0.0, 1.0, 1.0, 1.19),
        GuardResult("onnx-int8", 77.33, 66.93, 0.5, 0.2, 0.99252, 0.97656, 1.95, 0.5, 0.2),
        GuardResult("openvino", 76.83, 66.73, 0.0, 0.0, 1.0, 1.0, 1.14),
        GuardResult("openvino-int8", 76.67, 66.85, -0.17, 0.12, 0.99954, 0.99908, 1.01, 0.0,
                    -0.01),
    ],
    # Intel Xeon, 2 vCPUs with AVX-512 VNNI (no bf16, no AMX), quiet, 7 interleaved rounds;
    # same benchmark; run recipe 2 (openvino-int8: one text a request, a stream per core,
    # activation groups of 128, a request per thread). onnx-int8 (1.89x) fails the guard here:
    # fp32 questions against its passages score 0.67 points of recall@5 above fp32 (a guard
    # holds both ways).
    "avx512-vnni": [
        GuardResult("torch", 76.83, 66.73, 0.0, 0.0, 1.0, 1.0, 1.0),
        GuardResult("onnx", 76.83, 66.73, 0.0, 0.0, 1.0, 1.0, 0.94),
        GuardResult("onnx-int8", 76.5, 66.44, -0.33, -0.29, 0.99501, 0.98852, 1.89, 0.67, 0.12),
        GuardResult("openvino", 76.83, 66.73, 0.0, 0.0, 1.0, 1.0, 1.18),
        GuardResult("openvino-int8", 77.0, 66.82, 0.17, 0.09, 0.99915, 0.99839, 2.03, -0.17,
                    0.07),
    ],
}


def guard_file(cache_dir: Path, model_dir: str) -> Path:
    """Where bench/embedding.py records this machine's guard results for a model."""
    isa = instruction_set(cpu_flags())
    return _model_cache(cache_dir, model_dir) / f"guard-{isa}.json"


def write_guard(path: Path, model_dir: str, results: Sequence[GuardResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model_digest": model_digest(model_dir), "recipe": _recipe(),
              "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(record, indent=2) + "\n")


def read_guard(path: Path, model_dir: str) -> list[GuardResult] | None:
    """The recorded results, or None when there are none for these very model files and
    recipes."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("model_digest") != model_digest(model_dir) or record.get("recipe") != _recipe():
        return None
    return [GuardResult(**r) for r in record["results"]]


def _recipe() -> list[int]:
    return [EXPORT_RECIPE, RUN_RECIPE]


def resolve_backend(setting: str, model_dir: str, cache_dir: Path,
                    flags: Iterable[str] | None = None, cuda: bool | None = None) -> str:
    """The backend a setting means here: `auto` is a CUDA GPU in fp16 when there is one, else
    the fastest CPU backend that passed the guard on this machine (or on its CPU class)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    cuda = cuda_available() if cuda is None else cuda
    if setting != "auto":
        check_backend(setting, flags, cuda)
        return setting
    if cuda:
        return "torch-fp16"
    results = read_guard(guard_file(cache_dir, model_dir), model_dir)
    if results is None:
        results = MEASURED.get(instruction_set(flags), [])
    chosen = choose_backend(results)
    check_backend(chosen, flags, cuda)
    return chosen


# -- exported model files -----------------------------------------------------------------------


@lru_cache(maxsize=8)
def model_digest(model_dir: str) -> str:
    """A hash of the model's files: a changed model is a different model, whatever its name."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _model_cache(cache_dir: Path, model_dir: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_dir).name)
    if slug == "model":  # an installed package keeps its files in .../<package>/model
        slug = Path(model_dir).parent.name
    return Path(cache_dir) / "models" / slug


def _exporters(backend: str) -> dict[str, str]:
    versions = {"torch": version("torch"), "onnx": version("onnx"), "recipe": str(EXPORT_RECIPE)}
    if backend.startswith("onnx"):
        versions["onnxruntime"] = version("onnxruntime")
    return versions


def backend_file(cache_dir: Path, model_dir: str, backend: str) -> Path:
    """The ONNX file a backend runs, keyed by the model files and the exporters' versions."""
    key = hashlib.sha256(json.dumps([model_digest(model_dir), _exporters(backend)],
                                    sort_keys=True).encode()).hexdigest()[:16]
    return _model_cache(cache_dir, model_dir) / backend / key / "model.onnx"


def exported_model(cache_dir: Path, model_dir: str, backend: str) -> Path:
    """The backend's file, exported from the installed model at its first use and cached; a
    file lock makes a second process wait for the first one's export instead of repeating it."""
    from filelock import FileLock

    target = backend_file(cache_dir, model_dir, backend)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / "export.lock")):
        if target.is_file():
            return target
        source = None if backend == "openvino" else exported_model(
            cache_dir, model_dir, "openvino" if backend in ("onnx", "openvino-int8") else "onnx")
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / "model.onnx"
            _EXPORT_STEPS[backend](model_dir, source, partial)
            os.replace(partial, target)  # readers see the whole file or none
        EXPORTS[backend] += 1
    return target


def _export_plain(model_dir: str, _: Path | None, out: Path) -> None:
    """Transformer, mean pooling over the attention mask and L2 normalisation as one graph:
    what SentenceTransformer does for this model, checked against its modules."""
    import torch
    from sentence_transformers import SentenceTransformer

    # Eager attention exports as plain ops, which ONNX Runtime fuses into its Attention kernel.
    model = SentenceTransformer(model_dir, device="cpu",
                                model_kwargs={"attn_implementation": "eager"})
    _check_pipeline(model)
    transformer = model[0].auto_model.eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    sample = model.tokenizer(["an example", "a somewhat longer example sentence"],
                             padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "tokens"} for name in _INPUTS}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-side branches on shapes; the graph is checked against
        # torch fp32 on texts of other lengths and batch sizes (tests, bench/embedding.py).
        warnings.simplefilter("ignore")
        # The TorchScript exporter: the dynamo one needs onnxscript, which is not installed.
        torch.onnx.export(Pooled().eval(), tuple(sample[n] for n in _INPUTS), str(out),
                          input_names=list(_INPUTS), output_names=["sentence_embedding"],
                          dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)


def _check_pipeline(model: Any) -> None:
    kinds = [type(module).__name__ for module in model]
    pooling = model[1] if len(model) > 1 else None
    mode = getattr(pooling, "pooling_mode", None) or (
        "mean" if getattr(pooling, "pooling_mode_mean_tokens", False) else None)
    if kinds != ["Transformer", "Pooling", "Normalize"] or mode != "mean":
        raise BackendUnavailable(
            "only models made of a transformer, mean pooling and normalisation can be exported; "
            "use HEADWATER_EMBEDDING_BACKEND=torch for this one", f"modules {kinds}, {mode}")


def _export_fused(model_dir: str, plain: Path | None, out: Path) -> None:
    """ONNX Runtime's transformer fusions (attention, skip layer norm, GELU), still fp32."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    optimized = optimize_model(str(plain), model_type="bert", opt_level=1,
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(out))


def _export_onnx_int8(model_dir: str, fused: Path | None, out: Path) -> None:
    """Dynamic int8 quantization of the fused graph's matrix products, the attention's
    query/key/value projection included (QAttention: a quarter of the weights, ~10% faster).

    Per output channel, s8 weights: per-tensor scales lose too much on CPUs without VNNI, where
    the u8s8 kernels saturate (cosine to fp32 0.94 instead of 0.99 measured on AVX2); u8 weights
    avoid the saturation but were slower than s8 per channel and no more accurate.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fused), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _export_weight_int8(model_dir: str, plain: Path | None, out: Path) -> None:
    """int8 weights behind DequantizeLinear, per output channel: OpenVINO reads this as a
    weight-compressed model and quantizes activations on the fly where the CPU has int8
    dot products (ONNX Runtime's dynamic-quantization operators it would only decompress)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(plain))
    initializers = {i.name: i for i in model.graph.initializer}
    dequantize = []
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            continue
        values = numpy_helper.to_array(weight)
        scale = np.abs(values).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        quantized = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
        name = weight.name
        model.graph.initializer.remove(weight)
        model.graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero"),
        ])
        dequantize.append(helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name],
            axis=1))
    nodes = [*dequantize, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))


_EXPORT_STEPS: dict[str, Callable[[str, Path | None, Path], None]] = {
    "openvino": _export_plain,
    "onnx": _export_fused,
    "onnx-int8": _export_onnx_int8,
    "openvino-int8": _export_weight_int8,
}


# -- running a backend --------------------------------------------------------------------------


class Embedder:
    """One model on one backend, with the part of SentenceTransformer's interface the pipeline
    uses (encode, tokenizer, max_seq_length, get_embedding_dimension)."""

    def __init__(self, model_name: str, backend: str, reference: Any,
                 run: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
                 torch_model: Any = None, min_batch: int = 1, max_batch: int | None = None,
                 lanes: int = 1) -> None:
        self.model_name, self.backend = model_name, backend
        self.reference = reference  # the fp32 SentenceTransformer: tokenizer and dimensions
        self._run, self._torch_model, self._min_batch = run, torch_model, min_batch
        self._max_batch, self._lanes = max_batch, lanes
        self._pool: ThreadPoolExecutor | None = None
        self.tokenizer = reference.tokenizer
        self.max_seq_length = reference.max_seq_length

    @property
    def cache_key(self) -> str:
        """The embedding cache's key: torch fp32 keeps the bare model name it had before there
        were backends; other backends' vectors are cached apart, so a vector's tag is true."""
        return self.model_name if self.backend == REFERENCE else f"{self.model_name}/{self.backend}"

    def get_embedding_dimension(self) -> int:
        return self.reference.get_embedding_dimension()

    def encode(self, texts: Sequence[str], batch_size: int = 32, **_: Any) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text (SentenceTransformer's keyword
        arguments are accepted and ignored: the output is always normalised numpy)."""
        batch_size = max(min(batch_size, self._max_batch or batch_size), self._min_batch)
        if self._torch_model is not None:
            vectors = self._torch_model.encode(list(texts), batch_size=batch_size,
                                               normalize_embeddings=True, convert_to_tensor=True,
                                               show_progress_bar=False)
            vectors = vectors.float().cpu().numpy()
            # Normalised again in fp32: a bf16 or fp16 norm is off by up to half a percent.
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        # Longest first, as SentenceTransformer does: similar lengths pad least.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = []
        # Tokenized here, not in the lanes: a fast tokenizer called from two threads at once
        # can fail with "Already borrowed".
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            tokens = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                    max_length=self.max_seq_length, return_tensors="np")
            batches.append((rows, {n: tokens[n].astype(np.int64) for n in _INPUTS}))
        run = self._run
        assert run is not None
        if self._lanes > 1 and len(batches) > 1:
            first = []
            if self._pool is None:
                # The first call runs alone: OpenVINO's bindings set up static state on first
                # use (pybind11's numpy API inside a static of their own), and two threads
                # doing that at once deadlock, each holding what the other waits for.
                first = [run(batches[0][1])]
                self._pool = ThreadPoolExecutor(self._lanes, thread_name_prefix="embed-lane")
            results = chain(first, self._pool.map(run, [f for _, f in batches[len(first):]]))
        else:
            results = map(run, [feed for _, feed in batches])
        for (rows, _), vectors in zip(batches, results, strict=True):
            out[rows] = vectors
        return out


def load_embedder(model_name: str, model_dir: str, reference: Any, backend: str,
                  cache_dir: Path) -> Embedder:
    """An embedder for a resolved backend name (see resolve_backend)."""
    if backend == REFERENCE:
        return Embedder(model_name, backend, reference, torch_model=reference)
    if backend in ("torch-bf16", "torch-fp16"):
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if backend == "torch-fp16" else "cpu"
        dtype = torch.float16 if backend == "torch-fp16" else torch.bfloat16
        model = SentenceTransformer(model_dir, device=device).to(dtype)
        return Embedder(model_name, backend, reference, torch_model=model,
                        min_batch=GPU_BATCH_SIZE if device == "cuda" else 1)
    path = exported_model(cache_dir, model_dir, backend)
    if backend in ("onnx-int8", "openvino-int8"):
        lanes = cpu_threads()
        return Embedder(model_name, backend, reference, run=int8_runner(backend, path, lanes),
                        max_batch=INT8_CPU_BATCH_SIZE, lanes=lanes)
    runner = _onnxruntime_session(path) if backend.startswith("onnx") else _openvino_model(path)
    return Embedder(model_name, backend, reference, run=runner)


def int8_runner(backend: str, path: Path, lanes: int
                ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A CPU int8 backend's model call, for `lanes` threads calling it at once on a core each:
    one ONNX Runtime session of one thread, or OpenVINO with a stream per lane."""
    if backend == "onnx-int8":
        return _onnxruntime_session(path, 1)  # sessions take concurrent runs
    return _openvino_model(path, lanes, int8=True)


def _onnxruntime_session(path: Path, threads: int | None = None
                         ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, {k: v for k, v in feed.items() if k in wanted})[0]

    return run


def _openvino_model(path: Path, streams: int = 1, int8: bool = False
                    ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """OpenVINO on the CPU; with `streams` > 1, that many requests run at once, on a core each;
    `int8`: activations quantized on the fly in groups of OPENVINO_INT8_GROUP_SIZE."""
    import openvino as ov

    core = ov.Core()
    # f32 explicitly: on bf16-capable CPUs OpenVINO would otherwise compute in bf16 unasked.
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32",
                              "INFERENCE_NUM_THREADS": cpu_threads()}
    if streams > 1:
        config["NUM_STREAMS"] = streams
    if int8:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = OPENVINO_INT8_GROUP_SIZE
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    wanted = {i.get_any_name() for i in compiled.inputs}
    # A request per thread: requests are not thread-safe, and a new one per call cost a fifth
    # of int8's time (1.59x torch fp32 against 1.94x, docs/benchmarks.md).
    requests = threading.local()

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(requests, "request", None)
        if request is None:
            request = requests.request = compiled.create_infer_request()
        # infer() copies the outputs out of the request, which the next call overwrites.
        result = request.infer({k: v for k, v in feed.items() if k in wanted})
        return np.asarray(result[compiled.outputs[0]])

    return run
