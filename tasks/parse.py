"""Turning a document's bytes into text with its structure (headings), or a clear rejection."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from headwater.records import SourceDocument

MIME_BY_SUFFIX = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".log": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".csv": "text/csv",
}


def mime_for(name: str) -> str:
    return MIME_BY_SUFFIX.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


class DocumentRejected(Exception):
    """A document that cannot enter the index; it is quarantined with this reason."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass
class Section:
    heading_path: list[str]
    start: int
    end: int


@dataclass
class ParsedDocument:
    document: SourceDocument
    text: str
    sections: list[Section] = field(default_factory=list)


class _Builder:
    """Accumulates text while tracking which heading each span sits under."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.sections: list[Section] = []
        self.path: list[str] = []

    def heading(self, level: int, title: str) -> None:
        self.path = [*self.path[: level - 1], title.strip()]
        self.sections.append(Section(list(self.path), self.length, self.length))
        self.add(title.strip())

    def add(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if not self.sections:
            self.sections.append(Section([], self.length, self.length))
        if self.parts:
            self.parts.append("\n\n")
            self.length += 2
        self.parts.append(text)
        self.length += len(text)
        self.sections[-1].end = self.length

    def build(self, document: SourceDocument) -> ParsedDocument:
        text = "".join(self.parts)
        sections = [s for s in self.sections if text[s.start : s.end].strip()]
        return ParsedDocument(document, text, sections)


def _decode_text(data: bytes) -> str:
    if b"\x00" in data[:65536]:
        raise DocumentRejected("parse", "binary content in a text file (NUL bytes)")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise DocumentRejected("parse", "binary content in a text file (not decodable)")
    sample = text[:65536]
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in sample)
    if sample and printable / len(sample) < 0.9:
        raise DocumentRejected(
            "parse", f"binary content in a text file ({printable / len(sample):.0%} printable)"
        )
    return text


def _plain(doc: SourceDocument, data: bytes) -> ParsedDocument:
    builder = _Builder()
    for paragraph in re.split(r"\n\s*\n", _decode_text(data)):
        builder.add(paragraph)
    return builder.build(doc)


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _markdown(doc: SourceDocument, data: bytes) -> ParsedDocument:
    builder = _Builder()
    paragraph: list[str] = []
    in_code = False
    for line in _decode_text(data).splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else _MD_HEADING.match(line)
        if match:
            builder.add("\n".join(paragraph))
            paragraph = []
            builder.heading(len(match.group(1)), match.group(2))
        elif not line.strip() and not in_code:
            builder.add("\n".join(paragraph))
            paragraph = []
        else:
            paragraph.append(line)
    builder.add("\n".join(paragraph))
    return builder.build(doc)


_BOILERPLATE = ["script", "style", "noscript", "nav", "header", "footer", "aside", "form",
                "template", "svg"]


def _html(doc: SourceDocument, data: bytes) -> ParsedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "lxml")
    for tag in soup(_BOILERPLATE):
        tag.decompose()
    builder = _Builder()
    body = soup.body or soup
    blocks = body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "th",
                            "blockquote", "dt", "dd"])
    for block in blocks:
        # A <p> inside an <li> would otherwise be read twice.
        if block.find_parent(["p", "li", "pre", "td", "th", "blockquote", "dd"]):
            continue
        text = block.get_text(" ", strip=True)
        if block.name and block.name[0] == "h" and block.name[1:].isdigit():
            builder.heading(int(block.name[1]), text)
        else:
            builder.add(text)
    if not builder.parts:
        builder.add(body.get_text("\n", strip=True))
    if not doc.title or doc.title == doc.doc_id:
        title = soup.title.get_text(strip=True) if soup.title else ""
        if title:
            doc = doc.model_copy(update={"title": title})
    return builder.build(doc)


def _pdf(doc: SourceDocument, data: bytes) -> ParsedDocument:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentRejected("parse", "encrypted PDF (password required)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentRejected:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise DocumentRejected("parse", f"corrupt PDF: {error}") from error
    except Exception as error:
        # pypdf raises many internal types on damaged files; every one of them means "corrupt".
        if "pypdf" not in type(error).__module__ and "crypt" not in str(error).lower():
            raise
        reason = "encrypted PDF" if "crypt" in str(error).lower() else "corrupt PDF"
        raise DocumentRejected("parse", f"{reason}: {error}") from error
    builder = _Builder()
    for number, text in enumerate(pages, start=1):
        if text.strip():
            builder.sections.append(Section([f"Page {number}"], builder.length, builder.length))
            for paragraph in re.split(r"\n\s*\n", text):
                builder.add(paragraph)
    return builder.build(doc)


def _docx(doc: SourceDocument, data: bytes) -> ParsedDocument:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, OSError) as error:
        raise DocumentRejected("parse", f"corrupt DOCX: {error}") from error
    except Exception as error:
        if type(error).__module__.split(".")[0] not in ("zipfile", "lxml", "docx"):
            raise
        raise DocumentRejected("parse", f"corrupt DOCX: {error}") from error
    builder = _Builder()
    for paragraph in document.paragraphs:
        style = (paragraph.style.name or "") if paragraph.style is not None else ""
        level = re.match(r"Heading (\d)", style)
        if level:
            builder.heading(int(level.group(1)), paragraph.text)
        elif style == "Title":
            builder.heading(1, paragraph.text)
        else:
            builder.add(paragraph.text)
    for table in document.tables:
        for row in table.rows:
            builder.add(" | ".join(cell.text.strip() for cell in row.cells))
    return builder.build(doc)


def _csv(doc: SourceDocument, data: bytes) -> ParsedDocument:
    text = _decode_text(data)
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return _Builder().build(doc)
    header, body = rows[0], rows[1:]
    builder = _Builder()
    for row in body:
        builder.add("; ".join(f"{h.strip()}: {v.strip()}" for h, v in zip(header, row,
                                                                          strict=False)))
    return builder.build(doc)


PARSERS = {
    "text/plain": _plain,
    "text/markdown": _markdown,
    "text/html": _html,
    "application/pdf": _pdf,
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": _docx,
    "text/csv": _csv,
}


def parse_document(doc: SourceDocument) -> ParsedDocument:
    """Parse one document; raises DocumentRejected with a reason a person can act on."""
    if doc.text is not None:
        builder = _Builder()
        for paragraph in re.split(r"\n\s*\n", doc.text):
            builder.add(paragraph)
        parsed = builder.build(doc)
    else:
        parser = PARSERS.get(doc.mime_type)
        if parser is None:
            raise DocumentRejected("parse", f"unsupported file type {doc.mime_type}")
        if not doc.content:
            raise DocumentRejected("parse", "empty file (0 bytes)")
        parsed = parser(doc, doc.content)
    if not parsed.text.strip():
        raise DocumentRejected("parse", "no text could be extracted")
    return parsed
