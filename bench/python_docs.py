"""A public retrieval benchmark built offline from Python's HTML docs and their general index."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from headwater.errors import HeadwaterError  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html")
SOURCE = "python-docs"
# The default hybrid first: the A/B comparisons are each other variant against it.
VARIANTS = ["hybrid", "bm25", "vector"]
_QUALIFIER = re.compile(r"\s*\([^()]+\)\s*$")
# An index term linked from this many pages or more is a topic word, not a question.
MAX_PAGES_PER_TERM = 8
MIN_TERM_CHARS = 4


class DocsMissing(HeadwaterError):
    """Python's HTML documentation is not installed where the benchmark looks."""


def _page(href: str) -> str | None:
    """The page an index link points at, anchor stripped; None for links out of the docs."""
    page = href.split("#", 1)[0]
    return page if page.endswith(".html") and "://" not in page else None


def genindex_entries(html: str) -> dict[str, set[str]]:
    """Index term -> the pages its entries (sub-entries included) link to, from one Sphinx
    genindex page. A trailing qualifier such as "(in module os)" is not part of the term."""
    from bs4 import BeautifulSoup, NavigableString, Tag

    soup = BeautifulSoup(html, "lxml")
    entries: dict[str, set[str]] = {}
    for table in soup.select("table.indextable"):
        for item in table.select("td > ul > li"):
            first = next((c for c in item.children
                          if isinstance(c, Tag) or str(c).strip()), None)
            if first is None:
                continue
            text = first.get_text(" ", strip=True) if isinstance(first, Tag) else str(first)
            if isinstance(first, NavigableString):
                text = text.strip()
            term = _QUALIFIER.sub("", " ".join(text.split()))
            pages = {p for a in item.find_all("a", href=True) if (p := _page(a["href"]))}
            if term and pages:
                entries.setdefault(term, set()).update(pages)
    return entries


def document_pages(html_dir: Path, subset: str = "all") -> list[str]:
    """Content pages (relative paths), without the indexes, search page and static files."""
    pages = []
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir).as_posix()
        if rel.startswith("_") or rel.startswith(("genindex", "search.html", "py-modindex")):
            continue
        if subset == "all" or rel.startswith(subset.rstrip("/") + "/"):
            pages.append(rel)
    return pages


def choose_pages(html_dir: Path, subset: str, cap: int | None, seed: int) -> list[str]:
    pages = document_pages(html_dir, subset)
    if not pages:
        raise DocsMissing(f"no pages under {html_dir} match the subset {subset!r}")
    return sorted(random.Random(seed).sample(pages, cap)) if cap and cap < len(pages) else pages


def index_queries(html_dir: Path, pages: set[str], count: int, seed: int) -> list[dict]:
    """Labelled queries: index terms as queries, the chosen pages they link to as relevant."""
    terms: dict[str, set[str]] = {}
    for path in sorted(html_dir.glob("genindex-*.html")):
        if path.name != "genindex-all.html":  # the same entries again, all on one page
            for term, linked in genindex_entries(path.read_text(errors="replace")).items():
                terms.setdefault(term, set()).update(linked)
    usable = sorted(
        (term, sorted(linked & pages)) for term, linked in terms.items()
        if len(term.replace("()", "")) >= MIN_TERM_CHARS and any(c.isalpha() for c in term)
        and len(linked) < MAX_PAGES_PER_TERM and linked & pages)
    chosen = random.Random(seed).sample(usable, min(count, len(usable)))
    return [{"id": f"genindex-{n}", "query": term, "relevant": relevant}
            for n, (term, relevant) in enumerate(sorted(chosen), start=1)]


def prepare(html_dir: Path, workdir: Path, subset: str, cap: int | None, queries: int,
            seed: int) -> dict[str, Any]:
    """The folder source over the chosen pages and its query set, written under `workdir`."""
    if not (html_dir / "genindex-A.html").is_file():
        raise DocsMissing(
            f"Python's HTML docs are not in {html_dir}",
            "install them with `apt-get install -y python3.11-doc` (Debian/Ubuntu, as root), "
            "or point --html-dir at an unpacked python-3.11-docs-html archive")
    pages = choose_pages(html_dir, subset, cap, seed)
    labelled = index_queries(html_dir, set(pages), queries, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = workdir / "queries.jsonl"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in labelled))
    config = workdir / "headwater.yaml"
    config.write_text(yaml.safe_dump({"sources": [{
        "name": SOURCE, "type": "folder",
        "params": {"root": str(html_dir), "include": pages, "exclude": []},
        "principals": {"": ["public"]}}]}))
    return {"pages": len(pages), "queries": len(labelled), "dataset": dataset,
            "config": config}


def run(html_dir: Path = DOCS, subset: str = "library", cap: int | None = 60,
        queries: int = 300, seed: int = 7, data_dir: Path | None = None) -> dict[str, Any]:
    """Build, sync (incremental on a re-run) and evaluate; returns the evaluation report."""
    from headwater.settings import get_settings

    key = f"{subset.replace('/', '')}{cap or 'all'}s{seed}"
    workdir = (data_dir or get_settings().data_dir) / "bench" / f"{SOURCE}-{key}"
    prepared = prepare(html_dir, workdir, subset, cap, queries, seed)
    os.environ.update({
        "HEADWATER_CONFIG": str(prepared["config"]),
        "HEADWATER_STATE_DB_URL": f"sqlite:///{workdir / 'state.db'}",
        "HEADWATER_COLLECTION": "BenchPythonDocs" + re.sub(r"[^A-Za-z0-9]", "", key.title()),
    })
    get_settings.cache_clear()
    from flows.evaluate import evaluate_retrieval
    from flows.sync import sync_source

    state = sync_source(SOURCE, return_state=True)
    if not state.is_completed():
        raise HeadwaterError(f"the sync of the benchmark pages failed: {state.message}")
    report = evaluate_retrieval(str(prepared["dataset"]), VARIANTS, [])
    return {**report, "pages": prepared["pages"], "sync": state.result()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--html-dir", type=Path, default=DOCS)
    parser.add_argument("--subset", default="library",
                        help="pages under this folder (library, reference, howto) or 'all'")
    parser.add_argument("--pages", type=int, default=60,
                        help="at most this many pages, chosen with the seed (0: every page)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    from tasks.evaluate import report_markdown

    report = run(args.html_dir, args.subset, args.pages or None, args.queries, args.seed)
    print(report_markdown(report))


if __name__ == "__main__":
    main()
