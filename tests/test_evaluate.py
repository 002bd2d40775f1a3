"""Retrieval evaluation: metrics, query sets, benchmark labels, A/B verdicts on a real index."""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FolderSource

from headwater.settings import PROJECT_ROOT, Settings, get_settings
from headwater.state import StateStore
from tasks.evaluate import (
    LabelledQuery,
    QuerySetError,
    VariantError,
    choose_tuned,
    compare_paired,
    judged_ids,
    ndcg_at,
    parse_query_set,
    parse_variant,
    percentile,
    recall_at,
    reciprocal_rank,
    select_split,
    split_of,
)
from tasks.retrieve import RetrievedChunk, RetrievedDocument

# -- metrics, by hand --------------------------------------------------------------------------


def test_recall_at_k_counts_the_relevant_documents_found_in_the_first_k() -> None:
    ranked = ["a", "x", "b", "y", "c", "z"]
    relevant = {"a", "b", "c", "d"}
    assert [recall_at(ranked, relevant, k) for k in (1, 2, 3, 5, 10)] == [
        0.25, 0.25, 0.5, 0.75, 0.75]


def test_reciprocal_rank_is_one_over_the_first_relevant_rank_within_k() -> None:
    assert reciprocal_rank(["a", "b"], {"a"}) == 1.0
    assert reciprocal_rank(["x", "y", "a", "b"], {"a", "b"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(["x"] * 10 + ["a"], {"a"}, k=10) == 0.0
    assert reciprocal_rank([], {"a"}) == 0.0


def test_ndcg_uses_the_grades_and_rewards_the_ideal_order() -> None:
    gains = {"a": 3, "b": 2, "c": 1}
    # DCG = (2^2-1)/log2(2) + 0 + (2^3-1)/log2(4) = 3 + 3.5; ideal = 7 + 3/log2(3) + 1/2.
    assert ndcg_at(["b", "x", "a"], gains) == pytest.approx(6.5 / 9.392789, abs=1e-6)
    assert ndcg_at(["a", "b", "c"], gains) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], gains) == 0.0


def test_ndcg_without_grades_is_binary_and_counts_a_repeated_document_once() -> None:
    assert ndcg_at(["x", "a"], {"a": 1}) == pytest.approx(1 / 1.5849625, abs=1e-6)
    assert ndcg_at(["a", "a", "b"], {"a": 1, "b": 1}) == pytest.approx(
        (1 + 1 / 2) / (1 + 1 / 1.5849625), abs=1e-6)


def test_a_query_may_name_relevant_documents_by_url() -> None:
    def found(doc_id: str, url: str | None) -> RetrievedDocument:
        return RetrievedDocument([RetrievedChunk(doc_id, "wiki", doc_id, url, "text", [], 0,
                                                 1.0)])

    query = LabelledQuery(query="q", relevant=["https://wiki/pump"])
    ranked = judged_ids([found("other.md", None), found("pump.md", "https://wiki/pump")], query)
    assert ranked == ["other.md", "https://wiki/pump"]
    assert recall_at(ranked, query.relevant_ids, 5) == 1.0


def test_latency_percentiles_are_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert (percentile(samples, 50), percentile(samples, 95), percentile([], 50)) == (
        50.0, 95.0, 0.0)


# -- query sets and variants -----------------------------------------------------------------


def _bad(*lines: str) -> str:
    with pytest.raises(QuerySetError) as raised:
        parse_query_set(lines, "set.jsonl")
    return raised.value.user_message


def test_query_set_errors_name_the_line_and_what_is_wrong() -> None:
    good = json.dumps({"query": "pump service", "relevant": ["pump.md"]})
    assert _bad(good, "{not json").startswith("set.jsonl, line 2: not valid JSON")
    assert _bad(json.dumps({"relevant": ["a"]})) == "set.jsonl, line 1: query: Field required"
    assert "line 3: relevant: Input should be a valid list" in _bad(
        good, "", json.dumps({"query": "q", "relevant": "a.md"}))
    assert "line 1" in _bad(json.dumps({"query": "q", "relevant": []})) and (
        "at least one relevant document" in _bad(json.dumps({"query": "q"})))
    assert "grades must be 0 or more" in _bad(json.dumps({"query": "q", "grades": {"a": -1}}))
    assert "grades.a: Input should be a valid integer" in _bad(
        json.dumps({"query": "q", "grades": {"a": "high"}}))
    assert "qeury: Extra inputs are not permitted" in _bad(
        json.dumps({"qeury": "q", "query": "q", "relevant": ["a"]}))
    assert _bad(json.dumps({"id": "q1", "query": "a", "relevant": ["a"]}),
                json.dumps({"id": "q1", "query": "b", "relevant": ["b"]})) == (
        "set.jsonl, line 2: id 'q1' is used twice")
    assert _bad("", "  ") == "set.jsonl holds no queries"


def test_a_valid_query_set_gets_ids_and_graded_relevance() -> None:
    queries = parse_query_set([
        json.dumps({"query": "pump", "relevant": ["a.md"]}), "",
        json.dumps({"id": "g", "query": "valve", "grades": {"b.md": 2, "c.md": 0}}),
    ])
    assert [q.id for q in queries] == ["line-1", "g"]
    assert queries[1].relevant_ids == {"b.md"} and queries[1].gains == {"b.md": 2}
    assert queries[0].gains == {"a.md": 1}


def test_variants_are_presets_or_named_overrides() -> None:
    assert parse_variant("bm25").alpha == 0.0 and parse_variant("vector").alpha == 1.0
    assert parse_variant("default").alpha is None and parse_variant("default").top_k == 10
    top1 = parse_variant("top1:top_k=1,max_chunks_per_doc=1")
    assert (top1.name, top1.top_k, top1.max_chunks_per_doc) == ("top1", 1, 1)
    assert parse_variant("small:collection=DocsChunks100").collection == "DocsChunks100"
    assert parse_variant({"name": "diverse", "mmr": True}).mmr
    for bad in ("x:colour=red", "x:alpha=2", "x:top_k", "x:fusion=mean",
                "x:query_properties="):
        with pytest.raises(VariantError):
            parse_variant(bad)


def test_fusion_and_keyword_properties_are_variant_overrides_of_the_settings() -> None:
    ranked = parse_variant("ranked:fusion=rankedFusion,query_properties=text+title^3")
    assert (ranked.fusion, ranked.query_properties) == ("rankedFusion", ["text", "title^3"])
    settings = Settings(retrieval_alpha=0.3, retrieval_fusion="rankedFusion",
                        retrieval_query_properties=["text"], collection="Docs")
    default = parse_variant("default").resolved(settings)
    assert (default.alpha, default.fusion, default.query_properties, default.collection) == (
        0.3, "rankedFusion", ["text"], "Docs")
    own = parse_variant("bm25:query_properties=title").resolved(settings)
    assert (own.alpha, own.fusion, own.query_properties) == (0.0, "rankedFusion", ["title"])


# -- tuning on one half, reporting on the other ----------------------------------------------


def _numbered(count: int) -> list[LabelledQuery]:
    return parse_query_set(json.dumps({"id": f"q{n}", "query": f"term {n}", "relevant": ["a"]})
                           for n in range(count))


def test_the_tuning_and_held_out_halves_are_deterministic_disjoint_and_cover_the_set() -> None:
    queries = _numbered(400)
    tune, test = select_split(queries, "tune"), select_split(queries, "test")
    tune_ids, test_ids = {q.id for q in tune}, {q.id for q in test}
    assert not tune_ids & test_ids and tune_ids | test_ids == {q.id for q in queries}
    assert 160 < len(tune) < 240, len(tune)
    assert [q.id for q in select_split(_numbered(400), "tune")] == [q.id for q in tune]
    assert select_split(queries, "all") == queries
    # A query's half follows from its id alone: a larger set keeps the smaller set's halves.
    assert {q.id for q in select_split(_numbered(800), "tune")} & {
        q.id for q in queries} == tune_ids
    assert {split_of(q.id, seed="another") for q in tune} == {"tune", "test"}
    with pytest.raises(QuerySetError, match="no split 'train'"):
        select_split(queries, "train")


def test_the_tuning_rule_takes_the_best_mean_of_recall_at_5_and_mrr_then_ndcg() -> None:
    def scored(recall: float, mrr: float, ndcg: float) -> dict:
        return {"metrics": {"recall@5": recall, "mrr@10": mrr, "ndcg@10": ndcg}}

    report = {"variants": {"bm25": scored(1.0, 1.0, 1.0), "a": scored(0.9, 0.7, 0.9),
                           "b": scored(0.8, 0.8, 0.7), "c": scored(0.7, 0.9, 0.8),
                           "d": scored(0.6, 0.8, 0.95)}}
    # a, b and c tie on the mean (0.8): nDCG decides; d's nDCG cannot make up its mean.
    assert choose_tuned(report, ["a", "b", "c", "d"]) == "a"
    assert choose_tuned(report) == "bm25"
    with pytest.raises(VariantError):
        choose_tuned(report, ["missing"])


# -- the paired comparison ------------------------------------------------------------------


def test_identical_variants_are_never_significantly_different() -> None:
    scores = [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 1.0, 0.5]
    same = compare_paired(scores, list(scores), "recall@5")
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.significant and same.verdict == "no significant difference"


def test_a_comparison_is_reproducible_and_separates_a_consistent_drop_from_noise() -> None:
    baseline = [1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0]
    worse = [s - 0.5 for s in baseline]
    first, again = (compare_paired(baseline, worse, "recall@5") for _ in range(2))
    assert first == again
    assert first.significant and first.verdict == "significantly worse"
    assert first.difference == -0.5 and first.ci_high < 0 and first.p_value < 0.01
    noisy = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    swapped = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert not compare_paired(noisy, swapped).significant


def test_stored_evaluations_are_found_by_query_set_and_variant(store: StateStore) -> None:
    for run, recall in (("run-1", 0.5), ("run-2", 0.75)):
        for variant in ("default", "bm25"):
            store.record_evaluation(run, variant, "set.jsonl", "f" * 64, {"alpha": None},
                                    {"recall@5": recall}, [{"id": "q1", "recall@5": recall}])
    store.record_evaluation("run-3", "default", "other.jsonl", "e" * 64, {}, {}, [])
    trend = store.evaluation_runs(fingerprint="f" * 64, variant="default")
    assert [(r.run_id, r.metrics["recall@5"]) for r in trend] == [("run-2", 0.75),
                                                                  ("run-1", 0.5)]
    assert trend[0].per_query == [{"id": "q1", "recall@5": 0.75}]
    assert len(store.evaluation_runs()) == 5


# -- the public benchmark's labels ----------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("python_docs",
                                                  PROJECT_ROOT / "bench" / "python_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENINDEX = """<html><body><h1>Index - A</h1>
<table style="width: 100%" class="indextable genindextable"><tr>
 <td><ul>
  <li><a href="library/re.html#re.A">A (in module re)</a></li>
  <li><a href="library/aifc.html#index-2">A-LAW</a>, <a href="library/sndhdr.html#index-0">[1]</a>
  </li>
  <li>
    abc
    <ul><li><a href="library/abc.html#module-abc">module</a></li></ul></li>
  <li><a href="c-api/sys.html#index-1">abort()</a>
    <ul>
      <li><a href="library/asyncio-sync.html#asyncio.Barrier.abort">(asyncio.Barrier method)</a>
      </li>
      <li><a href="library/os.html#os.abort">(in module os)</a></li>
    </ul></li>
  <li><a href="library/binascii.html#binascii.a2b_hex">a2b_hex() (in module binascii)</a></li>
  <li><a href="https://peps.python.org/pep-0008/">PEP 8</a></li>
 </ul></td>
</tr></table></body></html>"""


def test_genindex_terms_become_queries_and_their_linked_pages_the_labels() -> None:
    entries = _bench().genindex_entries(GENINDEX)
    assert entries == {
        "A": {"library/re.html"},
        "A-LAW": {"library/aifc.html", "library/sndhdr.html"},
        "abc": {"library/abc.html"},
        "abort()": {"c-api/sys.html", "library/asyncio-sync.html", "library/os.html"},
        "a2b_hex()": {"library/binascii.html"},
    }


def test_benchmark_queries_skip_short_terms_and_keep_only_the_chosen_pages(
        tmp_path: Path) -> None:
    bench = _bench()
    (tmp_path / "genindex-A.html").write_text(GENINDEX)
    (tmp_path / "genindex-all.html").write_text(GENINDEX.replace("abort()", "abandon()"))
    for page in ("library/os.html", "library/aifc.html", "library/re.html", "c-api/sys.html"):
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text("<html><body><p>page</p></body></html>")
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "x.html").write_text("static")
    assert bench.document_pages(tmp_path, "library") == ["library/aifc.html",
                                                         "library/os.html", "library/re.html"]
    assert "genindex-A.html" not in bench.document_pages(tmp_path)
    queries = bench.index_queries(tmp_path, {"library/os.html", "library/aifc.html"}, 10, 7)
    # "A" and "abc" are too short; a2b_hex's page and every genindex-all term are not chosen.
    assert [(q["query"], q["relevant"]) for q in queries] == [
        ("A-LAW", ["library/aifc.html"]), ("abort()", ["library/os.html"])]
    with pytest.raises(bench.DocsMissing, match="not in"):
        bench.prepare(tmp_path / "nowhere", tmp_path / "work", "library", 5, 10, 7)


# -- acceptance: variants on a real index, through the real sync and retrieval -------------

# Ten topics, each answered by two documents: a search that returns one document can find
# at most half of what answers each query.
TOPICS = {
    "pump": ("How is the BP-200 pump serviced?",
             "The BP-200 pump is serviced once a year: replace the impeller seal and grease "
             "the bearings.",
             "BP-200 pump service log: the annual pump service checks seal wear and bearing "
             "noise."),
    "vpn": ("What do I do when the VPN is down?",
            "When the VPN is down, restart the VPN client and check the status page.",
            "VPN outage runbook: if the VPN stays down, open a ticket with the network team."),
    "leave": ("How many days of annual leave do employees get?",
              "Every employee has 25 days of annual leave per year.",
              "Annual leave requests go to your manager; unused leave days carry over once."),
    "certs": ("How are TLS certificates rotated?",
              "TLS certificates are rotated every 90 days by the certificate robot.",
              "Certificate rotation runbook: renew the TLS certificate, then reload the proxy."),
    "expenses": ("How do I claim travel expenses?",
                 "Claim travel expenses in the expense tool within 30 days, with receipts.",
                 "Expense policy: travel claims need a receipt for every item over 10 euros."),
    "backup": ("How are database backups restored?",
               "Restore a database backup with the restore script, then verify checksums.",
               "Backup restore drill: each quarter we restore the nightly database backup."),
    "oncall": ("What does the on-call handover include?",
               "The on-call handover lists open incidents, pager alerts and risky changes.",
               "On-call handover checklist: review alerts, incidents and planned maintenance."),
    "security": ("How do I report a security incident?",
                 "Report a security incident to the security team hotline at once.",
                 "Security incident reporting: phishing and lost laptops are security "
                 "incidents."),
    "reviews": ("When are performance reviews held?",
                "Performance reviews are held every March and September.",
                "Performance review guide: prepare goals before the review meeting."),
    "purchase": ("Who approves purchase orders?",
                 "Purchase orders above 5,000 euros are approved by the finance director.",
                 "Purchase order approval: small purchase orders are approved by team leads."),
}
SALARY = "What are the salary bands for engineers?"


# `ranking/osprey.html` has the word only in its title (its file name); `birds.md` in its text.
RANKING = {
    "osprey.html": "<html><body><p>Clean the filters every week so that the water stays "
                   "clear.</p></body></html>",
    "birds.md": "# Birds\n\nAn osprey nests near water; herons and kingfishers fish there too, "
                "and gulls follow the boats home every evening.\n",
    "pump.md": "# Pump service\n\nThe pump is serviced yearly: replace the impeller seal.\n",
    "impeller.md": "# Impeller\n\nAn impeller seal wears out; a worn seal leaks water from the "
                   "pump housing.\n",
    "vpn.md": "# VPN\n\nWhen the VPN is down, restart the client.\n",
    "leak.md": "# Leaks\n\nWater dripping under a machine usually means a gasket has failed "
               "and must be replaced.\n",
    "seal.md": "# Seal catalogue\n\nSeal, seal, seal: part numbers for every seal we stock, "
               "impeller seal included.\n",
}
PUMP_QUESTIONS = ["why does the pump leak water", "impeller seal", "pump seal leaking",
                  "water leaking from the pump"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, local_stack) -> Iterator[FolderSource]:
    """Twenty labelled documents for staff and one for HR only, synced once; and, under
    `ranking/`, the documents that show the search settings at work."""
    from tasks.index import connect_index, delete_index

    root = tmp_path_factory.mktemp("evaluate")
    collection = f"TestEvaluate{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch, connect_index(get_settings()) as client:
        source = FolderSource(root, collection, client, patch)
        for topic, (_, first, second) in TOPICS.items():
            source.write(f"{topic}/guide.md", f"# {topic}\n\n{first}\n")
            source.write(f"{topic}/notes.md", f"# {topic} notes\n\n{second}\n")
        source.write("hr/salary.md", "# Salary bands\n\nThe salary bands for engineers are "
                                     "B1 to B5, reviewed every March.\n")
        for name, text in RANKING.items():
            source.write(f"ranking/{name}", text)
        assert source.sync()["new"] == 21 + len(RANKING)
        yield source
        get_settings.cache_clear()
        delete_index(client, collection)


def _query_set(path: Path, queries: list[dict]) -> str:
    path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    return str(path)


def test_a_variant_worse_by_construction_is_significantly_worse_and_identical_ones_are_not(
        corpus: FolderSource, tmp_path: Path) -> None:
    from flows.evaluate import evaluate_retrieval

    dataset = _query_set(tmp_path / "topics.jsonl", [
        {"id": topic, "query": question, "relevant": [f"{topic}/guide.md", f"{topic}/notes.md"]}
        for topic, (question, *_) in TOPICS.items()])
    report = evaluate_retrieval(dataset, ["default", "top1:top_k=1", "same-as-default"],
                                ["group:staff"])

    default = report["variants"]["default"]["metrics"]
    assert default["recall@10"] == 1.0 and default["queries"] == 10, default
    assert default["latency_p95_ms"] >= default["latency_p50_ms"] > 0
    assert report["variants"]["top1"]["metrics"]["recall@5"] <= 0.5
    verdicts = {(c["variant"], c["metric"]): c for c in report["comparisons"]}
    worse = verdicts["top1", "recall@5"]
    assert worse["significant"] and worse["verdict"] == "significantly worse", worse
    assert worse["difference"] < 0 and worse["ci_high"] < 0 and worse["p_value"] < 0.05
    for metric in ("recall@5", "recall@10", "mrr@10", "ndcg@10"):
        same = verdicts["same-as-default", metric]
        assert not same["significant"] and same["difference"] == 0, same

    stored = corpus.store.evaluation_runs(fingerprint=report["fingerprint"])
    assert {r.variant for r in stored if r.run_id == report["run_id"]} == {
        "default", "top1", "same-as-default"}
    top1 = next(r for r in stored if r.variant == "top1")
    assert top1.config["top_k"] == 1 and len(top1.per_query) == 10
    assert all(len(q["retrieved"]) == 1 for q in top1.per_query)


def test_evaluation_sees_the_index_as_the_given_principals_do(
        corpus: FolderSource, tmp_path: Path) -> None:
    from flows.evaluate import evaluate_retrieval

    dataset = _query_set(tmp_path / "hr.jsonl", [
        {"query": SALARY, "relevant": ["hr/salary.md"]}])
    staff = evaluate_retrieval(dataset, ["default"], ["group:staff"])
    hr = evaluate_retrieval(dataset, ["default"], ["user:hana", "group:hr"])
    assert staff["variants"]["default"]["metrics"]["recall@10"] == 0.0
    assert hr["variants"]["default"]["metrics"]["mrr@10"] == 1.0
    assert hr["principals"] == ["public", "user:hana", "group:hr"]


# -- the settings tuning chooses from reach Weaviate ------------------------------------------


def _per_query(source: FolderSource, report: dict) -> dict[str, dict[str, dict]]:
    runs = source.store.evaluation_runs(fingerprint=report["fingerprint"])
    return {r.variant: {q["id"]: q for q in r.per_query} for r in runs
            if r.run_id == report["run_id"]}


def test_a_keyword_properties_variant_decides_whether_titles_are_searched(
        corpus: FolderSource, tmp_path: Path) -> None:
    from flows.evaluate import evaluate_retrieval

    dataset = _query_set(tmp_path / "osprey.jsonl", [
        {"id": "osprey", "query": "osprey", "relevant": ["ranking/osprey.html"]}])
    report = evaluate_retrieval(dataset, ["text-only:alpha=0,query_properties=text",
                                          "titles:alpha=0,query_properties=text+title^2"],
                                ["group:staff"])
    found = _per_query(corpus, report)
    assert found["text-only"]["osprey"]["retrieved"] == ["ranking/birds.md"]
    assert found["titles"]["osprey"]["retrieved"][0] == "ranking/osprey.html"
    assert report["variants"]["titles"]["metrics"]["mrr@10"] == 1.0
    assert report["variants"]["titles"]["config"]["query_properties"] == ["text", "title^2"]


def test_a_fusion_variant_merges_by_ranks_instead_of_scores(
        corpus: FolderSource, tmp_path: Path) -> None:
    from flows.evaluate import evaluate_retrieval
    from headwater.records import QueryFilters
    from tasks.embed import encode, load_embedder
    from tasks.retrieve import retrieve

    dataset = _query_set(tmp_path / "pump.jsonl", [
        {"id": f"q{n}", "query": q, "relevant": ["ranking/pump.md"]}
        for n, q in enumerate(PUMP_QUESTIONS)])
    report = evaluate_retrieval(dataset, ["scores:alpha=0.3,fusion=relativeScoreFusion",
                                          "ranks:alpha=0.3,fusion=rankedFusion"], ["group:staff"])
    found = _per_query(corpus, report)
    orders = {v: [found[v][f"q{n}"]["retrieved"] for n in range(len(PUMP_QUESTIONS))]
              for v in ("scores", "ranks")}
    assert orders["scores"] != orders["ranks"], orders
    assert report["variants"]["ranks"]["config"]["fusion"] == "rankedFusion"

    # Relative fusion normalises each list's scores (the last chunk of both scores 0); ranked
    # fusion adds weighted reciprocal ranks, which never reach 0: Weaviate got the fusion asked.
    settings = get_settings()
    embedder = load_embedder(settings.embedding_model, settings.embedding_backend,
                             settings.cache_dir)
    vector = encode(embedder, ["impeller seal"], 1)[0]

    def scores(fusion: str) -> list[float]:
        return [d.best.score for d in retrieve(
            corpus.client, corpus.collection, "impeller seal", vector, ["group:staff"],
            QueryFilters(), top_k=50, alpha=0.3, fusion=fusion)]

    relative, ranked = scores("relativeScoreFusion"), scores("rankedFusion")
    assert len(relative) == len(ranked) == 27
    assert relative[-1] == 0.0 and 0.1 < ranked[-1] < ranked[0] < 1.0 + 1e-6


def test_document_fusion_fuses_the_two_searches_document_rankings_by_reciprocal_rank(
        corpus: FolderSource) -> None:
    from headwater.records import QueryFilters
    from tasks.embed import encode, load_embedder
    from tasks.retrieve import DOCUMENT_FUSION, DOCUMENT_RANK_K, retrieve

    settings = get_settings()
    embedder = load_embedder(settings.embedding_model, settings.embedding_backend,
                             settings.cache_dir)
    vector = encode(embedder, ["impeller seal"], 1)[0]

    def ranking(alpha: float) -> list[tuple[str, float]]:
        return [(d.best.doc_id, d.best.score) for d in retrieve(
            corpus.client, corpus.collection, "impeller seal", vector, ["group:staff"],
            QueryFilters(), top_k=50, alpha=alpha, fusion=DOCUMENT_FUSION)]

    keyword, semantic, fused = ranking(0.0), ranking(1.0), ranking(0.3)
    expected: dict[str, float] = {}
    for weight, ranked in ((0.7, keyword), (0.3, semantic)):
        for rank, (doc_id, _) in enumerate(ranked, 1):
            expected[doc_id] = expected.get(doc_id, 0.0) + weight / (DOCUMENT_RANK_K + rank)
    scale = DOCUMENT_RANK_K + 1
    assert [d for d, _ in fused] == sorted(expected, key=lambda d: -expected[d])
    assert [s for _, s in fused] == pytest.approx([expected[d] * scale for d, _ in fused])
    # Alone, each search keeps its own order; a document first in both would score 1.
    assert keyword[0][1] == pytest.approx(1.0) and semantic[0][1] == pytest.approx(1.0)
    assert 0 < fused[-1][1] < fused[0][1] <= 1.0
