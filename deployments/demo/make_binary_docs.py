"""Write the demo corpus's DOCX and PDF documents deterministically, then check they read back."""

from __future__ import annotations

import io
import textwrap
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import docx
from docx.shared import Pt
from pypdf import PdfReader

CORPUS = Path(__file__).resolve().parent / "corpus"
AUTHOR = "Brookline Pumps Ltd"
# A fixed date keeps re-runs byte-identical, so the demo ingest sees no spurious changes.
FIXED_DATE = datetime(2024, 3, 1, 9, 0, 0, tzinfo=UTC)
FIXED_ZIP_TIME = (2024, 3, 1, 9, 0, 0)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int  # 0 is the document title


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    rows: tuple[tuple[str, ...], ...]  # the first row is the header


Block = Heading | Para | Bullets | Table


@dataclass(frozen=True)
class Document:
    path: str  # relative to CORPUS; the folder decides who may read it
    title: str
    subject: str
    blocks: tuple[Block, ...]


WHISTLEBLOWING = Document(
    path="policies/whistleblowing-policy.docx",
    title="Whistleblowing Policy",
    subject="How to raise concerns about wrongdoing, and how reporters are protected",
    blocks=(
        Heading("Whistleblowing Policy", 0),
        Para(
            "Owner: Legal team. Approved by the Executive Committee on 12 December 2023. "
            "Applies to all employees, agency workers, contractors and former employees of "
            "Brookline Pumps Ltd in the United Kingdom and the Netherlands. Version 2.0."
        ),
        Heading("Purpose", 1),
        Para(
            "We want everyone who works with us to feel able to raise concerns about wrongdoing "
            "without fear of reprisal. Problems that are raised early can usually be put right "
            "quickly and at little cost; problems that stay hidden can harm customers, "
            "colleagues, the public and the company. This policy explains what kind of concerns "
            "it covers, how to report them, and how we protect people who speak up."
        ),
        Heading("What this policy covers", 1),
        Para(
            "A whistleblowing concern is a reasonable belief that wrongdoing has happened, is "
            "happening or is likely to happen, and that it affects others or the public "
            "interest. Examples include:"
        ),
        Bullets(
            (
                "criminal activity, including fraud, theft, bribery or false accounting;",
                "danger to health and safety, for example bypassed machine guards or falsified "
                "pressure-test records;",
                "damage to the environment, such as unreported spills of oil or coolant;",
                "failure to comply with a legal obligation, including product safety and "
                "drinking-water approval requirements;",
                "breaches of our Code of Conduct or of competition law;",
                "deliberate concealment of any of the above.",
            )
        ),
        Para(
            "Personal grievances about your own employment, such as a dispute about pay or a "
            "disagreement with your manager, are normally handled under the Grievance Procedure. "
            "If you are unsure which procedure applies, raise the concern anyway and we will "
            "direct it to the right place."
        ),
        Heading("How to raise a concern", 1),
        Heading("Internal channels", 2),
        Para(
            "In most cases, speak first to your line manager. If you prefer not to, or if the "
            "concern involves your manager, use one of the channels below. You may raise a "
            "concern by phone, in writing or in a meeting, and you may ask for the meeting to "
            "take place away from your workplace."
        ),
        Table(
            (
                ("Channel", "Contact", "Availability"),
                (
                    "Whistleblowing Officer (Head of Legal)",
                    "speakup@brookline-pumps.example",
                    "Weekdays",
                ),
                ("Confidential phone line", "+44 20 7946 0999 (voicemail at night)", "24 hours"),
                ("Audit Committee Chair", "audit.chair@brookline-pumps.example", "Weekdays"),
                ("Anonymous web form", "speakup.brookline-pumps.example", "24 hours"),
            )
        ),
        Heading("Anonymous reports", 2),
        Para(
            "You may report anonymously, but it is harder for us to investigate and to give you "
            "feedback if we cannot contact you. We encourage you to give your name in confidence: "
            "we will not reveal your identity without your consent unless the law requires it."
        ),
        Heading("External reporting", 2),
        Para(
            "This policy aims to let you raise concerns internally, but the law also allows you "
            "to report to a prescribed regulator, such as the Health and Safety Executive, the "
            "Environment Agency or the Drinking Water Inspectorate. Independent, free advice is "
            "available from the charity Protect. In the Netherlands, employees may contact the "
            "Huis voor Klokkenluiders."
        ),
        Heading("What happens next", 1),
        Para(
            "The Whistleblowing Officer acknowledges every report within five working days and "
            "decides how it will be investigated. Investigations are carried out by someone "
            "independent of the area concerned. We aim to tell you the outcome within three "
            "months, although we may not be able to share details where this would breach "
            "another person's confidentiality."
        ),
        Heading("Protection from retaliation", 1),
        Para(
            "No one will suffer any detriment for raising a genuine concern, even if it turns out "
            "to be mistaken. Detriment includes dismissal, disciplinary action, threats, "
            "exclusion from work or being passed over for promotion. Anyone who retaliates "
            "against a whistleblower will face disciplinary action. Deliberately false reports "
            "made maliciously are themselves a disciplinary matter."
        ),
        Heading("Records and review", 1),
        Para(
            "The Legal team keeps a confidential register of concerns raised, the investigation "
            "and the outcome. An anonymised summary is reported to the Audit Committee twice a "
            "year. This policy is reviewed every two years."
        ),
    ),
)

PUMP_CALIBRATION = Document(
    path="engineering/runbooks/pump-calibration.docx",
    title="Runbook: BP-200 Sensor Calibration",
    subject="Calibrating the Brookline Connect sensors on BP-200 series pumps",
    blocks=(
        Heading("Runbook: BP-200 Sensor Calibration", 0),
        Para(
            "Owner: Field Service Engineering. Applies to BP-210, BP-220, BP-240 and BP-240e "
            "pumps fitted with the Brookline Connect telemetry module. Last reviewed on "
            "20 February 2024 by Owen Price."
        ),
        Heading("When to calibrate", 1),
        Para(
            "Sensors are calibrated at commissioning, every 12 months during the annual service, "
            "after replacing a sensor or the telemetry module, and whenever the pump-telemetry "
            "service raises a SensorDrift alarm. Drift is detected by comparing the pump's "
            "reported duty point with its factory performance curve; a deviation above 5% for "
            "24 hours raises the alarm."
        ),
        Heading("Sensors and tolerances", 1),
        Table(
            (
                ("Sensor", "Type", "Range", "Tolerance"),
                ("Suction pressure", "Piezoresistive transmitter", "-1 to 10 bar", "0.5% of span"),
                ("Discharge pressure", "Piezoresistive transmitter", "0 to 16 bar", "0.5% of span"),
                ("Flow", "Electromagnetic flow meter", "Model dependent", "1.0% of reading"),
                ("Bearing temperature", "PT100, class A", "-20 to 150 C", "0.5 C"),
                ("Vibration", "MEMS accelerometer", "0 to 50 mm/s RMS", "5% of reading"),
            )
        ),
        Heading("Equipment needed", 1),
        Bullets(
            (
                "Calibrated reference pressure gauge or hand pump with a certificate less than "
                "12 months old;",
                "PT100 simulator or dry-block calibrator;",
                "Portable vibration analyser with a reference shaker;",
                "Laptop with the Brookline Service Tool, version 4.2 or later;",
                "Lock-out/tag-out kit and the site permit to work.",
            )
        ),
        Heading("Procedure", 1),
        Heading("1. Make the pump safe", 2),
        Para(
            "Agree the work with the site operator, obtain a permit to work, and isolate the pump "
            "electrically and hydraulically following the lock-out/tag-out procedure. Pressure "
            "sensors can only be calibrated with the pump isolated and the casing drained."
        ),
        Heading("2. Put the telemetry module into service mode", 2),
        Para(
            "Connect the Service Tool over USB and select Service Mode. In service mode the module "
            "keeps sending data, but marks every reading as maintenance so that the customer does "
            "not receive false alarms. Service mode ends automatically after four hours."
        ),
        Heading("3. Calibrate each sensor", 2),
        Para(
            "For pressure transmitters, apply reference pressures at 0%, 50% and 100% of span and "
            "record the reading at each point. If any error exceeds the tolerance, use Adjust "
            "Zero and Adjust Span in the Service Tool, then repeat the three-point check. For the "
            "PT100, apply 20 C and 100 C with the simulator. For the accelerometer, mount it on "
            "the reference shaker at 10 mm/s and 159.2 Hz."
        ),
        Para(
            "The flow meter cannot be adjusted in the field. If its verification fails, replace "
            "the meter and return it to Sheffield for recalibration."
        ),
        Heading("4. Return to service", 2),
        Para(
            "Remove the isolation, restart the pump and check that live values in the Service Tool "
            "are plausible. End service mode, then confirm in the customer portal that the pump "
            "reports normally and that no alarms are active."
        ),
        Heading("Records", 1),
        Para(
            "Upload the calibration certificate from the Service Tool to the asset record in the "
            "service system before leaving site. Certificates are kept for seven years because "
            "some utility contracts require them for regulatory audits. Questions about this "
            "runbook go to the field service desk, +44 20 7946 0560."
        ),
    ),
)

HEALTH_AND_SAFETY = Document(
    path="policies/health-and-safety.pdf",
    title="Health and Safety Policy",
    subject="Statement of intent, responsibilities and arrangements for health and safety",
    blocks=(
        Heading("Health and Safety Policy", 0),
        Para(
            "Owner: Colin Hughes, Health, Safety and Facilities Manager. Signed by Margaret "
            "Ellison, Chief Executive, on 8 January 2024. Applies to all Brookline Pumps Ltd "
            "sites (Sheffield, London, Rotterdam), to employees working at customer sites, and to "
            "contractors and visitors on our premises."
        ),
        Heading("Statement of intent", 1),
        Para(
            "Brookline Pumps Ltd is committed to preventing injury and ill health at work. We "
            "will provide safe plant and equipment, safe systems of work, and the information, "
            "instruction, training and supervision that our people need. We will consult "
            "employees and their representatives on matters affecting their health and safety, "
            "and we will review this policy every year. No production target or customer "
            "deadline justifies working unsafely, and anyone may stop a job they believe is unsafe."
        ),
        Heading("Responsibilities", 1),
        Heading("Chief Executive and directors", 2),
        Para(
            "The Chief Executive has overall responsibility for health and safety. Directors make "
            "sure that adequate resources are available, review safety performance every month "
            "at the Executive Committee, and lead by example on site visits."
        ),
        Heading("Managers and supervisors", 2),
        Para(
            "Managers make sure that risk assessments exist and are followed for the work under "
            "their control, that staff are trained before they start a task, and that incidents "
            "and near misses are reported and investigated."
        ),
        Heading("Everyone", 2),
        Para(
            "Every employee must take reasonable care of their own safety and that of others, "
            "follow safe systems of work, use the personal protective equipment (PPE) provided, "
            "and report hazards, incidents and near misses without delay."
        ),
        Heading("Arrangements", 1),
        Bullets(
            (
                "Risk assessment: every task in the factory, warehouse, test bay and field service "
                "has a written risk assessment, reviewed at least every two years or after an "
                "incident or change.",
                "Machinery: guards and interlocks must never be bypassed. Lock-out/tag-out (LOTO) "
                "is mandatory before maintenance, cleaning or clearing a blockage.",
                "Pressure testing: only trained test-bay staff may pressurise pumps, behind the "
                "test-bay screens, following procedure TB-04.",
                "Manual handling: use lifting aids for pump casings over 25 kg; loads over 500 kg "
                "are moved by overhead crane by certified operators only.",
                "Lone working: field service engineers check in with the dispatch desk at the "
                "start and end of every site visit.",
                "Display screen equipment: office and home workers complete an annual DSE "
                "assessment.",
                "Contractors: all contractors receive a site induction and work under a permit "
                "to work issued by Facilities.",
            )
        ),
        Heading("Accidents, incidents and first aid", 1),
        Para(
            "Report every accident, incident and near miss in the safety reporting app or to your "
            "supervisor before the end of the shift. Serious incidents are reported to the "
            "enforcing authority under the Reporting of Injuries, Diseases and Dangerous "
            "Occurrences Regulations (RIDDOR) by the Health and Safety team. First aiders are "
            "listed on the notice boards at each site; Sheffield has at least one first aider on "
            "every shift."
        ),
        Heading("Fire and emergencies", 1),
        Para(
            "Fire alarms are tested every Wednesday at 10:00 and evacuation drills are held twice "
            "a year at each site. On hearing the alarm, leave by the nearest exit and go to the "
            "assembly point. Do not re-enter the building until a fire marshal says it is safe."
        ),
        Heading("Monitoring and review", 1),
        Para(
            "The Health and Safety Committee (management and elected employee representatives) "
            "meets quarterly. Key indicators are the lost-time injury frequency rate, near-miss "
            "reports, overdue actions and training completion. In 2023 the lost-time injury "
            "frequency rate was 0.9 per 200,000 hours worked (2022: 1.4). Health and Safety "
            "team: safety@brookline-pumps.example, +44 20 7946 0377."
        ),
    ),
)

ANNUAL_REPORT = Document(
    path="finance/annual-report-summary.pdf",
    title="Annual Report 2023: Summary",
    subject="Summary of the 2023 financial results and 2024 outlook",
    blocks=(
        Heading("Annual Report 2023: Summary", 0),
        Para(
            "Prepared by Finance for the Executive Committee and the Board. Figures are in euros "
            "(EUR), the currency of the group management accounts, and are unaudited until the "
            "statutory accounts are signed in April 2024."
        ),
        Heading("Highlights", 1),
        Bullets(
            (
                "Revenue grew 9.6% to EUR 71.8 million (2022: EUR 65.5 million), driven by water "
                "utility frameworks in the UK and by service contracts.",
                "EBITDA rose to EUR 8.9 million, a margin of 12.4% (2022: 11.1%).",
                "Connected pumps on Brookline Connect reached 8,400 at year end (2022: 5,100).",
                "Net cash at 31 December 2023 was EUR 6.2 million after capital expenditure of "
                "EUR 3.4 million.",
                "Average headcount was 412 (2022: 391).",
            )
        ),
        Heading("Key figures", 1),
        Table(
            (
                ("Measure (EUR million)", "2023", "2022", "Change"),
                ("Revenue", "71.8", "65.5", "+9.6%"),
                ("Gross profit", "25.1", "22.3", "+12.6%"),
                ("EBITDA", "8.9", "7.3", "+21.9%"),
                ("Operating profit (EBIT)", "6.1", "4.8", "+27.1%"),
                ("Capital expenditure", "3.4", "2.9", "+17.2%"),
                ("Net cash", "6.2", "4.7", "+31.9%"),
            )
        ),
        Heading("Revenue by segment", 1),
        Para(
            "Pump sales (BP-200 series and legacy ranges) contributed EUR 52.6 million (73%). "
            "Service and spare parts contributed EUR 15.9 million (22%), and Brookline Connect "
            "subscriptions EUR 3.3 million (5%). The UK accounted for 68% of revenue, the "
            "Benelux region for 24% and other markets for 8%."
        ),
        Heading("Costs and margins", 1),
        Para(
            "Gross margin improved from 34.0% to 35.0% as copper and steel prices eased in the "
            "second half of the year and price increases agreed in 2022 took full effect. "
            "Overheads grew 7% (mainly salary inflation and two additional software engineering "
            "teams for Brookline Connect)."
        ),
        Heading("Outlook for 2024", 1),
        Para(
            "The Board has approved a budget of EUR 77.5 million revenue for 2024, with operating "
            "costs of about EUR 63.4 million (Q1 budget: EUR 15.86 million). The GBP 6 million "
            "investment in the Sheffield machining cell and test rig is funded from cash and an "
            "asset-finance facility. Main risks are copper prices, the timing of utility capital "
            "programmes, and recruitment of software and field service engineers."
        ),
        Para(
            "The full report and the detailed management accounts are stored on the finance "
            "share at \\\\bp-fs01\\finance\\reports\\2023\\ (access restricted to Finance and "
            "the Executive Committee)."
        ),
    ),
)


def write_docx(doc: Document) -> Path:
    out = CORPUS / doc.path
    out.parent.mkdir(parents=True, exist_ok=True)
    d = docx.Document()
    for block in doc.blocks:
        if isinstance(block, Heading):
            d.add_heading(block.text, level=block.level)
        elif isinstance(block, Para):
            d.add_paragraph(block.text)
        elif isinstance(block, Bullets):
            for item in block.items:
                d.add_paragraph(item, style="List Bullet")
        else:
            table = d.add_table(rows=len(block.rows), cols=len(block.rows[0]))
            table.style = "Table Grid"
            for r, row in enumerate(block.rows):
                for c, text in enumerate(row):
                    run = table.cell(r, c).paragraphs[0].add_run(text)
                    run.bold = r == 0
                    run.font.size = Pt(10)
    props = d.core_properties
    props.title = doc.title
    props.subject = doc.subject
    props.author = AUTHOR
    props.last_modified_by = AUTHOR
    props.comments = ""
    props.revision = 1
    props.created = FIXED_DATE
    props.modified = FIXED_DATE
    buffer = io.BytesIO()
    d.save(buffer)
    out.write_bytes(_normalise_zip(buffer.getvalue()))
    return out


def _normalise_zip(data: bytes) -> bytes:
    # python-docx stamps every zip entry with the current time; rewrite them with a fixed one.
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_ZIP_TIME)
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


# PDF layout, in points: A4 page, body text wrapped at about 90 characters.
PAGE_W, PAGE_H = 595, 842
MARGIN_X, MARGIN_TOP, MARGIN_BOTTOM = 56, 60, 64
WRAP = 90
BODY, BODY_LEAD = 10.0, 13.5
REGULAR, BOLD = "F1", "F2"
BULLET = "\u2022"


@dataclass(frozen=True)
class Segment:
    font: str
    size: float
    x: float
    text: str


@dataclass(frozen=True)
class Line:
    height: float  # distance from the previous baseline to this one
    segments: tuple[Segment, ...] = ()
    keep: float = 0.0  # room needed below, so a heading is not stranded at the foot of a page


def layout(doc: Document) -> list[Line]:
    lines: list[Line] = []
    for block in doc.blocks:
        if isinstance(block, Heading):
            size, lead = {0: (18.0, 30.0), 1: (13.0, 24.0), 2: (11.0, 19.0)}[block.level]
            segs = (Segment(BOLD, size, MARGIN_X, block.text),)
            lines.append(Line(lead, segs, keep=3 * BODY_LEAD))
            if block.level == 0:
                lines.append(Line(6.0))
        elif isinstance(block, Para):
            wrapped = textwrap.wrap(block.text, WRAP)
            lines += [Line(BODY_LEAD, (Segment(REGULAR, BODY, MARGIN_X, t),)) for t in wrapped]
            lines.append(Line(5.0))
        elif isinstance(block, Bullets):
            for item in block.items:
                for i, text in enumerate(textwrap.wrap(item, WRAP - 4)):
                    segs = [Segment(REGULAR, BODY, MARGIN_X + 14, text)]
                    if i == 0:
                        segs.insert(0, Segment(REGULAR, BODY, MARGIN_X + 4, BULLET))
                    lines.append(Line(BODY_LEAD, tuple(segs)))
            lines.append(Line(5.0))
        else:
            lines += _table_lines(block)
            lines.append(Line(8.0))
    return lines


def _table_lines(table: Table) -> list[Line]:
    # Helvetica averages about half an em per character, so size columns from the longest cell.
    widths = [max(len(row[c]) for row in table.rows) for c in range(len(table.rows[0]))]
    xs = [MARGIN_X + 4 + sum(w * BODY * 0.5 + 18 for w in widths[:c]) for c in range(len(widths))]
    lines = []
    for r, row in enumerate(table.rows):
        font = BOLD if r == 0 else REGULAR
        segs = tuple(Segment(font, BODY, x, text) for x, text in zip(xs, row, strict=True))
        lines.append(Line(BODY_LEAD + (2 if r == 1 else 0), segs))
    return lines


def paginate(lines: list[Line]) -> list[list[tuple[float, Line]]]:
    pages: list[list[tuple[float, Line]]] = [[]]
    y = PAGE_H - MARGIN_TOP
    for line in lines:
        if y - line.height - line.keep < MARGIN_BOTTOM:
            # Spacer lines are dropped at a page break so a page never starts with a gap.
            if not line.segments:
                continue
            pages.append([])
            # Headings carry their space-above in height; at the top of a page it is not wanted.
            y = PAGE_H - MARGIN_TOP + line.height - BODY_LEAD
        y -= line.height
        if line.segments:
            pages[-1].append((y, line))
    return pages


def pdf_string(text: str) -> str:
    # WinAnsiEncoding is cp1252; non-ASCII bytes are written as octal so the file stays ASCII.
    out = []
    for byte in text.encode("cp1252"):
        if byte in b"()\\":
            out.append("\\" + chr(byte))
        elif 32 <= byte < 127:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "(" + "".join(out) + ")"


def page_stream(doc: Document, placed: list[tuple[float, Line]], number: int, total: int) -> bytes:
    ops = []
    for y, line in placed:
        for seg in line.segments:
            ops.append(
                f"BT /{seg.font} {seg.size:g} Tf 1 0 0 1 {seg.x:.2f} {y:.2f} Tm "
                f"{pdf_string(seg.text)} Tj ET"
            )
    footer = f"{AUTHOR} - {doc.title} - Page {number} of {total}"
    ops.append(f"BT /{REGULAR} 8 Tf 1 0 0 1 {MARGIN_X} 36 Tm {pdf_string(footer)} Tj ET")
    return ("\n".join(ops) + "\n").encode("ascii")


def write_pdf(doc: Document) -> Path:
    out = CORPUS / doc.path
    out.parent.mkdir(parents=True, exist_ok=True)
    pages = paginate(layout(doc))
    fonts = {REGULAR: "Helvetica", BOLD: "Helvetica-Bold"}
    first_page = 6  # objects 1-5 are the catalog, page tree, two fonts and the info dictionary
    page_ids = [first_page + 2 * i for i in range(len(pages))]
    font_res = " ".join(f"/{name} {3 + i} 0 R" for i, name in enumerate(fonts))
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] "
        f"/Count {len(pages)} >>".encode("ascii"),
        *(
            f"<< /Type /Font /Subtype /Type1 /BaseFont /{base} "
            f"/Encoding /WinAnsiEncoding >>".encode("ascii")
            for base in fonts.values()
        ),
        f"<< /Title {pdf_string(doc.title)} /Subject {pdf_string(doc.subject)} "
        f"/Author {pdf_string(AUTHOR)} /Producer (make_binary_docs.py) >>".encode("ascii"),
    ]
    for i, (placed, page_id) in enumerate(zip(pages, page_ids, strict=True)):
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] "
            f"/Resources << /Font << {font_res} >> >> /Contents {page_id + 1} 0 R >>".encode(
                "ascii"
            )
        )
        stream = page_stream(doc, placed, i + 1, len(pages))
        objects.append(
            f"<< /Length {len(stream)} >>\nstream\n".encode("ascii") + stream + b"endstream"
        )

    # The binary comment tells transfer tools the file is not plain text.
    body = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += f"{number} 0 obj\n".encode("ascii") + obj + b"\nendobj\n"
    xref_at = len(body)
    # Each xref entry must be exactly 20 bytes, hence the space before the newline.
    body += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode("ascii")
    body += b"".join(f"{off:010d} 00000 n \n".encode("ascii") for off in offsets)
    body += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 5 0 R >>\n"
        f"startxref\n{xref_at}\n%%EOF\n"
    ).encode("ascii")
    out.write_bytes(bytes(body))
    return out


def first_heading(doc: Document) -> str:
    return next(b.text for b in doc.blocks if isinstance(b, Heading))


def verify_docx(doc: Document, path: Path) -> None:
    d = docx.Document(str(path))
    paragraphs = d.paragraphs
    if paragraphs[0].text != first_heading(doc) or paragraphs[0].style.name != "Title":
        raise SystemExit(f"{path}: title did not read back")
    styles = {p.style.name for p in paragraphs}
    if not {"Heading 1", "Heading 2"} <= styles or len(d.tables) != 1:
        raise SystemExit(f"{path}: headings or table missing")
    if d.core_properties.created != FIXED_DATE:
        raise SystemExit(f"{path}: created date not fixed")


def verify_pdf(doc: Document, path: Path) -> None:
    # strict=True makes pypdf fail on a broken xref instead of silently repairing it.
    reader = PdfReader(path, strict=True)
    text = reader.pages[0].extract_text()
    if first_heading(doc) not in text:
        raise SystemExit(f"{path}: first heading not extractable")
    if not 1 <= len(reader.pages) <= 2:
        raise SystemExit(f"{path}: expected 1-2 pages, got {len(reader.pages)}")


def main() -> None:
    for doc in (WHISTLEBLOWING, PUMP_CALIBRATION):
        path = write_docx(doc)
        verify_docx(doc, path)
        print(f"{path.relative_to(CORPUS.parent)}  {path.stat().st_size} bytes")
    for doc in (HEALTH_AND_SAFETY, ANNUAL_REPORT):
        path = write_pdf(doc)
        verify_pdf(doc, path)
        print(f"{path.relative_to(CORPUS.parent)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
