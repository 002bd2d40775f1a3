"""Great Expectations gates on every sync batch: parsed documents, then chunks with vectors."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headwater.records import Chunk
from tasks.parse import ParsedDocument

SUITES_DIR = Path(__file__).resolve().parent.parent / "expectations"
SUITES = ("documents", "chunks")
# Characters that only appear in text when a parser read binary or guessed the wrong encoding.
_GARBLED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
# Personal data this check can see without a spaCy pipeline; of these, it looks for the types
# the source's policy does not keep. The scores are Presidio's own (a bare phone number without
# context words scores 0.4).
RESIDUAL_PII_ENTITIES = ("EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "PHONE_NUMBER")


@dataclass
class Finding:
    """One expectation's outcome over one batch (or, merged, over a whole run)."""

    suite: str
    expectation: str
    column: str
    checked: int = 0
    unexpected: int = 0
    low: float | None = None
    high: float | None = None
    failing: dict[str, str] = field(default_factory=dict)  # doc id -> offending value

    @property
    def success(self) -> bool:
        return self.unexpected == 0

    @property
    def name(self) -> str:
        return f"{self.expectation}({self.column})"

    @property
    def observed(self) -> str:
        spread = "" if self.low is None else (
            f"; values {_number(self.low)}..{_number(self.high)}")
        return f"{self.unexpected} of {self.checked} rows unexpected{spread}"

    def merge(self, other: Finding) -> None:
        self.checked += other.checked
        self.unexpected += other.unexpected
        lows = [v for v in (self.low, other.low) if v is not None]
        highs = [v for v in (self.high, other.high) if v is not None]
        self.low, self.high = (min(lows) if lows else None), (max(highs) if highs else None)

    def as_row(self) -> dict[str, Any]:
        return {"suite": self.suite, "expectation": self.name, "observed": self.observed,
                "checked": self.checked, "unexpected": self.unexpected,
                "result": "pass" if self.success else "FAIL"}


def _number(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if float(value).is_integer()
                                      else f"{value:.4g}")


@dataclass
class Verdict:
    """What a suite said about one batch, and which documents it rejects."""

    findings: list[Finding]
    result_ids: list[Any] = field(default_factory=list)

    def rejected(self) -> dict[str, str]:
        """Each failing document with the first expectation it broke, in words."""
        reasons: dict[str, str] = {}
        for finding in self.findings:
            for doc_id, value in finding.failing.items():
                reasons.setdefault(doc_id, f"{finding.suite} expectation {finding.name} "
                                           f"failed (value {value})")
        return reasons


@dataclass
class QualityLedger:
    """A run's findings, merged per expectation across its batches."""

    findings: dict[tuple[str, str], Finding] = field(default_factory=dict)
    result_ids: list[Any] = field(default_factory=list)
    # Documents are validated on the flow's thread, chunks on the writer's: both record here.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, verdict: Verdict) -> None:
        with self._lock:
            for f in verdict.findings:
                key = (f.suite, f.name)
                if key not in self.findings:
                    self.findings[key] = Finding(f.suite, f.expectation, f.column)
                self.findings[key].merge(f)
            self.result_ids += verdict.result_ids

    def rows(self) -> list[dict[str, Any]]:
        return [f.as_row() for f in self.findings.values()]


def load_suite(name: str) -> dict[str, Any]:
    """A suite as versioned in the repository (Great Expectations' own JSON format)."""
    return json.loads((SUITES_DIR / f"{name}.json").read_text())


class QualityGate:
    """One Great Expectations context per process: a pandas data source, both suites, a
    checkpoint each, and a data docs site in the data directory."""

    def __init__(self, docs_dir: Path) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.docs_dir = docs_dir
        self._lock = threading.Lock()
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.update_data_docs_site("local_site", {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        source = context.data_sources.add_pandas("headwater")
        self.checkpoints = {}
        for name in SUITES:
            batches = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            suite = context.suites.add(gx.ExpectationSuite(**load_suite(name)))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batches, suite=suite))
            self.checkpoints[name] = context.checkpoints.add(gx.Checkpoint(
                name=name, validation_definitions=[definition], actions=[],
                # The failing rows are named by document id, so they can be quarantined.
                result_format={"result_format": "COMPLETE",
                               "unexpected_index_column_names": ["doc_id"]},
            ))
        self.context = context

    def validate(self, suite: str, frame: pd.DataFrame, parameters: dict[str, Any],
                 run_name: str) -> Verdict:
        from great_expectations.core.run_identifier import RunIdentifier

        if frame.empty:
            return Verdict([])
        with self._lock:
            result = self.checkpoints[suite].run(
                batch_parameters={"dataframe": frame}, expectation_parameters=parameters,
                run_id=RunIdentifier(run_name=run_name))
        findings, result_ids = [], []
        for result_id, validation in result.run_results.items():
            result_ids.append(result_id)
            for outcome in validation.results:
                config = outcome.expectation_config
                column = config.kwargs.get("column", "")
                values = frame[column] if column in frame else pd.Series(dtype=float)
                numeric = pd.api.types.is_numeric_dtype(values) and len(values)
                detail = outcome.result or {}
                failing = {str(row["doc_id"]): str(row.get(column, ""))[:80]
                           for row in detail.get("unexpected_index_list") or []}
                if outcome.exception_info and outcome.exception_info.get("raised_exception"):
                    raise RuntimeError(f"expectation {config.type} on {column} could not run: "
                                       f"{outcome.exception_info.get('exception_message')}")
                findings.append(Finding(
                    suite, config.type, column, checked=int(detail.get("element_count", 0)),
                    unexpected=int(detail.get("unexpected_count", 0)),
                    low=float(values.min()) if numeric else None,
                    high=float(values.max()) if numeric else None, failing=failing))
        return Verdict(findings, result_ids)

    def build_docs(self, result_ids: Sequence[Any]) -> Path:
        """Render this run's validations (and refresh the index page) into the data docs."""
        with self._lock:
            self.context.build_data_docs(resource_identifiers=list(result_ids))
        return self.docs_dir / "index.html"


@cache
def quality_gate(docs_dir: str) -> QualityGate:
    """Building a context costs seconds: once per process and data directory."""
    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    return QualityGate(Path(docs_dir))


# -- the rows each suite checks ----------------------------------------------------------------


def documents_frame(parsed: Iterable[ParsedDocument]) -> pd.DataFrame:
    rows = []
    for p in parsed:
        doc, length = p.document, len(p.text)
        rows.append({
            "doc_id": doc.doc_id,
            "title": doc.title or None,
            "version": doc.version or None,
            "text_chars": length,
            "printable_ratio": 1.0 - len(_GARBLED.findall(p.text)) / length if length else 0.0,
            "principal_count": len(doc.principals),
        })
    return pd.DataFrame(rows, columns=["doc_id", "title", "version", "text_chars",
                                       "printable_ratio", "principal_count"])


def chunks_frame(chunks: Sequence[Chunk], vectors: np.ndarray,
                 residual_pii: Sequence[float] | None = None) -> pd.DataFrame:
    if not chunks:
        return pd.DataFrame()
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(chunks), -1)
    return pd.DataFrame({
        "doc_id": [c.doc_id for c in chunks],
        "chunk_id": [str(c.uuid) for c in chunks],
        "text_chars": [len(c.text.strip()) for c in chunks],
        "token_count": [c.token_count for c in chunks],
        "dimension": np.full(len(chunks), vectors.shape[1], dtype=np.int64),
        # NaN norms (a broken vector) must fail the range check, not slip through it.
        "norm": np.nan_to_num(np.linalg.norm(vectors, axis=1), nan=-1.0),
        "principal_count": [len(c.principals) for c in chunks],
        "residual_pii_score": list(residual_pii) if residual_pii is not None
        else np.zeros(len(chunks)),
    })


@lru_cache(maxsize=1)
def _pii_recognizers() -> tuple[Any, ...]:
    # Pattern recognizers only: they need no spaCy pipeline, so the check stays cheap.
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        UsSsnRecognizer,
    )

    from tasks.compliance import phone_recognizer

    return (EmailRecognizer(), CreditCardRecognizer(), IbanRecognizer(), UsSsnRecognizer(),
            phone_recognizer())


def residual_pii_scores(texts: Sequence[str], entities: Iterable[str]) -> list[float]:
    """Per text, the highest score of any personal data of the given types (those the policy
    removes: `tasks.compliance.removed_entities`)."""
    from tasks.compliance import has_digit

    wanted = [e for e in RESIDUAL_PII_ENTITIES if e in set(entities)]
    recognizers = [r for r in _pii_recognizers()
                   if set(r.get_supported_entities()) & set(wanted)]
    scores = []
    for text in texts:
        best = 0.0
        # Every type checked is an e-mail address (an "@") or made of digits.
        if "@" not in text and not has_digit(text):
            scores.append(best)
            continue
        for recognizer in recognizers:
            for found in recognizer.analyze(text, wanted, None):
                best = max(best, float(found.score))
        scores.append(best)
    return scores
