"""Compliance: personal data is found, rewritten by policy and indexed by keyed hash only."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FolderSource
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import func, select

from headwater.config import ConfigError, SourceConfig
from headwater.errors import ComplianceError
from headwater.records import Chunk, SourceDocument
from headwater.settings import Settings, get_settings
from headwater.state import StateStore, SubjectRow
from tasks import compliance, quality
from tasks.embed import encode, load_model
from tasks.parse import parse_document

KEY = "subject-key-of-the-test-suite-0123456789"
FERNET_KEY = Fernet.generate_key().decode()

VALUES = {
    "EMAIL_ADDRESS": "jane.roe@example.com",
    "PHONE_NUMBER": "+44 20 7946 0958",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "IBAN_CODE": "GB82 WEST 1234 5698 7654 32",
    "US_SSN": "536-22-1234",
    "PERSON": "Jane Roe",
}
MASKED = {
    "EMAIL_ADDRESS": "****@****.com",
    "PHONE_NUMBER": "+** ** **** **58",
    "CREDIT_CARD": "**** **** **** 1111",
    "IBAN_CODE": "**** **** **** **** **54 32",
    "US_SSN": "***-**-****",
    "PERSON": "**** ***",
}


def _policy(actions: dict[str, str], **fields: object) -> compliance.Policy:
    return compliance.Policy("handbook", actions, "internal", {}, SecretStr(KEY),
                             SecretStr(FERNET_KEY), get_settings().spacy_model, **fields)


def _source(**fields: object) -> SourceConfig:
    return SourceConfig(name="handbook", type="folder", **fields)


def _settings() -> Settings:
    return Settings(subject_key=SecretStr(KEY))


# -- renderings --------------------------------------------------------------------------------


@pytest.mark.parametrize("entity", sorted(VALUES))
@pytest.mark.parametrize("action", compliance.ACTIONS)
def test_each_entity_type_renders_as_its_action_specifies(entity: str, action: str) -> None:
    value = VALUES[entity]
    rendered = _policy({entity: action}).render(entity, value)
    if action == "keep":
        assert rendered == value
    elif action == "redact":
        assert rendered == f"<{entity}>"
    elif action == "mask":
        assert rendered == MASKED[entity]
    elif action == "hash":
        digest = compliance.subject_hmac(value, entity, SecretStr(KEY))
        assert rendered == f"<{entity}:{digest[:12]}>"
    else:
        assert re.fullmatch(rf"<{entity}:enc:gAAAA[A-Za-z0-9_=-]+>", rendered)
        assert compliance.recover(rendered, SecretStr(FERNET_KEY)) == value
    if action != "keep":
        # No longer recognisable as the entity: neither the quality gate nor Presidio sees it.
        sentence = f"Details on file: {rendered}."
        assert quality.residual_pii_scores([sentence], [entity]) == [0.0]
        assert entity not in {s.entity_type for s in _policy({}).analyze([sentence])[0]}


def test_hashed_values_stay_joinable_across_spellings_without_being_readable() -> None:
    policy = _policy({"EMAIL_ADDRESS": "hash"})
    one = policy.render("EMAIL_ADDRESS", "Jane.Roe@Example.com")
    assert one == policy.render("EMAIL_ADDRESS", "jane.roe@example.com")
    assert one != policy.render("EMAIL_ADDRESS", "john.doe@example.com")
    assert "jane" not in one.lower()


@pytest.mark.parametrize(("kind", "one", "other"), [
    ("EMAIL_ADDRESS", " Jane.Roe@Example.COM", "jane.roe@example.com"),
    ("PHONE_NUMBER", "+1 (202) 555-0143", "202-555-0143"),
    ("PHONE_NUMBER", "+44 20 7946 0958", "+442079460958"),
    ("PERSON", "  JANE \n roe", "Jane Roe"),
    ("US_SSN", "536-22-1234", "536 22 1234"),
    ("IBAN_CODE", "GB82 WEST 1234 5698 7654 32", "gb82west12345698765432"),
])
def test_subject_hashes_are_equal_for_spellings_of_one_identifier(kind: str, one: str,
                                                                   other: str) -> None:
    assert compliance.subject_hmac(one, kind, SecretStr(KEY)) == compliance.subject_hmac(
        other, kind, SecretStr(KEY))
    assert compliance.subject_hmac(one, kind, SecretStr(KEY)) != compliance.subject_hmac(
        one, kind, SecretStr(KEY + "-other"))


# -- policies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", compliance.ACTIONS)
@pytest.mark.parametrize("second", compliance.ACTIONS)
def test_the_strictest_action_of_the_frameworks_wins(
    first: str, second: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(compliance.FRAMEWORKS, "first", {"PERSON": first})
    monkeypatch.setitem(compliance.FRAMEWORKS, "second", {"PERSON": second})
    strictest = max(first, second, key=compliance.ACTIONS.index)
    assert compliance.resolve_actions(_source(policy=["first", "second"]))["PERSON"] == strictest


@pytest.mark.parametrize(("frameworks", "entity", "action"), [
    (["gdpr"], "CREDIT_CARD", "redact"),
    (["sox"], "CREDIT_CARD", "mask"),
    (["sox", "gdpr"], "CREDIT_CARD", "redact"),
    (["sox"], "IBAN_CODE", "encrypt"),
    (["ccpa"], "EMAIL_ADDRESS", "hash"),
    (["ccpa", "hipaa"], "EMAIL_ADDRESS", "redact"),
    (["gdpr"], "IP_ADDRESS", "hash"),
    (["hipaa"], "DATE_TIME", "redact"),
])
def test_framework_tables(frameworks: list[str], entity: str, action: str) -> None:
    assert compliance.resolve_actions(_source(policy=frameworks))[entity] == action


def test_a_source_override_beats_its_frameworks_and_the_quality_gate_follows() -> None:
    source = _source(policy=["gdpr"], compliance={"actions": {"PERSON": "keep"}})
    assert compliance.resolve_actions(source)["PERSON"] == "keep"
    assert "PERSON" not in compliance.removed_entities(source)
    assert "EMAIL_ADDRESS" in compliance.removed_entities(source)
    assert compliance.removed_entities(_source()) == []
    # Kept e-mails are not looked for; removed ones are, and a kept one in a chunk is fine.
    text = ["Write to jane.roe@example.com."]
    assert quality.residual_pii_scores(text, ["PERSON", "PHONE_NUMBER"]) == [0.0]
    assert quality.residual_pii_scores(text, ["EMAIL_ADDRESS"]) == [1.0]


@pytest.mark.parametrize(("source", "settings", "message"), [
    (_source(policy=["gdrp"]), _settings(), "unknown compliance frameworks ['gdrp']"),
    (_source(policy=["gdpr"]),
     # A data dir without the local key file `headwater up` writes.
     Settings(subject_key=None, data_dir=Path("/nonexistent/headwater")),
     "needs HEADWATER_SUBJECT_KEY"),
    (_source(policy=["sox"]), _settings(), "encrypts ['IBAN_CODE', 'US_BANK_NUMBER']"),
    (_source(policy=["gdpr"], compliance={"actions": {"SSN": "keep"}}), _settings(),
     "no recognizer finds ['SSN']"),
])
def test_a_policy_that_cannot_run_is_refused_with_a_clear_message(
    source: SourceConfig, settings: Settings, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compliance.load_policy(source, settings)


def test_the_analyzer_loads_once_from_the_installed_pipeline_never_downloading() -> None:
    model = get_settings().spacy_model
    assert compliance.analyzer(model) is compliance.analyzer(model)
    # Only the NER runs (it has its own embedding layer); lemmas are the lowercased words.
    assert compliance._nlp_engine(model).nlp["en"].pipe_names == ["ner"]
    with pytest.raises(ConfigError, match="'en_core_web_xx' is not installed"):
        compliance.load_policy(_source(policy=["gdpr"]),
                               Settings(subject_key=SecretStr(KEY), spacy_model="en_core_web_xx"))


@pytest.mark.parametrize(("types", "default", "expected"), [
    ([], "internal", "internal"),
    ([], "restricted", "restricted"),
    (["LOCATION", "DATE_TIME"], "public", "public"),
    (["PERSON"], "internal", "confidential"),
    (["EMAIL_ADDRESS", "PHONE_NUMBER"], "public", "confidential"),
    (["US_SSN"], "internal", "restricted"),
    (["CREDIT_CARD", "PERSON"], "confidential", "restricted"),
    (["PERSON"], "restricted", "restricted"),
])
def test_classification_is_the_higher_of_findings_and_the_source_default(
    types: list[str], default: str, expected: str
) -> None:
    assert compliance.classify(types, default) == expected


# -- custom recognizers and the rewritten document -----------------------------------------------


def test_a_custom_pattern_needs_its_context_words_and_a_deny_list_always_matches() -> None:
    source = _source(compliance={"recognizers": [
        {"entity": "EMPLOYEE_ID", "patterns": [{"regex": r"\bEMP\d{6}\b", "score": 0.3}],
         "context": ["employee"], "classification": "restricted"},
        {"entity": "PROJECT_CODENAME", "deny_list": ["Bluefin", "Osprey"]},
    ]})
    policy = compliance.load_policy(source, _settings())
    assert policy.actions["EMPLOYEE_ID"] == policy.actions["PROJECT_CODENAME"] == "redact"
    texts = ["The badge EMP123456 opens the pump hall.",
             "Each employee number, like EMP654321, is on the badge.",
             "Project Osprey replaces the old telemetry."]
    doc = [_parsed(f"doc-{i}.txt", t) for i, t in enumerate(texts)]
    processed, findings = policy.apply(doc)
    assert processed[0].text == texts[0]  # 0.3 without context is below the 0.4 threshold
    assert processed[1].text == "Each employee number, like <EMPLOYEE_ID>, is on the badge."
    assert processed[2].text == "Project <PROJECT_CODENAME> replaces the old telemetry."
    assert [findings[f"doc-{i}.txt"].classification for i in range(3)] == [
        "internal", "restricted", "confidential"]


def _parsed(doc_id: str, text: str, title: str = "Notes", mime: str = "text/plain"):
    return parse_document(SourceDocument(source="handbook", doc_id=doc_id, title=title,
                                         mime_type=mime, content=text.encode(), version="1"))


def test_sections_move_with_the_rewritten_text_so_headings_stay_with_their_paragraphs() -> None:
    markdown = ("# Contact Jane Roe\n\nWrite to jane.roe@example.com any time.\n\n"
                "## Payment\n\nCard 4111 1111 1111 1111 was charged.\n\n"
                "## Spares\n\nSeals are kept in hall two.")
    parsed = _parsed("contact.md", markdown, title="Notes by Jane Roe", mime="text/markdown")
    policy = _policy(compliance.resolve_actions(_source(policy=["gdpr"])))
    (doc,), findings = policy.apply([parsed])

    sections = [(s.heading_path, doc.text[s.start : s.end].strip()) for s in doc.sections]
    assert sections == [
        (["Contact <PERSON>"], "Contact <PERSON>\n\nWrite to <EMAIL_ADDRESS> any time."),
        (["Contact <PERSON>", "Payment"], "Payment\n\nCard <CREDIT_CARD> was charged."),
        (["Contact <PERSON>", "Spares"], "Spares\n\nSeals are kept in hall two."),
    ]
    assert doc.document.title == "Notes by <PERSON>"
    found = findings["contact.md"]
    assert found.classification == "restricted"
    assert [(f.entity_type, doc.text[f.start : f.end]) for f in found.text] == [
        ("PERSON", "<PERSON>"), ("EMAIL_ADDRESS", "<EMAIL_ADDRESS>"),
        ("CREDIT_CARD", "<CREDIT_CARD>")]
    # A chunk carries the types inside its span, plus those of the title and headings above it.
    spares = doc.sections[2]
    chunk = Chunk(source="handbook", doc_id="contact.md", ordinal=2, text="",
                  heading_path=spares.heading_path, char_start=spares.start,
                  char_end=spares.end)
    found.annotate([chunk])
    assert chunk.pii_types == ["PERSON"] and chunk.classification == "restricted"


def test_titles_and_headings_read_together_each_keep_their_own_findings() -> None:
    titles = ["Call +44 20 7946 0958 first", "Spares", "Notes by Jane Roe",
              "Orders: jane.roe@example.com", "Spares"]
    parsed = [_parsed(f"doc-{n}.md", f"# Pumps {n}\n\nSeals are kept in hall {n}.",
                      title=title, mime="text/markdown") for n, title in enumerate(titles)]
    policy = _policy(compliance.resolve_actions(_source(policy=["gdpr"])))
    documents, findings = policy.apply(parsed)

    assert [d.document.title for d in documents] == [
        "Call <PHONE_NUMBER> first", "Spares", "Notes by <PERSON>",
        "Orders: <EMAIL_ADDRESS>", "Spares"]
    assert [[f.entity_type for f in findings[f"doc-{n}.md"].title] for n in range(5)] == [
        ["PHONE_NUMBER"], [], ["PERSON"], ["EMAIL_ADDRESS"], []]
    assert [d.sections[0].heading_path for d in documents] == [[f"Pumps {n}"] for n in range(5)]


def test_a_finding_over_a_line_break_is_cut_between_the_lines() -> None:
    lines = ["Notes of Jane", "Roe", "Spares"]
    combined, places = compliance._combined(lines)
    assert combined == ["Notes of Jane\n\nRoe\n\nSpares"]
    span = compliance.Span("PERSON", combined[0].index("Jane"), combined[0].index("Roe") + 3, 0.85)
    found = compliance._separated([[span]], places, lines)
    assert found == {"Notes of Jane": [span._replace(start=9, end=13)],
                     "Roe": [span._replace(start=0, end=3)], "Spares": []}
    # Past the size of a piece, the lines go on in another text.
    combined, places = compliance._combined(["a" * 8, "b" * 8, "c" * 8], limit=20)
    assert combined == ["a" * 8 + "\n\n" + "b" * 8, "c" * 8]
    assert places == [(0, 0), (0, 10), (1, 0)]


@pytest.mark.parametrize("text", [
    "Call +44 20 7946 0958 or (202) 555-0143 after nine.",
    "Room 4, shelf 12.",
    "Rufen Sie 030 1234 an, oder 0 30 / 12 34 56.",
    "Ext. 12-34, 1x2x3x4, (089) 1-2.",
    "Ruf an: \uff10\uff12\uff10 \uff17\uff19\uff14\uff16 \uff10\uff19\uff15\uff18",  # fullwidth
    "Seals are kept in hall two.",
    "",
])
def test_the_phone_recognizer_finds_what_presidios_own_finds(text: str) -> None:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    def found(recognizer: object) -> list[tuple]:
        return [(r.start, r.end, r.score) for r in recognizer.analyze(text, ["PHONE_NUMBER"])]

    assert found(compliance.phone_recognizer()) == found(PhoneRecognizer())
    assert compliance.phone_recognizer().name == "PhoneRecognizer"


def test_the_phone_gate_never_hides_a_number_presidio_finds() -> None:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    # Digit blocks of every length joined by libphonenumber's punctuation, letters and spaces.
    rng = random.Random(5)
    pieces = ["+", "(", ")", "-", ".", "/", " ", "  ", "x", "~", "\u2013", "ab", "Tel. ", "\n"]
    texts = ["".join(rng.choice(pieces) + "".join(rng.choice("0123456789") for _ in range(
        rng.randint(1, 5))) for _ in range(rng.randint(1, 5))) for _ in range(600)]
    plain, gated = PhoneRecognizer(), compliance.phone_recognizer()
    skipped = [t for t in texts if not compliance.may_hold_phone_number(t)]
    assert skipped, "the table should hold texts the gate skips"
    assert all(plain.analyze(t, ["PHONE_NUMBER"]) == [] for t in skipped)
    assert all([(r.start, r.end) for r in gated.analyze(t, ["PHONE_NUMBER"])]
               == [(r.start, r.end) for r in plain.analyze(t, ["PHONE_NUMBER"])] for t in texts)


# -- through the sync flow, against the real Weaviate -------------------------------------------

CONTACTS = ("# Spares desk\n\nOrders for impeller seals go to Margaret Whitfield, who runs the "
            "spares desk. Write to margaret.whitfield@contoso.com or call +44 20 7946 0958 "
            "before noon.")
REFUNDS = ("# Refunds\n\nThe refund went to card 4111 1111 1111 1111 on Friday. Daniel Okafor "
           "approved it; reach him on (415) 555-0172.")
RAW = ["Margaret Whitfield", "margaret.whitfield@contoso.com", "+44 20 7946 0958",
       "4111 1111 1111 1111", "Daniel Okafor", "(415) 555-0172"]


def _with_policy(folder: FolderSource, monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    config = yaml.safe_load(folder.config.read_text())
    config["sources"][0].update(changes)
    folder.config.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HEADWATER_SUBJECT_KEY", KEY)
    get_settings.cache_clear()


def _objects(folder: FolderSource) -> list[dict]:
    return [o.properties for o in folder.client.collections.use(folder.collection).iterator()]


def _subject_rows(folder: FolderSource) -> list[tuple]:
    with folder.store.session() as s:
        return sorted((r.doc_id, r.subject, r.entity_type, tuple(r.ordinals))
                      for r in s.execute(select(SubjectRow)).scalars())


def _state_bytes(folder: FolderSource) -> bytes:
    db = Path(folder.env["HEADWATER_STATE_DB_URL"].removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_under_gdpr_raw_personal_data_is_not_searchable_and_subjects_are_indexed(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_policy(folder, monkeypatch, policy=["gdpr"])
    folder.write("desk/contacts.md", CONTACTS)
    folder.write("finance/refunds.md", REFUNDS)
    folder.write("plain.txt", "Pump station inspections are weekly.")
    summary = folder.sync()
    assert (summary["new"], summary["quarantined"]) == (3, 0)

    collection = folder.client.collections.use(folder.collection)
    model = load_model(get_settings().embedding_model)
    for value in RAW:
        assert collection.query.bm25(query=value, limit=5).objects == [], value
        near = collection.query.near_vector(near_vector=encode(model, [value])[0].tolist(),
                                            limit=10).objects
        assert near and all(value not in o.properties["text"] for o in near), value
    by_doc = {p["doc_id"]: p for p in _objects(folder)}
    assert by_doc["desk/contacts.md"]["text"].endswith(
        "go to <PERSON>, who runs the spares desk. Write to <EMAIL_ADDRESS> or call "
        "<PHONE_NUMBER> before noon.")
    assert "card <CREDIT_CARD> on Friday. <PERSON> approved it" in (
        by_doc["finance/refunds.md"]["text"])
    # Entity types only, never values (the small NER model may add a LOCATION or two).
    assert {"EMAIL_ADDRESS", "PERSON", "PHONE_NUMBER"} <= set(
        by_doc["desk/contacts.md"]["pii_types"])
    assert {"CREDIT_CARD", "PERSON", "PHONE_NUMBER"} <= set(
        by_doc["finance/refunds.md"]["pii_types"])
    assert by_doc["plain.txt"]["pii_types"] == []
    assert [by_doc[d]["classification"] for d in sorted(by_doc)] == [
        "confidential", "restricted", "internal"]
    assert folder.store.document_classification("handbook", "finance/refunds.md") == "restricted"
    # Classification is filterable in the index.
    from weaviate.classes.query import Filter

    restricted = collection.query.fetch_objects(
        filters=Filter.by_property("classification").equal("restricted")).objects
    assert [o.properties["doc_id"] for o in restricted] == ["finance/refunds.md"]

    # The subject index finds the document by the e-mail's keyed hash, in any spelling.
    email = compliance.subject_hmac("Margaret.Whitfield@contoso.com", "EMAIL_ADDRESS",
                                    SecretStr(KEY))
    assert folder.store.documents_for_subjects([email]) == [
        ("handbook", "desk/contacts.md", [0], ["EMAIL_ADDRESS"])]
    card = compliance.subject_hmac("4111-1111-1111-1111", "CREDIT_CARD", SecretStr(KEY))
    assert [d.doc_id for d in folder.store.documents_for_subjects([email, card])] == [
        "desk/contacts.md", "finance/refunds.md"]
    # No raw value anywhere in the state store's files.
    stored = _state_bytes(folder)
    for value in RAW:
        assert value.encode() not in stored, value

    # Re-syncing unchanged documents, even re-reading them all, does not duplicate rows.
    rows = _subject_rows(folder)
    assert {(r[0], r[2]) for r in rows} == {
        ("desk/contacts.md", t) for t in ("EMAIL_ADDRESS", "PERSON", "PHONE_NUMBER")} | {
        ("finance/refunds.md", t) for t in ("CREDIT_CARD", "PERSON", "PHONE_NUMBER")}
    folder.sync()
    folder.sync(full=True)
    assert _subject_rows(folder) == rows

    # A new version replaces its rows; deleting the document removes them.
    folder.write("desk/contacts.md", CONTACTS.replace("margaret.whitfield@", "spares@"))
    folder.sync()
    assert folder.store.documents_for_subjects([email]) == []
    spares = compliance.subject_hmac("spares@contoso.com", "EMAIL_ADDRESS", SecretStr(KEY))
    assert [d.doc_id for d in folder.store.documents_for_subjects([spares])] == [
        "desk/contacts.md"]
    (folder.docs / "desk/contacts.md").unlink()
    assert folder.sync()["deleted"] == 1
    assert folder.store.documents_for_subjects([spares]) == []
    assert {r[0] for r in _subject_rows(folder)} == {"finance/refunds.md"}


def test_a_policy_that_keeps_names_leaves_them_and_still_indexes_their_subjects(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_policy(folder, monkeypatch, policy=["gdpr"],
                 compliance={"actions": {"PERSON": "keep"}})
    folder.write("desk/contacts.md", CONTACTS)
    assert folder.sync()["quarantined"] == 0
    (chunk,) = _objects(folder)
    assert "go to Margaret Whitfield, who runs" in chunk["text"]
    assert "<EMAIL_ADDRESS>" in chunk["text"] and "contoso" not in chunk["text"]
    assert "PERSON" in chunk["pii_types"]
    name = compliance.subject_hmac("margaret  whitfield", "PERSON", SecretStr(KEY))
    assert [d.types for d in folder.store.documents_for_subjects([name])] == [["PERSON"]]


def test_personal_data_a_broken_stage_lets_through_is_quarantined_without_its_value(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_policy(folder, monkeypatch, policy=["gdpr"])
    monkeypatch.setattr(compliance.Policy, "apply", lambda self, parsed: (
        list(parsed), {p.document.doc_id: compliance.DocumentFindings("internal")
                       for p in parsed}))
    folder.write("plain.txt", "Pump station inspections are weekly.")
    folder.write("desk/contacts.md", CONTACTS)
    summary = folder.sync()
    assert (summary["new"], summary["quarantined"]) == (1, 1)
    (held,) = folder.store.quarantined("handbook")
    assert held.doc_id == "desk/contacts.md"
    assert "residual_pii_score" in held.reason
    assert not any(value in held.reason for value in RAW)
    with folder.store.session() as s:
        assert s.scalar(select(func.count()).select_from(SubjectRow)) == 0
    assert np.isfinite(summary["seconds"]["compliance"])


# -- the subject index in the state store, on SQLite and PostgreSQL -----------------------------


# (`store` is conftest's: a state store of the test's own on SQLite and PostgreSQL.)


def test_subject_rows_are_replaced_with_their_document_and_removed_with_it(
    store: StateStore,
) -> None:
    jane, john = "a" * 64, "b" * 64
    store.ensure_source("wiki", "s3")
    store.ensure_source("hr", "folder")
    store.commit_batch("wiki", indexed=[("a", "v1", None, "A", 3, []),
                                        ("b", "v1", None, "B", 1, [])],
                       deleted=[], subjects={"a": [(jane, "EMAIL_ADDRESS", [0, 2]),
                                                   (jane, "PERSON", [1])],
                                             "b": [(john, "PHONE_NUMBER", [0])]},
                       classifications={"a": "confidential", "b": "restricted"})
    store.commit_batch("hr", indexed=[("cv", "v1", None, "CV", 1, [])], deleted=[],
                       subjects={"cv": [(jane, "PERSON", [0])]})
    assert store.documents_for_subjects([jane]) == [
        ("hr", "cv", [0], ["PERSON"]), ("wiki", "a", [0, 1, 2], ["EMAIL_ADDRESS", "PERSON"])]
    assert store.document_classification("wiki", "b") == "restricted"

    # Re-indexed: its rows are replaced, not added to; readers-only changes keep everything.
    store.commit_batch("wiki", indexed=[("a", "v2", None, "A", 1, [])], deleted=[],
                       subjects={"a": [(john, "EMAIL_ADDRESS", [0])]},
                       classifications={"a": "internal"})
    store.commit_batch("wiki", indexed=[("b", "v1", None, "B", 1, ["group:x"])], deleted=[])
    assert store.documents_for_subjects([jane]) == [("hr", "cv", [0], ["PERSON"])]
    assert store.documents_for_subjects([john]) == [
        ("wiki", "a", [0], ["EMAIL_ADDRESS"]), ("wiki", "b", [0], ["PHONE_NUMBER"])]
    assert store.document_classification("wiki", "a") == "internal"
    assert store.document_classification("wiki", "b") == "restricted"

    store.commit_batch("wiki", indexed=[], deleted=["a", "b"])
    assert store.documents_for_subjects([jane, john]) == [("hr", "cv", [0], ["PERSON"])]


def test_a_collection_made_before_classifications_gains_the_property(
    weaviate_client, collection: str
) -> None:
    from weaviate.classes.config import Configure, Tokenization

    from tasks.index import CHUNK_PROPERTIES, ensure_collection

    weaviate_client.collections.create(
        collection, vector_config=Configure.Vectors.self_provided(),
        properties=[p for p in CHUNK_PROPERTIES if p.name != "classification"])
    ensure_collection(weaviate_client, collection)
    ensure_collection(weaviate_client, collection)
    props = {p.name: p for p in weaviate_client.collections.use(collection).config.get().properties}
    assert props["classification"].tokenization == Tokenization.FIELD
    assert props["classification"].index_filterable


# -- analyzer processes and optional recognizers ------------------------------------------------

LONG = ("Pump seals are inspected weekly and the results are filed. " * 400
        + "Escalations go to Jane Roe at jane.roe@example.com.")
POOL_TABLE = [CONTACTS, REFUNDS, LONG, "", "Pump station inspections are weekly.",
              *(f"On file: {value}." for value in VALUES.values()),
              "Project Osprey replaces the old telemetry.", "# Jane Roe\n\nNotes."]
CODENAMES = _source(compliance={"recognizers": [
    {"entity": "PROJECT_CODENAME", "deny_list": ["Bluefin", "Osprey"]}]})


def _gdpr_policy(**fields: object) -> compliance.Policy:
    actions = compliance.resolve_actions(_source(policy=["gdpr"]))
    recognizers = compliance.load_policy(CODENAMES, _settings()).recognizers
    return _policy({**actions, "PROJECT_CODENAME": "redact"}, recognizers=recognizers, **fields)


def _kill_first_worker(deadline_s: float = 120) -> int:
    """Wait for an analyzer worker process to appear, then kill it; its pid."""
    give_up = time.monotonic() + deadline_s
    while not compliance.analyzer_processes():
        assert time.monotonic() < give_up, "no analyzer worker started"
        time.sleep(0.02)
    pid = compliance.analyzer_processes()[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_the_worker_processes_find_what_the_calling_process_finds(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compliance, "POOL_MIN_CHARS", 0)  # even this table goes to the pool
    in_process = _gdpr_policy().analyze(POOL_TABLE)
    pooled = _gdpr_policy(processes=2).analyze(POOL_TABLE)
    assert len(compliance.analyzer_processes()) == 2
    assert pooled == in_process
    found = {s.entity_type for spans in pooled for s in spans}
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "PROJECT_CODENAME"} <= found
    # Offsets of a text analysed in pieces point into the whole text.
    last = pooled[POOL_TABLE.index(LONG)][-1]
    assert LONG[last.start : last.end] == "jane.roe@example.com"


def test_a_small_batch_is_analysed_in_the_calling_process(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compliance, "analyze_in_pool",
                        lambda *args: pytest.fail("a small batch went to the worker processes"))
    texts = [CONTACTS, REFUNDS]
    assert sum(map(len, texts)) < compliance.POOL_MIN_CHARS
    assert _gdpr_policy(processes=4).analyze(texts) == _gdpr_policy().analyze(texts)
    assert compliance.compliance_processes(1) == 1
    assert 1 <= compliance.compliance_processes("auto") <= min(os.cpu_count() or 1,
                                                                compliance.AUTO_PROCESSES_CAP)


def test_a_killed_worker_fails_its_batch_with_a_compliance_error_and_never_hangs() -> None:
    compliance.shutdown_pool()  # a fresh pool: its workers appear with this batch
    policy = _gdpr_policy(processes=2)
    texts = [CONTACTS * 10, REFUNDS * 10] * 8
    with ThreadPoolExecutor(1) as caller:
        batch = caller.submit(policy.analyze, texts)
        _kill_first_worker()
        assert not batch.done()  # killed mid-batch
        with pytest.raises(ComplianceError) as failed:
            batch.result(timeout=120)
    assert "process stopped while reading a batch" in failed.value.user_message
    assert "BrokenProcessPool" in failed.value.log_message
    # The broken pool is replaced at the next batch.
    assert policy.analyze(texts[:2]) == _gdpr_policy().analyze(texts[:2])


def test_a_sync_whose_analyzer_worker_is_killed_quarantines_the_batch_and_goes_on(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADWATER_COMPLIANCE_PROCESSES", "2")
    _with_policy(folder, monkeypatch, policy=["gdpr"])
    docs = {"desk/contacts.md": CONTACTS * 50, "finance/refunds.md": REFUNDS * 50}
    for rel, text in docs.items():
        folder.write(rel, text)
    assert sum(map(len, docs.values())) > compliance.POOL_MIN_CHARS
    compliance.shutdown_pool()
    with ThreadPoolExecutor(1) as killer:
        killed = killer.submit(_kill_first_worker)
        summary = folder.sync()
        killed.result(timeout=10)
    assert (summary["status"], summary["new"], summary["quarantined"]) == ("completed", 0, 2)
    held = folder.store.quarantined("handbook")
    assert {(h.doc_id, h.stage) for h in held} == {(d, "compliance") for d in docs}
    assert folder.index() == {}

    # The next sync reads them again, through a new pool.
    summary = folder.sync()
    assert (summary["new"], summary["quarantined"]) == (2, 0)
    texts = " ".join(t for chunks in folder.index().values() for t in chunks)
    assert "<EMAIL_ADDRESS>" in texts and not any(value in texts for value in RAW)


def test_batches_redacted_ahead_of_a_failing_batch_are_still_written(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.sync import REDACT_AHEAD, sync_source

    _with_policy(folder, monkeypatch, policy=["gdpr"], batch_size=2,
                 quality={"min_batch_for_failed_share": 2})
    good = 2 * REDACT_AHEAD  # as many batches as are redacted ahead of the one that fails
    for i in range(good):
        folder.write(f"a-{i}.md", f"# Note {i}\n\nAsk Daniel Okafor about seal {i}.\n")
    for i in range(2):  # the listing's last batch: files with no text, a broken export
        folder.write(f"z-{i}.md", "   \n\n   \n")

    state = sync_source("handbook", return_state=True)
    assert state.is_failed()
    assert "2 of 2 documents in a batch failed" in str(state.result(raise_on_failure=False))
    assert sorted(folder.index()) == [f"a-{i}.md" for i in range(good)]
    assert folder.store.document_count("handbook") == good
    assert not any("Okafor" in t for chunks in folder.index().values() for t in chunks)


@pytest.mark.parametrize(("fields", "refusal"), [
    ({"policy": ["gdpr"], "compliance": {"disabled_recognizers": ["PhoneRecognizer"]}},
     "disables PhoneRecognizer, which finds ['PHONE_NUMBER'] that the source's policy removes"),
    ({"policy": ["hipaa"], "compliance": {"disabled_recognizers": ["DateRecognizer"]}},
     "disables DateRecognizer, which finds ['DATE_TIME']"),
    ({"policy": ["gdpr"], "compliance": {"disabled_recognizers": ["PhoneRecogniser"]}},
     "names ['PhoneRecogniser'], which are not recognizers"),
])
def test_disabling_a_recognizer_the_policy_needs_is_refused(fields: dict, refusal: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        compliance.load_policy(_source(**fields), _settings())


def test_a_recognizer_the_policy_does_not_need_can_be_disabled() -> None:
    source = _source(policy=["gdpr"], compliance={
        "actions": {"PHONE_NUMBER": "keep"}, "disabled_recognizers": ["PhoneRecognizer"]})
    policy = compliance.load_policy(source, _settings())
    assert policy.disabled == ("PhoneRecognizer",)
    text = f"Call {VALUES['PHONE_NUMBER']} or write to {VALUES['EMAIL_ADDRESS']}."
    assert [s.entity_type for s in policy.analyze([text])[0]] == ["EMAIL_ADDRESS"]
    with_phones = compliance.load_policy(_source(policy=["gdpr"]), _settings())
    assert [s.entity_type for s in with_phones.analyze([text])[0]] == [
        "PHONE_NUMBER", "EMAIL_ADDRESS"]
