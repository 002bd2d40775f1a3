"""Embedding backends beside torch fp32 on this machine: throughput, cosine, retrieval deltas."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from headwater.errors import HeadwaterError  # noqa: E402
from tasks.embedding_backends import (  # noqa: E402
    BACKENDS,
    REFERENCE,
    BackendUnavailable,
    Embedder,
    GuardResult,
    choose_backend,
    cpu_flags,
    cuda_available,
    guard_file,
    instruction_set,
    write_guard,
)

DOCS = Path("/usr/share/doc/python3.11/html")
PASSAGE_CHARS = 1000  # about 200 tokens: the size of a chunk
MIN_PASSAGE_CHARS = 200
QUESTION_SAMPLE = 64  # headings: about 10 tokens, a question's length
QUESTION_BATCHES = (1, 16)


class DocsMissing(HeadwaterError):
    """Python's HTML documentation is not installed where the benchmark looks."""


def section_passages(html: str, page: str) -> list[tuple[str, str, str]]:
    """(id, heading, text) per section of a Sphinx page: the section's own paragraphs, without
    its heading and without its subsections."""
    from bs4 import BeautifulSoup, Tag

    soup = BeautifulSoup(html, "lxml")
    found = []
    for section in soup.select("div.body section[id]"):
        heading = section.find(["h1", "h2", "h3", "h4"], recursive=False)
        if heading is None:
            continue
        title = " ".join(heading.get_text(" ").replace("¶", "").split())
        parts = [c.get_text(" ") for c in section.children
                 if isinstance(c, Tag) and c is not heading and c.name != "section"]
        text = " ".join(" ".join(parts).split())[:PASSAGE_CHARS]
        if len(text) >= MIN_PASSAGE_CHARS and len(title.split()) >= 2:
            found.append((f"{page}#{section['id']}", title, text))
    return found


def labelled_set(html_dir: Path, queries: int, seed: int) -> tuple[list[str], list[str]]:
    """Passages and their headings as queries (query i's one relevant passage is passage i),
    from library pages taken in a seeded order until `queries` sections with a heading found
    nowhere else are collected. Deterministic for the same docs and seed."""
    pages = sorted((html_dir / "library").glob("*.html"))
    if not pages:
        raise DocsMissing(f"Python's HTML docs are not in {html_dir}",
                          "install them with `apt-get install -y python3.11-doc`")
    random.Random(seed).shuffle(pages)
    sections: list[tuple[str, str, str]] = []
    for page in pages:
        sections += section_passages(page.read_text(errors="replace"), page.name)
        titles = [s[1].lower() for s in sections]
        if sum(titles.count(t) == 1 for t in titles) >= queries:
            break
    titles = [s[1].lower() for s in sections]
    unique = [s for s in sections if titles.count(s[1].lower()) == 1][:queries]
    return [s[2] for s in unique], [s[1] for s in unique]


def retrieval_scores(passages: np.ndarray, questions: np.ndarray) -> dict[str, float]:
    """recall@5 and nDCG@10 in points, by brute-force cosine (vectors are normalised)."""
    from tasks.evaluate import ndcg_at, recall_at

    top = np.argsort(-(questions @ passages.T), axis=1)[:, :10]
    recall, ndcg = [], []
    for i, ranked in enumerate(top):
        ids = [str(j) for j in ranked]
        recall.append(recall_at(ids, {str(i)}, 5))
        ndcg.append(ndcg_at(ids, {str(i): 1}, 10))
    return {"recall_at_5": 100 * float(np.mean(recall)),
            "ndcg_at_10": 100 * float(np.mean(ndcg))}


def interleaved_seconds(embedders: dict[str, Embedder], texts: Sequence[str], repeats: int,
                        batch_size: int) -> dict[str, list[float]]:
    """Each backend encodes the same texts once per round, backends in turn: a change of load
    on this shared machine falls on all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in embedders}
    for embedder in embedders.values():  # warm-up: first calls allocate and compile
        embedder.encode(texts[:batch_size], batch_size=batch_size)
    for round_ in range(repeats):
        order = list(embedders) if round_ % 2 == 0 else list(reversed(embedders))
        for name in order:
            started = time.perf_counter()
            embedders[name].encode(texts, batch_size=batch_size)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def run(backends: Sequence[str], queries: int = 600, seed: int = 7, repeats: int = 5,
        sample: int = 96, batch_size: int = 32, html_dir: Path = DOCS,
        write: bool = True) -> dict[str, Any]:
    from headwater.settings import get_settings
    from tasks.embed import load_embedder, load_model, model_path

    settings = get_settings()
    name = settings.embedding_model
    load_start = os.getloadavg()
    passages, questions = labelled_set(html_dir, queries, seed)
    embedders: dict[str, Embedder] = {}
    refused: dict[str, str] = {}
    for backend in [REFERENCE, *[b for b in backends if b != REFERENCE]]:
        try:
            embedders[backend] = load_embedder(name, backend, settings.cache_dir)
        except BackendUnavailable as error:
            refused[backend] = error.user_message
    texts = random.Random(seed).sample(passages, min(sample, len(passages)))
    seconds = interleaved_seconds(embedders, texts, repeats, batch_size)
    chars = sum(len(t) for t in texts)
    reference_s = statistics.median(seconds[REFERENCE])
    # The API embeds one short question at a time (several when the coalescer batches them).
    asked = random.Random(seed).sample(questions, min(QUESTION_SAMPLE, len(questions)))
    question_s = {size: interleaved_seconds(embedders, asked, repeats, size)
                  for size in QUESTION_BATCHES}

    vectors = {b: (e.encode(passages, batch_size=batch_size),
                   e.encode(questions, batch_size=batch_size)) for b, e in embedders.items()}
    reference = retrieval_scores(*vectors[REFERENCE])
    rows, results = [], []
    for backend, (docs, question_vectors) in vectors.items():
        scores = retrieval_scores(docs, question_vectors)
        mixed = retrieval_scores(docs, vectors[REFERENCE][1])
        cosine = np.sum(docs * vectors[REFERENCE][0], axis=1)
        median_s = statistics.median(seconds[backend])
        result = GuardResult(
            backend=backend, recall_at_5=round(scores["recall_at_5"], 2),
            ndcg_at_10=round(scores["ndcg_at_10"], 2),
            recall_delta=round(scores["recall_at_5"] - reference["recall_at_5"], 2),
            ndcg_delta=round(scores["ndcg_at_10"] - reference["ndcg_at_10"], 2),
            cosine_mean=round(float(cosine.mean()), 5), cosine_min=round(float(cosine.min()), 5),
            speedup=round(reference_s / median_s, 2),
            mixed_recall_delta=round(mixed["recall_at_5"] - reference["recall_at_5"], 2),
            mixed_ndcg_delta=round(mixed["ndcg_at_10"] - reference["ndcg_at_10"], 2))
        results.append(result)
        rows.append({**asdict(result), "passed": result.passed,
                     "chunks_per_s": round(len(texts) / median_s, 1),
                     "chars_per_s": round(chars / median_s),
                     **{f"questions_per_s_batch{size}": round(
                         len(asked) / statistics.median(question_s[size][backend]), 1)
                        for size in QUESTION_BATCHES},
                     "seconds": [round(s, 2) for s in seconds[backend]],
                     # Round by round, torch fp32's seconds over the backend's in that round.
                     "speedup_rounds": sorted(round(r / b, 2) for r, b in zip(
                         seconds[REFERENCE], seconds[backend], strict=True))})
    path = guard_file(settings.cache_dir, model_path(name))
    if write:
        write_guard(path, model_path(name), results)
    return {
        "model": name, "cpu": _cpu_name(), "instruction_set": instruction_set(cpu_flags()),
        "threads": len(os.sched_getaffinity(0)), "cuda": cuda_available(),
        "benchmark": f"python3.11-doc library sections, seed {seed}: {len(questions)} headings "
                     f"as queries over {len(passages)} passages",
        "sample": {"texts": len(texts), "chars": chars, "repeats": repeats,
                   "batch_size": batch_size, "questions": len(asked),
                   "question_tokens_mean": round(float(np.mean(
                       [len(load_model(name).tokenizer(q)["input_ids"]) for q in asked])), 1)},
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows, "refused": refused, "auto": choose_backend(results),
        "guard_file": str(path) if write else None,
        "max_tokens": load_model(name).max_seq_length,
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| backend | chunks/s | chars/s | x torch fp32 | cosine mean | cosine min | "
        "recall@5 | Δ | nDCG@10 | Δ | Δ recall, Δ nDCG (fp32 questions) | guard | "
        "questions/s (batch 1) | questions/s (batch 16) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['backend']} | {r['chunks_per_s']} | {r['chars_per_s']} | {r['speedup']:.2f} | "
            f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['recall_at_5']:.2f} | "
            f"{r['recall_delta']:+.2f} | {r['ndcg_at_10']:.2f} | {r['ndcg_delta']:+.2f} | "
            f"{r['mixed_recall_delta']:+.2f}, {r['mixed_ndcg_delta']:+.2f} | "
            f"{'pass' if r['passed'] else 'FAIL'} | {r['questions_per_s_batch1']} | "
            f"{r['questions_per_s_batch16']} |")
    for backend, why in report["refused"].items():
        lines.append(f"| {backend} | refused: {why} |" + " |" * 12)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated; torch fp32 is always measured as the reference")
    parser.add_argument("--queries", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample", type=int, default=96, help="texts per throughput round")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--html-dir", type=Path, default=DOCS)
    parser.add_argument("--no-write", action="store_true",
                        help="do not record the guard results `auto` reads")
    parser.add_argument("--json", type=Path, help="also write the whole report here")
    args = parser.parse_args()
    try:
        report = run(args.backends.split(","), args.queries, args.seed, args.repeats,
                     args.sample, html_dir=args.html_dir, write=not args.no_write)
    except HeadwaterError as error:
        sys.exit(f"{error.user_message}\n{error.log_message}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
