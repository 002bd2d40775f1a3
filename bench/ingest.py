"""Ingestion benchmark: sync throughput against raw `model.encode`, and no-change re-sync cost."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = [
    "pump",
    "impeller",
    "valve",
    "pressure",
    "flow",
    "service",
    "customer",
    "order",
    "warranty",
    "inspection",
    "seal",
    "bearing",
    "motor",
    "housing",
    "calibration",
    "schedule",
    "supplier",
    "invoice",
    "safety",
    "procedure",
    "engineer",
    "approval",
    "report",
    "quarter",
    "budget",
    "release",
    "incident",
    "outage",
    "network",
    "database",
    "backup",
    "restore",
    "policy",
    "employee",
    "manager",
    "training",
    "audit",
    "compliance",
    "contract",
    "delivery",
    "quality",
    "test",
    "sensor",
    "telemetry",
]


PEOPLE = ["Jane Roe", "Margaret Whitfield", "Daniel Okafor", "Priya Natarajan", "Tom Becker"]


def _paragraph(rng: random.Random, sentences: int) -> str:
    text = " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
        for _ in range(sentences)
    )
    if rng.random() < 0.3:  # personal data for the compliance stage to find
        first, last = rng.choice(PEOPLE).split()
        text += (f" Ask {first} {last} ({first.lower()}.{last.lower()}@example.com, "
                 f"+1 202 555 01{rng.randint(10, 99)}).")
    return text


def write_corpus(root: Path, documents: int, seed: int = 7) -> None:
    """Markdown documents of 2-4 sections each, about 1,500-3,000 characters."""
    rng = random.Random(seed)
    for i in range(documents):
        sections = [
            f"## Section {s + 1}\n\n{_paragraph(rng, rng.randint(4, 8))}"
            for s in range(rng.randint(2, 4))
        ]
        path = root / f"team-{i % 20:02}" / f"doc-{i:05}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Document {i}\n\n" + "\n\n".join(sections) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--output", type=Path, help="Write the figures as JSON here too.")
    parser.add_argument("--policy", action="append", default=[],
                        help="Compliance frameworks for the source (e.g. gdpr); none by default.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="headwater-bench-"))
    corpus = work / "corpus"
    write_corpus(corpus, args.documents)
    (work / "headwater.yaml").write_text(
        json.dumps(
            {
                "sources": [
                    {
                        "name": "bench",
                        "type": "folder",
                        "params": {"root": str(corpus)},
                        "principals": {"": ["group:staff"]},
                        "policy": args.policy,
                    }
                ]
            }
        )
    )
    collection = f"Bench{uuid.uuid4().hex[:8]}"
    os.environ.update(
        {
            "HEADWATER_CONFIG": str(work / "headwater.yaml"),
            "HEADWATER_STATE_DB_URL": f"sqlite:///{work / 'state.db'}",
            "HEADWATER_COLLECTION": collection,
        }
    )
    if args.policy:
        os.environ.setdefault("HEADWATER_SUBJECT_KEY", uuid.uuid4().hex * 2)

    from connectors.base import Change, ChangeKind
    from connectors.filesystem import FolderConnector
    from flows.sync import sync_source
    from headwater.config import source_config
    from headwater.settings import get_settings
    from tasks.chunk import chunk_documents
    from tasks.embed import encode, load_model
    from tasks.index import connect_index, delete_index
    from tasks.parse import parse_document

    settings = get_settings()
    model = load_model(settings.embedding_model)

    # Raw encode on exactly the chunks the pipeline will embed, with the same batch size.
    connector = FolderConnector(source_config(settings.config, "bench"))
    parsed = [
        parse_document(connector.fetch(Change(rel, ChangeKind.ADDED, "v")))
        for rel, _ in connector._files()
    ]
    texts = [
        c.text
        for cs in chunk_documents(
            parsed, model.tokenizer, settings.chunk_tokens, settings.chunk_overlap
        ).values()
        for c in cs
    ]
    parsed_chars = sum(len(p.text) for p in parsed)
    encode(model, texts[:64], settings.embedding_batch_size)  # warm-up
    started = time.perf_counter()
    encode(model, texts, settings.embedding_batch_size)
    raw_s = time.perf_counter() - started

    started = time.perf_counter()
    first = sync_source("bench")
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    second = sync_source("bench")
    second_s = time.perf_counter() - started

    with connect_index(settings) as client:
        delete_index(client, collection)

    figures = {
        "documents": args.documents,
        "chunks": len(texts),
        "raw_encode_chunks_per_s": round(len(texts) / raw_s, 1),
        "sync_seconds": round(first_s, 1),
        "sync_documents_per_s": round(args.documents / first_s, 1),
        "sync_chunks_per_s": round(first["chunks_written"] / first_s, 1),
        "pipeline_to_raw_encode": round(raw_s / first_s, 3),
        "stage_seconds": first["seconds"],
        # Both suites on every batch (Great Expectations), as a share of the whole sync.
        "validation_share_of_sync": round(first["seconds"]["validate"] / first_s, 4),
        "policy": args.policy,
        # The compliance stage reads every parsed character; the embedding stage the chunks.
        "compliance_share_of_sync": round(first["seconds"].get("compliance", 0) / first_s, 4),
        "compliance_chars_per_s": round(parsed_chars / first["seconds"]["compliance"])
        if args.policy and first["seconds"].get("compliance") else None,
        "embed_chars_per_s": round(sum(map(len, texts)) / first["seconds"]["embed"]),
        "no_change_resync_seconds": round(second_s, 2),
        "no_change_resync_fraction": round(second_s / first_s, 4),
        "no_change_resync_embedded": second["embedded"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    # Redaction changes the text, so with a policy the chunks differ slightly from raw ones.
    assert args.policy or first["chunks_written"] == len(texts), (first, len(texts))
    print(json.dumps(figures, indent=2))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
