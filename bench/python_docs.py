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
# The tuning grid, run on the tuning half only: hybrid weights, fusion types and the
# properties BM25 searches (heading_path: the chunk's section headings).
GRID_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GRID_FUSIONS = {"relative": "relativeScoreFusion", "ranked": "rankedFusion",
                "document": "documentRankedFusion"}
GRID_PROPERTIES = ("text+title^2", "text", "text+title^2+heading_path")
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


def grid_variants() -> list[str]:
    """The tuning grid as variant specs, BM25 only first (the grid's A/B baseline)."""
    return ["bm25"] + [
        f"{short}/a{alpha}/{properties}:alpha={alpha},fusion={fusion},"
        f"query_properties={properties}"
        for short, fusion in GRID_FUSIONS.items() for properties in GRID_PROPERTIES
        for alpha in GRID_ALPHAS]


def grid_names() -> list[str]:
    """The grid's own variants, those the rule chooses from (BM25 only is not one)."""
    return [spec.partition(":")[0] for spec in grid_variants()[1:]]


def grid_markdown(report: dict[str, Any], chosen: str) -> str:
    """The grid's tuning scores, mean of recall@5 and MRR@10: a row per alpha, a column per
    fusion type and BM25 properties."""
    from tasks.evaluate import tuning_score

    scores = {name: tuning_score(v["metrics"]) for name, v in report["variants"].items()}
    columns = [f"{short}/{props}" for short in GRID_FUSIONS for props in GRID_PROPERTIES]
    lines = ["| alpha | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "| ---: |" + " ---: |" * len(columns)]
    for alpha in GRID_ALPHAS:
        cells = []
        for column in columns:
            short, props = column.split("/", 1)
            name = f"{short}/a{alpha}/{props}"
            cells.append(f"**{scores[name]:.4f}**" if name == chosen else f"{scores[name]:.4f}")
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    bm25 = report["variants"]["bm25"]["metrics"]
    lines += ["", f"BM25 only on the same queries: {tuning_score(bm25):.4f} (recall@5 "
              f"{bm25['recall@5']}, MRR@10 {bm25['mrr@10']}). Chosen by the rule: `{chosen}` "
              f"({report['variants'][chosen]['config']})."]
    return "\n".join(lines)


def run(html_dir: Path = DOCS, subset: str = "library", cap: int | None = None,
        queries: int = 1000, seed: int = 7, data_dir: Path | None = None,
        split: str = "test", grid: bool = False) -> dict[str, Any]:
    """Build, sync (incremental on a re-run) and evaluate the default against BM25 and
    vector search on the `split` half; with `grid`, the tuning grid instead (on the tuning
    half: tuning on the held-out half would make its figures worthless), its report holding
    the variant the rule chooses as `chosen`."""
    from headwater.settings import get_settings

    if grid and split != "tune":
        raise HeadwaterError(f"the grid is tuned on the tuning half, not on {split!r}: "
                             "use --split tune")
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
    from tasks.evaluate import choose_tuned

    state = sync_source(SOURCE, return_state=True)
    if not state.is_completed():
        raise HeadwaterError(f"the sync of the benchmark pages failed: {state.message}")
    report = evaluate_retrieval(str(prepared["dataset"]),
                                grid_variants() if grid else VARIANTS, [], split)
    extra = {"chosen": choose_tuned(report, grid_names())} if grid else {}
    return {**report, **extra, "pages": prepared["pages"], "sync": state.result()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--html-dir", type=Path, default=DOCS)
    parser.add_argument("--subset", default="library",
                        help="pages under this folder (library, reference, howto) or 'all'")
    parser.add_argument("--pages", type=int, default=0,
                        help="at most this many pages, chosen with the seed (0: every page)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--split", choices=["tune", "test", "all"], default="test")
    parser.add_argument("--grid", action="store_true", help="run the tuning grid (--split tune)")
    args = parser.parse_args()
    from tasks.evaluate import report_markdown

    report = run(args.html_dir, args.subset, args.pages or None, args.queries, args.seed,
                 split=args.split, grid=args.grid)
    print(grid_markdown(report, report["chosen"]) if args.grid else report_markdown(report))


if __name__ == "__main__":
    main()
