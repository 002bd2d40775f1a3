"""Parsing: every supported format to structured text; bad input to a clear rejection."""

from __future__ import annotations

import io

import docx
import pytest
from pypdf import PdfWriter

from headwater.records import SourceDocument
from tasks.parse import DocumentRejected, mime_for, parse_document


def _doc(name: str, content: bytes) -> SourceDocument:
    return SourceDocument(source="s", doc_id=name, title=name, mime_type=mime_for(name),
                          content=content, version="v")


def _docx_bytes() -> bytes:
    document = docx.Document()
    document.add_heading("Expenses", level=1)
    document.add_paragraph("Claims are paid monthly.")
    document.add_heading("Travel", level=2)
    document.add_paragraph("Book economy class.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def _pdf_bytes(password: str | None = None) -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    if password:
        writer.encrypt(password, algorithm="AES-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "text", "headings"),
    [
        ("notes.txt", b"First paragraph.\n\nSecond one.", "First paragraph.\n\nSecond one.",
         [[]]),
        ("guide.md", b"# Guide\n\nIntro.\n\n## Setup\n\nInstall it.\n```\n# not a heading\n```",
         None, [["Guide"], ["Guide", "Setup"]]),
        ("page.html", b"<html><head><title>T</title><script>x()</script></head><body><nav>Home"
                      b"</nav><h1>Pumps</h1><p>They move water.</p><footer>(c)</footer></body>"
                      b"</html>", "Pumps\n\nThey move water.", [["Pumps"]]),
        ("bands.csv", b"role,band\nengineer,B3\n", "role: engineer; band: B3", [[]]),
        ("policy.docx", _docx_bytes(), None, [["Expenses"], ["Expenses", "Travel"]]),
    ],
)
def test_supported_formats_become_text_with_their_headings(
    name: str, content: bytes, text: str | None, headings: list[list[str]]
) -> None:
    parsed = parse_document(_doc(name, content))
    if text is not None:
        assert parsed.text == text
    assert [s.heading_path for s in parsed.sections] == headings
    for section in parsed.sections:
        assert parsed.text[section.start : section.end].strip()


def test_markdown_code_fences_are_not_headings() -> None:
    parsed = parse_document(_doc("g.md", b"# A\n\n```\n# not a heading\n```\n"))
    assert "# not a heading" in parsed.text
    assert [s.heading_path for s in parsed.sections] == [["A"]]


def test_html_title_becomes_the_document_title() -> None:
    parsed = parse_document(SourceDocument(
        source="s", doc_id="p.html", title="p.html", mime_type="text/html",
        content=b"<html><head><title>Careers</title></head><body><p>Join us.</p></body></html>",
        version="v"))
    assert parsed.document.title == "Careers"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.txt", b"", "empty file (0 bytes)"),
        ("blob.txt", bytes(range(256)) * 8, "binary content in a text file"),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "corrupt PDF"),
        ("locked.pdf", _pdf_bytes(password="s3cret"), "encrypted PDF"),
        ("blank.pdf", _pdf_bytes(), "no text could be extracted"),
        ("broken.docx", b"PK\x03\x04 not a zip", "corrupt DOCX"),
        ("tool.exe", b"MZ\x90\x00", "unsupported file type application/octet-stream"),
        ("spaces.md", b"   \n\n  \n", "no text could be extracted"),
    ],
)
def test_bad_documents_are_rejected_with_a_clear_reason(
    name: str, content: bytes, reason: str
) -> None:
    with pytest.raises(DocumentRejected) as rejected:
        parse_document(_doc(name, content))
    assert rejected.value.reason.startswith(reason)
    assert rejected.value.stage == "parse"
