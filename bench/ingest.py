"""Ingestion benchmark: stage throughput per embedding backend, compliance cost, Prefect share."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = [
    "pump", "impeller", "valve", "pressure", "flow", "service", "customer", "order", "warranty",
    "inspection", "seal", "bearing", "motor", "housing", "calibration", "schedule", "supplier",
    "invoice", "safety", "procedure", "engineer", "approval", "report", "quarter", "budget",
    "release", "incident", "outage", "network", "database", "backup", "restore", "policy",
    "employee", "manager", "training", "audit", "compliance", "contract", "delivery", "quality",
    "test", "sensor", "telemetry",
]
PEOPLE = ["Jane Roe", "Margaret Whitfield", "Daniel Okafor", "Priya Natarajan", "Tom Becker"]
# The stages of a sync, as SyncSummary.seconds names them; "compliance" is redact_pii.
STAGES = ("fetch", "parse", "validate", "compliance", "chunk", "embed", "index", "commit")
# Which text a stage reads: the parsed documents, or the chunks (overlap included).
READS_CHUNKS = ("embed", "index", "commit")


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
    """Small Markdown documents, a title and one short paragraph (about 200-500 characters):
    one chunk each, so 10,000 of them embed in minutes on 2 cores."""
    rng = random.Random(seed)
    for i in range(documents):
        path = root / f"team-{i % 20:02}" / f"doc-{i:05}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Document {i}\n\n{_paragraph(rng, rng.randint(2, 4))}\n")


def _rate(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 1) if seconds > 0 else None


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


class Bench:
    """One corpus, and a fresh state DB and collection for every run over it."""

    def __init__(self, work: Path, policy: list[str], batch_size: int | None = None) -> None:
        self.work, self.policy = work, policy
        self.corpus, self.large = work / "corpus", work / "large"
        self.warmup = work / "warmup"
        sized = {"batch_size": batch_size} if batch_size else {}
        sources = [{"name": name, "type": "folder", "params": {"root": str(root)},
                    "principals": {"": ["group:staff"]}, "policy": frameworks, **sized}
                   for name, root, frameworks in (("plain", self.corpus, []),
                                                  ("policy", self.corpus, policy),
                                                  ("large", self.large, []),
                                                  ("warmup", self.warmup, policy))]
        (work / "headwater.yaml").write_text(json.dumps({"sources": sources}))
        os.environ["HEADWATER_CONFIG"] = str(work / "headwater.yaml")
        os.environ.setdefault("HEADWATER_SUBJECT_KEY", uuid.uuid4().hex * 2)
        self.collections: list[str] = []

    def fresh(self, backend: str) -> Any:
        """Settings for a run of its own: the backend, an empty state DB and collection."""
        from headwater.settings import get_settings

        run = uuid.uuid4().hex[:8]
        self.collections.append(f"Bench{run}")
        os.environ.update({"HEADWATER_EMBEDDING_BACKEND": backend,
                           "HEADWATER_STATE_DB_URL": f"sqlite:///{self.work / run}.db",
                           "HEADWATER_COLLECTION": f"Bench{run}"})
        get_settings.cache_clear()
        return get_settings()

    def drop_collections(self) -> None:
        from headwater.settings import get_settings
        from tasks.index import connect_index, delete_index

        with connect_index(get_settings()) as client:
            for name in self.collections:
                delete_index(client, name)


def plain_sync(source: str) -> dict:
    """The sync flow's stages as plain functions, in the flow's order and with its overlaps
    (batch N written on a thread while batch N+1 is prepared; under a policy, batch N+1
    redacted while batch N is embedded), without Prefect."""
    from flows.sync import REDACT_AHEAD
    from headwater.settings import get_settings
    from tasks import ingest

    ctx = ingest.open_sync(get_settings(), source, full=False)
    summary = ingest.SyncSummary(source)
    deletions = ingest.HeldDeletions()

    def write(batch: ingest.Batch) -> ingest.Batch:
        for stage in (ingest.validate_chunks, ingest.index_chunks, ingest.commit_batch):
            batch = stage(ctx, batch)
        return batch

    def prepared() -> Iterator[ingest.Batch]:
        # As the flow does under a policy: the next REDACT_AHEAD batches redacted while one
        # is embedded.
        redacting: deque[Future] = deque()
        for batch in ingest.list_pages(ctx):
            batch = deletions.hold(batch)
            for stage in (ingest.fetch_documents, ingest.parse_documents,
                          ingest.validate_documents):
                batch = stage(ctx, batch) if batch.changes else batch
            if ctx.policy is None:
                yield ingest.redact_pii(ctx, batch) if batch.changes else batch
                continue
            redacting.append(redactor.submit(ingest.redact_pii, ctx, batch))
            if len(redacting) > REDACT_AHEAD:
                yield redacting.popleft().result()
        while redacting:
            yield redacting.popleft().result()

    with ThreadPoolExecutor(1) as writer, ThreadPoolExecutor(REDACT_AHEAD) as redactor:
        pending: Future | None = None
        for batch in prepared():
            for stage in (ingest.chunk_documents, ingest.embed_chunks):
                batch = stage(ctx, batch) if batch.changes else batch
            if pending is not None:
                summary.add(pending.result())
            pending = writer.submit(write, batch)
        if pending is not None:
            summary.add(pending.result())
    assert not deletions, "a first sync deletes nothing"
    return ingest.close_sync(ctx, summary, "completed")


def stage_table(summary: dict, doc_chars: int, chunk_chars: int) -> dict[str, dict]:
    rows = {}
    for stage in STAGES:
        seconds = summary["seconds"].get(stage, 0.0)
        chars = chunk_chars if stage in READS_CHUNKS else doc_chars
        rows["redact_pii" if stage == "compliance" else stage] = {
            "seconds": round(seconds, 2), "chars_per_s": _rate(chars, seconds),
            "chunks_per_s": _rate(summary["chunks_written"], seconds)}
    return rows


def cpu_seconds(settings: Any) -> dict[str, float]:
    """CPU seconds used so far by this process and by each running server of the stack,
    children included: Prefect's work happens in both."""
    import psutil

    from headwater.stack import components, pid_of

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in process.children(recursive=True):
            with suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        return total

    seconds = {"bench": used(psutil.Process())}
    for component in components(settings):
        pid = pid_of(settings, component.name)
        if pid is not None:
            with suppress(psutil.Error):  # it stopped since
                seconds[component.name] = used(psutil.Process(pid))
    return seconds


def sync_run(bench: Bench, backend: str, source: str, doc_chars: int, chunk_chars: int,
             raw_s: float, plain: bool = False) -> dict:
    from flows.sync import sync_source

    settings = bench.fresh(backend)
    before = cpu_seconds(settings)
    summary, wall = _timed(lambda: plain_sync(source) if plain else sync_source(source))
    after = cpu_seconds(settings)
    assert summary["status"] == "completed" and summary["quarantined"] == 0, summary
    return {"wall_s": round(wall, 1), "chunks": summary["chunks_written"],
            "cpu_s": {k: round(after[k] - before[k], 2) for k in after if k in before},
            "documents_per_s": _rate(summary["new"], wall),
            "chunks_per_s": _rate(summary["chunks_written"], wall),
            # Raw encode time of the same chunks over the sync's wall time.
            "to_raw_encode": round(raw_s / wall, 3),
            # How long the embedder (on torch-fp16, the GPU) waited on the CPU's stages: the
            # sync's time outside the embed stage, which runs on the flow's thread only.
            "embedder_waits_s": round(wall - summary["seconds"].get("embed", 0.0), 1),
            "embedder_waits_share": round(1 - summary["seconds"].get("embed", 0.0) / wall, 3),
            "stages": stage_table(summary, doc_chars, chunk_chars)}


def backend_rounds(bench: Bench, embedder: Any, backend: str, texts: list[str],
                   doc_chars: int, chunk_chars: int, rounds: int, batch_size: int) -> dict:
    """Raw encode and the two syncs, `rounds` times in turn: a neighbour's load on a shared
    machine moves all three of a round alike, so each round's ratios stand, and the median
    round's stage table is printed."""
    runs = []
    for _ in range(rounds):
        _, raw_s = _timed(lambda: embedder.encode(texts, batch_size))
        runs.append({"raw_encode_s": round(raw_s, 2), **{
            name: sync_run(bench, backend, source, doc_chars, chunk_chars, raw_s)
            for name, source in (("compliance_off", "plain"), ("compliance_on", "policy"))}})
    ranked = sorted(runs, key=lambda r: r["compliance_on"]["to_raw_encode"])
    median = ranked[len(ranked) // 2]
    raw_s = median["raw_encode_s"]
    return {"resolved": embedder.backend, "raw_encode_s": raw_s,
            "raw_chunks_per_s": _rate(len(texts), raw_s),
            "raw_chars_per_s": _rate(chunk_chars, raw_s),
            "compliance_off": median["compliance_off"], "compliance_on": median["compliance_on"],
            "median_to_raw_encode": {k: statistics.median(r[k]["to_raw_encode"] for r in runs)
                                     for k in ("compliance_off", "compliance_on")},
            "rounds": [{"raw_encode_s": r["raw_encode_s"],
                        **{k: {"wall_s": r[k]["wall_s"], "to_raw_encode": r[k]["to_raw_encode"],
                               "cpu_s": r[k]["cpu_s"]}
                           for k in ("compliance_off", "compliance_on")}} for r in runs]}


def prefect_share(rounds: list[dict[str, dict]], backend: str, documents: int) -> dict:
    """Prefect's share of the flow's wall time, and of the CPU time the machine spent on the
    ingest (this process and the stack's servers), each round's and their medians. The CPU
    share is the steadier reading: a neighbour's load on a shared machine stretches wall time
    but not the work done."""
    def share(flow: float, plain: float) -> float:
        return round((flow - plain) / flow, 4)

    rows = []
    for r in rounds:
        cpu = {kind: sum(r[kind]["cpu_s"].values()) for kind in ("flow", "plain")}
        rows.append({"flow_wall_s": r["flow"]["wall_s"], "plain_wall_s": r["plain"]["wall_s"],
                     "wall_share": share(r["flow"]["wall_s"], r["plain"]["wall_s"]),
                     "flow_cpu_s": round(cpu["flow"], 1), "plain_cpu_s": round(cpu["plain"], 1),
                     "cpu_share": share(cpu["flow"], cpu["plain"]),
                     "cpu_s": {kind: r[kind]["cpu_s"] for kind in ("flow", "plain")}})
    median = statistics.median
    return {"backend": backend, "documents": documents, "rounds": rows,
            "chunks": rounds[0]["flow"]["chunks"],
            "median_flow_wall_s": median(r["flow_wall_s"] for r in rows),
            "median_plain_wall_s": median(r["plain_wall_s"] for r in rows),
            "median_wall_share": median(r["wall_share"] for r in rows),
            "median_cpu_share": median(r["cpu_share"] for r in rows),
            "stage_seconds": {k: {s: v["seconds"] for s, v in rounds[-1][k]["stages"].items()}
                              for k in ("flow", "plain")}}


def compliance_figures(parsed: Sequence[Any], frameworks: list[str]) -> dict:
    """The compliance stage (Policy.apply) in process and in worker processes, spaCy's own
    n_process, against Presidio's plain per-document analyze() loop, on the same documents."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    from headwater.config import source_config
    from headwater.settings import get_settings
    from tasks import compliance

    settings = get_settings()
    policy = compliance.load_policy(source_config(settings.config, "policy"), settings)
    texts = [p.text for p in parsed]
    chars = sum(map(len, texts))
    one = compliance.Policy(**{**policy.__dict__, "processes": 1})
    one.apply(parsed[:10])  # the pipeline loaded before any clock starts
    figures: dict[str, Any] = {"documents": len(parsed), "chars": chars,
                               "processes": policy.processes}
    compliance.shutdown_pool()
    _, seconds = _timed(lambda: policy.apply(parsed))
    # Starting the forkserver, its imports and a pipeline per worker, with a first pass.
    figures["pool_start_and_first_pass_s"] = round(seconds, 2)
    rows = {}
    _, rows["stage_pool"] = _timed(lambda: policy.apply(parsed))
    _, rows["stage_in_process"] = _timed(lambda: one.apply(parsed))
    engine = compliance.analyzer(policy.model, policy.recognizers)
    _, rows["batch_spacy_n_process"] = _timed(lambda: list(engine.analyze_iterator(
        texts, language="en", batch_size=compliance.ANALYZER_BATCH, n_process=policy.processes,
        entities=policy.entities, score_threshold=policy.min_score)))
    # The naive way: Presidio on the whole installed pipeline, one analyze() per document.
    full = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": [
        {"lang_code": "en", "model_name": policy.model}]}).create_engine()
    naive = AnalyzerEngine(nlp_engine=full, supported_languages=["en"])
    naive.analyze(texts[0], language="en")
    _, rows["plain_analyze_loop"] = _timed(lambda: [naive.analyze(
        t, language="en", entities=policy.entities, score_threshold=policy.min_score)
        for t in texts])
    figures["chars_per_s"] = {k: round(chars / s) for k, s in rows.items()}
    figures["stage_to_plain_loop"] = round(rows["plain_analyze_loop"] / rows["stage_pool"], 2)
    figures["recognizers"] = recognizer_costs(policy, texts, rows["stage_in_process"])
    return figures


def recognizer_costs(policy: Any, texts: list[str], stage_s: float) -> list[dict]:
    """Each recognizer the policy runs: its own seconds on the texts (the NER's once for all),
    and the findings the stage loses without it."""
    from tasks import compliance

    engine = compliance.analyzer(policy.model, policy.recognizers).analyzer_engine
    artifacts, ner_s = _timed(lambda: [a for _, a in engine.nlp_engine.process_batch(
        texts, "en", batch_size=compliance.ANALYZER_BATCH)])

    def findings(analyzer: Any) -> set[tuple[int, str, int, int]]:
        found = set()
        for n, (text, nlp) in enumerate(zip(texts, artifacts, strict=True)):
            spans = [compliance.Span(r.entity_type, r.start, r.end, r.score) for r in
                     analyzer.analyze(text, "en", entities=policy.entities,
                                      score_threshold=policy.min_score, nlp_artifacts=nlp)]
            found |= {(n, s.entity_type, s.start, s.end) for s in policy._without_overlaps(spans)}
        return found

    every = findings(engine)
    rows = [{"recognizer": "spaCy NER (the pipeline)", "entities": "PERSON, LOCATION, NRP, ...",
             "seconds": round(ner_s, 2), "share_of_stage": round(ner_s / stage_s, 3),
             "findings": None, "findings_added": None}]
    for recognizer in engine.registry.get_recognizers("en", policy.entities):
        found, seconds = _timed(lambda r=recognizer: [
            x for t, a in zip(texts, artifacts, strict=True)
            for x in r.analyze(t, policy.entities, a) or [] if x.score >= policy.min_score])
        if recognizer.name == "SpacyRecognizer":
            without = set()  # the NER's own findings: its cost is the row above
            added = {f for f in every if f[1] in ("PERSON", "LOCATION", "NRP", "DATE_TIME")}
        else:
            without = findings(compliance.analyzer(policy.model, policy.recognizers,
                                                   (recognizer.name,)).analyzer_engine)
            added = every - without
        rows.append({"recognizer": recognizer.name,
                     "entities": ", ".join(sorted(set(recognizer.supported_entities)
                                                  & set(policy.entities))),
                     "seconds": round(seconds, 3), "share_of_stage": round(seconds / stage_s, 3),
                     "findings": len(found), "findings_added": len(added)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=2_000,
                        help="Documents of the per-backend runs, compliance off and on.")
    parser.add_argument("--prefect-documents", type=int, default=10_000,
                        help="Documents of the flow-against-plain-functions runs.")
    parser.add_argument("--backend", action="append", default=[],
                        help="Embedding backends to run (repeatable); default torch and auto.")
    parser.add_argument("--policy", action="append", default=[],
                        help="Frameworks of the compliance-on runs (repeatable); default gdpr.")
    parser.add_argument("--prefect-rounds", type=int, default=3,
                        help="Flow and plain-function runs of the large ingest, alternating.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Per backend: rounds of raw encode, then a sync with compliance off "
                             "and one with it on (the figures are the rounds' medians).")
    parser.add_argument("--compliance-sample", type=int, default=1000,
                        help="Documents the compliance stage and the plain loop both read.")
    parser.add_argument("--batch-size", type=int,
                        help="Documents per batch of every source (default: the sources' own).")
    parser.add_argument("--output", type=Path, help="Write the figures as JSON here too.")
    args = parser.parse_args()
    backends = list(dict.fromkeys(args.backend or ["torch", "auto"]))
    load_start = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="headwater-bench-"))
    bench = Bench(work, args.policy or ["gdpr"], args.batch_size)
    write_corpus(bench.corpus, args.documents)
    write_corpus(bench.large, args.prefect_documents)
    write_corpus(bench.warmup, 64, seed=11)

    from connectors.base import Change, ChangeKind
    from connectors.filesystem import FolderConnector
    from headwater.config import source_config
    from tasks.chunk import chunk_documents
    from tasks.embed import load_embedder
    from tasks.parse import parse_document

    settings = bench.fresh("torch")
    connector = FolderConnector(source_config(settings.config, "plain"))
    parsed = [parse_document(connector.fetch(Change(rel, ChangeKind.ADDED, "v")))
              for rel, _ in connector._files()]
    embedder = load_embedder(settings.embedding_model, "torch", settings.cache_dir)
    texts = [c.text for cs in chunk_documents(parsed, embedder.tokenizer, settings.chunk_tokens,
                                              settings.chunk_overlap).values() for c in cs]
    doc_chars, chunk_chars = sum(len(p.text) for p in parsed), sum(map(len, texts))
    figures: dict[str, Any] = {
        "documents": args.documents, "chunks": len(texts), "document_chars": doc_chars,
        "chunk_chars": chunk_chars, "policy": bench.policy,
        "batch_size": source_config(settings.config, "plain").batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start": [round(x, 2) for x in load_start], "backends": {}}
    try:
        figures["compliance"] = compliance_figures(parsed[: args.compliance_sample],
                                                   bench.policy)
        # The first flow run of a process pays for Prefect's client, the quality gate's
        # context and imports (seconds, whatever the corpus): timed here, then left out.
        figures["first_sync_s"] = sync_run(bench, backends[0], "warmup", 1, 1, 1.0)["wall_s"]
        for backend in backends:
            embedder = load_embedder(settings.embedding_model, backend, settings.cache_dir)
            embedder.encode(texts[:64], settings.embedding_batch_size)  # warm-up
            figures["backends"][backend] = backend_rounds(
                bench, embedder, backend, texts, doc_chars, chunk_chars, args.rounds,
                settings.embedding_batch_size)
        # Prefect's share: the large ingest on the last backend named, through the flow and
        # as plain functions (compliance off: its cost is the same either way, and its time is
        # better spent on a larger corpus), in rounds of alternating order.
        default = backends[-1]
        rounds = []
        for n in range(args.prefect_rounds):
            order = ("flow", "plain") if n % 2 == 0 else ("plain", "flow")
            rounds.append({kind: sync_run(bench, default, "large", 0, 0, 1.0,
                                          plain=kind == "plain") for kind in order})
        if rounds:  # --prefect-rounds 0: the per-backend figures only
            figures["prefect"] = prefect_share(rounds, default, args.prefect_documents)
    finally:
        bench.drop_collections()
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=2))
    print_table(figures)
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


def print_table(figures: dict) -> None:
    print(f"\n{figures['documents']} documents, {figures['chunks']} chunks; load "
          f"{figures['load_average_start']} -> {figures['load_average_end']}; the process's "
          f"first sync (64 documents, left out) {figures['first_sync_s']:.1f} s")
    for backend, row in figures["backends"].items():
        print(f"\n{backend} ({row['resolved']}): raw encode {row['raw_chunks_per_s']} chunks/s, "
              f"{row['raw_chars_per_s']} chars/s")
        print(f"{'stage':<12}" + "".join(f"{c:>26}" for c in ("off: chars/s, chunks/s",
                                                             "on: chars/s, chunks/s")))
        for stage in row["compliance_off"]["stages"]:
            cells = [row[k]["stages"][stage] for k in ("compliance_off", "compliance_on")]
            print(f"{stage:<12}" + "".join(f"{c['chars_per_s']!s:>16}{c['chunks_per_s']!s:>10}"
                                           for c in cells))
        for n, r in enumerate(row["rounds"], 1):
            off, on = r["compliance_off"], r["compliance_on"]
            print(f"round {n}: raw encode {r['raw_encode_s']} s; compliance off {off['wall_s']} s "
                  f"({off['to_raw_encode']:.1%}), on {on['wall_s']} s ({on['to_raw_encode']:.1%})")
        print("median round (by the compliance-on ratio), stages above and:")
        for k in ("compliance_off", "compliance_on"):
            device = "the GPU" if row["resolved"] == "torch-fp16" else "the embedder"
            print(f"end to end, {k}: {row[k]['chunks_per_s']} chunks/s, "
                  f"{row[k]['to_raw_encode']:.1%} of raw encode ({row[k]['wall_s']} s); "
                  f"{device} waited on CPU stages {row[k]['embedder_waits_s']} s "
                  f"({row[k]['embedder_waits_share']:.1%})")
    c = figures["compliance"]
    print(f"\ncompliance on {c['documents']} documents: " + ", ".join(
        f"{k} {v} chars/s" for k, v in c["chars_per_s"].items())
        + f"; stage / plain loop {c['stage_to_plain_loop']}x")
    for r in c["recognizers"]:
        print(f"  {r['recognizer']:<28} {r['seconds']:>7} s {r['share_of_stage']:>7.1%} "
              f"findings {r['findings']} added {r['findings_added']}")
    p = figures.get("prefect")
    if p is None:
        return
    print(f"\nPrefect, {p['documents']} documents ({p['chunks']} chunks), {p['backend']}:")
    for n, r in enumerate(p["rounds"], 1):
        print(f"  round {n}: wall flow {r['flow_wall_s']} s, plain {r['plain_wall_s']} s, share "
              f"{r['wall_share']:.2%}; CPU flow {r['flow_cpu_s']} s, plain {r['plain_cpu_s']} s, "
              f"share {r['cpu_share']:.2%}")
    print(f"  median share: wall {p['median_wall_share']:.2%}, CPU {p['median_cpu_share']:.2%}")


if __name__ == "__main__":
    main()
