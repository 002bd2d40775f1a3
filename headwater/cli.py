"""The `headwater` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from headwater import stack
from headwater.errors import HeadwaterError
from headwater.logs import configure_logging
from headwater.settings import get_settings, settings_table

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
sources_app = typer.Typer(no_args_is_help=True, help="The sources declared in headwater.yaml.")
app.add_typer(sources_app, name="sources")
quality_app = typer.Typer(no_args_is_help=True, help="Data quality gates (Great Expectations).")
app.add_typer(quality_app, name="quality")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail.")
app.add_typer(audit_app, name="audit")
eval_app = typer.Typer(no_args_is_help=True, help="Retrieval quality on labelled query sets.")
app.add_typer(eval_app, name="eval")
privacy_app = typer.Typer(no_args_is_help=True,
                          help="Data-subject requests (GDPR/CCPA) and retention purges.")
app.add_typer(privacy_app, name="privacy")


@app.callback()
def _logging() -> None:
    # Before any command runs, so its first line is already in HEADWATER_LOG_FORMAT.
    configure_logging()


def _fail(error: HeadwaterError) -> None:
    typer.echo(f"error: {error.user_message}", err=True)
    if error.log_message != error.user_message:
        typer.echo(error.log_message, err=True)
    raise typer.Exit(1)


def _print_status(statuses: list[stack.ComponentStatus]) -> None:
    typer.echo(f"{'component':<16}{'health':<10}{'pid':<9}{'version':<10}address / log")
    for s in statuses:
        health = "healthy" if s.healthy else ("starting" if s.running else "stopped")
        note = " (started now)" if s.started else ""
        typer.echo(
            f"{s.name:<16}{health:<10}{s.pid or '-':<9}{s.version or '-':<10}{s.address}{note}"
        )
        typer.echo(f"{'':<45}log: {s.log}")


@app.command()
def up() -> None:
    """Bring up the local stack (Weaviate, Prefect server, worker) and wait until it is ready."""
    try:
        statuses = stack.up(get_settings())
    except HeadwaterError as error:
        _fail(error)
    _print_status(statuses)
    if not any(s.started for s in statuses):
        typer.echo("The stack was already running; nothing started.")
    _ensure_local_subject_key()


def _ensure_local_subject_key() -> None:
    """A laptop stack gets a subject key of its own, so policies work out of the box; a real
    deployment sets HEADWATER_SUBJECT_KEY from its secret store instead."""
    import secrets

    settings = get_settings()
    if settings.resolved_subject_key is not None:
        return
    path = settings.subject_key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32) + "\n")
    typer.echo(f"Created a local subject key in {path} (keep it: the subject index made with "
               "one key is not found with another). Production: set HEADWATER_SUBJECT_KEY.")


@app.command()
def down() -> None:
    """Stop what `headwater up` started (by recorded PIDs)."""
    try:
        stopped = stack.down(get_settings())
    except HeadwaterError as error:
        _fail(error)
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status(
    deep: bool = typer.Option(
        False, "--deep", help="Check every dependency, not the local processes: Weaviate and "
        "the schema, the state DB's migrations, the model, Prefect, disk, each source's last "
        "sync. Exit 1 if any check fails (usable as a Kubernetes probe)."),
    timeout: float = typer.Option(20.0, help="Seconds each --deep check may take."),
    min_free_gib: float = typer.Option(1.0, help="Least free disk in the data dir (--deep)."),
) -> None:
    """Print each component, its address, version, health and log file."""
    if deep:
        from headwater.health import deep_checks, render_checks

        checks = deep_checks(get_settings(), timeout, int(min_free_gib * (1 << 30)))
        typer.echo(render_checks(checks))
        if not all(c.ok for c in checks):
            raise typer.Exit(1)
        return
    statuses = stack.status(get_settings())
    _print_status(statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@app.command()
def build(
    promtool: bool = typer.Option(
        False, "--promtool", help="Also build Prometheus's promtool, which checks the alert "
        "rules in deployments/prometheus (the test suite needs it)."),
) -> None:
    """Build the pinned Weaviate server once (`go install`), cached under the cache dir."""
    settings = get_settings()
    try:
        binary = stack.weaviate_binary(settings)
        checker = stack.promtool_binary(settings) if promtool else None
    except HeadwaterError as error:
        _fail(error)
    typer.echo(f"weaviate-server v{settings.weaviate_version}: {binary}")
    if checker is not None:
        typer.echo(f"promtool v{stack.PROMTOOL_VERSION}: {checker}")


@app.command()
def demo() -> None:
    """The main job: bring the stack up and sync the demo corpus into the index."""
    up()
    sync("demo", full=False, allow_mass_delete=False)
    typer.echo(f"\nPrefect UI (run history, artifacts): "
               f"{get_settings().prefect_api_url.removesuffix('/api')}")


@app.command()
def sync(
    source: str = typer.Argument(..., help="A source named in the sources file."),
    full: bool = typer.Option(False, "--full", help="Re-read every document, not only changes."),
    allow_mass_delete: bool = typer.Option(
        False, "--allow-mass-delete", help="Apply deletions even past the source's guard."),
) -> None:
    """Sync one source into the index and print what changed."""
    from flows.sync import sync_source
    from tasks.ingest import summary_markdown

    state = sync_source(source, full, allow_mass_delete, return_state=True)
    if state.is_cancelled():
        typer.echo(f"skipped: {state.message}", err=True)
        raise typer.Exit(2)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        message = error.user_message if isinstance(error, HeadwaterError) else str(error)
        typer.echo(f"error: sync of {source!r} failed: {message}", err=True)
        raise typer.Exit(1)
    typer.echo(summary_markdown(state.result()))


@app.command()
def reindex(
    reason: str = typer.Option("", "--reason", help="Why, for the audit trail."),
    keep_old: bool = typer.Option(
        False, "--keep-old", help="Keep the replaced collection (for a rollback by hand)."),
) -> None:
    """Re-read every source into a new versioned collection, then switch the index alias to it
    in one call; queries go on meanwhile, and on any failure they stay on the old one."""
    from flows.reindex import reindex as reindex_flow

    state = reindex_flow(reason, keep_old, _operator(), return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        message = error.user_message if isinstance(error, HeadwaterError) else str(error)
        typer.echo(f"error: reindex failed: {message}", err=True)
        raise typer.Exit(1)
    result = state.result()
    typer.echo(f"{result['alias']} now points at {result['to']} (was {result['from']}); chunks "
               "per source: " + ", ".join(f"{s} {n}" for s, n in result["chunks"].items()))
    if result["deleted"]:
        typer.echo("deleted: " + ", ".join(result["deleted"]))
    if result.get("message"):
        typer.echo(result["message"], err=True)


@app.command()
def watch(
    source: str | None = typer.Option(None, help="Only this folder source."),
    quiet: float = typer.Option(1.0, help="Seconds a folder must be quiet before a burst of "
                                "changes is recorded."),
) -> None:
    """Watch folder sources and record their changes for the `ingest-changes` deployment."""
    import time

    from headwater.config import load_sources
    from headwater.watch import folder_sources, watch_folders

    settings = get_settings()
    try:
        sources = folder_sources(load_sources(settings.config), source)
        watcher = watch_folders(settings, sources, quiet)
    except HeadwaterError as error:
        _fail(error)
    typer.echo("watching " + ", ".join(f"{s.name} ({watcher.connectors[s.name].root})"
                                       for s in sources) + "; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


@app.command()
def report(
    window: str = typer.Option("24h", "--window", help="How far back: 30m, 24h, 7d."),
) -> None:
    """Summarise requests, latency, errors, quality and the slowest sync stages, with advice."""
    from headwater.report import build_report, parse_window, render_report
    from headwater.state import StateStore

    try:
        span = parse_window(window)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--window") from error
    store = StateStore(get_settings().resolved_state_db_url)
    typer.echo(render_report(build_report(store, span)))


@app.command()
def quarantine(source: str | None = typer.Option(None, help="Only this source.")) -> None:
    """List the documents rejected by syncs, with the stage and the reason."""
    from headwater.state import StateStore

    rows = StateStore(get_settings().resolved_state_db_url).quarantined(source)
    if not rows:
        typer.echo("nothing is quarantined")
        return
    typer.echo(f"{'source':<14}{'document':<40}{'stage':<8}{'tries':<6}{'last seen':<21}reason")
    for r in rows:
        typer.echo(f"{r.source:<14}{r.doc_id:<40}{r.stage:<8}{r.attempts:<6}"
                   f"{r.last_seen:%Y-%m-%d %H:%M:%S}  {r.reason}")


@quality_app.command("report")
def quality_report(
    run: str | None = typer.Option(None, "--run", help="A sync run id (default: the last)."),
    source: str | None = typer.Option(None, help="The last run of this source."),
) -> None:
    """Print every expectation a sync run checked, with what it observed."""
    from headwater.state import StateStore
    from tasks.ingest import quality_markdown

    found = StateStore(get_settings().resolved_state_db_url).finished_run(run, source)
    if found is None:
        typer.echo("no finished sync run" + (f" with id {run}" if run else "")
                   + (f" of {source!r}" if source else ""), err=True)
        raise typer.Exit(1)
    rows = found.summary.get("quality") or []
    failed = [r for r in rows if r["result"] != "pass"]
    typer.echo(f"# Quality of the sync of `{found.source}` ({found.status}), run {found.id}, "
               f"finished {found.finished_at:%Y-%m-%d %H:%M:%S}")
    typer.echo("")
    typer.echo("\n".join(quality_markdown(rows)) if rows else "no batch reached validation")
    typer.echo("")
    typer.echo(f"{len(rows) - len(failed)} of {len(rows)} expectations passed"
               + (f"; data docs: {found.summary['data_docs']}"
                  if found.summary.get("data_docs") else ""))
    if found.summary.get("message"):
        typer.echo(found.summary["message"])


def _operator() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the hash chain; exit 1 naming the first entry that breaks it."""
    from headwater.state import StateStore

    store = StateStore(get_settings().resolved_state_db_url)
    verdict = store.verify_audit()
    store.append_audit(_operator(), "audit.verify", "audit_log",
                       "intact" if verdict.intact else "broken",
                       details={"checked": verdict.checked, "broken_id": verdict.broken_id})
    if not verdict.intact:
        typer.echo(f"audit trail BROKEN at entry {verdict.broken_id}: {verdict.reason}; the "
                   f"{verdict.checked} entries before it are intact", err=True)
        raise typer.Exit(1)
    typer.echo(f"audit trail intact: {verdict.checked} entries, each chained to the one before")


@audit_app.command("export")
def audit_export(
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="A file to write (default: standard output)."),
    since_id: int = typer.Option(0, "--since-id", help="Only entries after this id."),
) -> None:
    """Write the audit trail as JSON lines (one entry per line, oldest first) for a SIEM."""
    import contextlib
    import json

    from headwater.state import StateStore

    store = StateStore(get_settings().resolved_state_db_url)
    written = 0
    with contextlib.ExitStack() as files:
        sink = files.enter_context(Path(output).open("w")) if output else sys.stdout
        for row in store.iter_audit(since_id):
            sink.write(json.dumps({
                "id": row.id, "at": row.at.isoformat() + "Z", "actor": row.actor,
                "action": row.action, "resource": row.resource, "outcome": row.outcome,
                "request_id": row.request_id, "details": row.details,
                "prev_hash": row.prev_hash, "hash": row.hash}, default=str) + "\n")
            written += 1
    store.append_audit(_operator(), "audit.export", str(output or "stdout"), "ok",
                       details={"entries": written, "since_id": since_id})
    if output:
        typer.echo(f"wrote {written} audit entries to {output}")


def _run_request(kind: str, emails: list[str] | None, phones: list[str] | None,
                 names: list[str] | None, requested_by: str, **options: object) -> None:
    """Run the data-subject-request flow here and print its one-screen summary."""
    from pydantic import SecretStr

    from flows.privacy import data_subject_request
    from tasks.privacy import CLI_KINDS, request_markdown

    given = {"email": emails, "phone": phones, "name": names}
    identifiers = {CLI_KINDS[option]: [SecretStr(v) for v in values]
                   for option, values in given.items() if values}
    state = data_subject_request(kind, identifiers, requested_by, return_state=True, **options)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        message = error.user_message if isinstance(error, HeadwaterError) else str(error)
        typer.echo(f"error: the {kind} request failed: {message}", err=True)
        raise typer.Exit(1)
    typer.echo(request_markdown(state.result()))


_EMAIL = typer.Option(None, "--email", help="An e-mail address of the person (repeatable).")
_PHONE = typer.Option(None, "--phone", help="A phone number of the person (repeatable).")
_NAME = typer.Option(None, "--name", help="The person's name (repeatable).")
_BY = typer.Option(..., "--requested-by", help="Who asks (the privacy officer), for the audit.")


@privacy_app.command("access")
def privacy_access(
    email: list[str] | None = _EMAIL, phone: list[str] | None = _PHONE,
    name: list[str] | None = _NAME, requested_by: str = _BY,
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="Write the JSON export here (default: data dir)."),
) -> None:
    """Export every indexed document and chunk that mentions the person, as JSON."""
    _run_request("access", email, phone, name, requested_by, output=output)


@privacy_app.command("export")
def privacy_export(
    email: list[str] | None = _EMAIL, phone: list[str] | None = _PHONE,
    name: list[str] | None = _NAME, requested_by: str = _BY,
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="Write the JSON lines here (default: data dir)."),
) -> None:
    """Portability: the access export as JSON lines (format headwater.portability/1)."""
    _run_request("portability", email, phone, name, requested_by, output=output)


@privacy_app.command("erase")
def privacy_erase(
    email: list[str] | None = _EMAIL, phone: list[str] | None = _PHONE,
    name: list[str] | None = _NAME, requested_by: str = _BY,
    scope: str = typer.Option("chunks", help="chunks: only chunks mentioning the person; "
                              "document: every document that mentions them."),
) -> None:
    """Erase the person from the index and keep them out of every later sync."""
    _run_request("erasure", email, phone, name, requested_by, scope=scope)


@privacy_app.command("rectify")
def privacy_rectify(
    email: list[str] | None = _EMAIL, phone: list[str] | None = _PHONE,
    name: list[str] | None = _NAME, requested_by: str = _BY,
    resync: bool = typer.Option(True, help="Re-sync the affected sources now."),
) -> None:
    """Erase old identifiers, then re-read their documents from the sources (the truth)."""
    _run_request("rectification", email, phone, name, requested_by, resync=resync)


_SOURCES = typer.Option(None, "--source", help="Only this source (repeatable).")


@privacy_app.command("purge")
def privacy_purge(source: list[str] | None = _SOURCES) -> None:
    """Remove documents past their source's `retention:` from the index and the state."""
    from flows.privacy import retention_purge
    from tasks.privacy import retention_markdown

    state = retention_purge(source or None, return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        message = error.user_message if isinstance(error, HeadwaterError) else str(error)
        typer.echo(f"error: the retention purge failed: {message}", err=True)
        raise typer.Exit(1)
    typer.echo(retention_markdown(state.result()))


@app.command()
def api() -> None:
    """Serve the HTTP API (POST /v1/query, /healthz, /readyz, /metrics, /docs)."""
    import uvicorn

    from headwater.api import create_app

    settings = get_settings()
    # uvicorn's loggers go through Headwater's formatter; the API logs each request itself,
    # with its request id, so uvicorn's access lines would only repeat it without one.
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_config=None, log_level="info", access_log=False)


@app.command()
def ask(
    question: str = typer.Argument(..., help="What you want to know."),
    as_user: str | None = typer.Option(None, "--as", help="Ask as this user id."),
    groups: str = typer.Option("", help="Comma-separated groups of that user."),
    top_k: int = typer.Option(5, help="Documents to cite at most."),
    as_json: bool = typer.Option(False, "--json", help="Print the full response as JSON."),
) -> None:
    """Answer a question from the documents the given user may read (public only by default)."""
    from headwater.records import Caller, QueryRequest
    from headwater.state import StateStore
    from tasks.answer import answer_question, generator_for, record_query
    from tasks.embed import query_encoder
    from tasks.index import connect_index

    settings = get_settings()
    caller = Caller(user_id=as_user, groups=[g for g in groups.split(",") if g])
    request = QueryRequest(question=question, top_k=top_k)
    try:
        with connect_index(settings) as client:
            response, trace = answer_question(settings, request, caller, client,
                                              query_encoder(settings.embedding_model),
                                              generator_for(settings))
    except HeadwaterError as error:
        _fail(error)
    record_query(StateStore(settings.resolved_state_db_url), caller, request, response, trace,
                 channel="cli")
    if as_json:
        typer.echo(response.model_dump_json(indent=2))
        return
    typer.echo(response.answer + "\n")
    for source in response.sources:
        typer.echo(f"[{source.n}] {source.title} ({source.source}: {source.doc_id})")
    typer.echo(f"\nanswered by {response.answered_by} in {response.processing_time_ms:.0f} ms")


@sources_app.command("list")
def sources_list() -> None:
    """Each source with its type and schedule."""
    from headwater.config import load_sources

    try:
        found = load_sources(get_settings().config)
    except HeadwaterError as error:
        _fail(error)
    for source in found.values():
        schedule = source.schedule.model_dump(exclude_none=True) if source.schedule else "manual"
        typer.echo(f"{source.name:<20}{source.type:<12}{schedule}")


@sources_app.command("test")
def sources_test(
    name: str = typer.Argument(..., help="A source named in the sources file."),
) -> None:
    """Check that a source can be reached and read; one line says what is wrong if not."""
    from connectors import open_connector
    from headwater.config import source_config

    try:
        check = open_connector(source_config(get_settings().config, name)).test_connection()
    except HeadwaterError as error:
        _fail(error)
    typer.echo(f"{name}: {'ok' if check.ok else 'FAILED'}: {check.message}")
    if not check.ok:
        raise typer.Exit(1)


@app.command()
def deploy(
    check: bool = typer.Option(
        False, "--check", help="Change nothing; exit 1 with a one-line summary if out of date."),
    prefect_file: str = typer.Option(
        "prefect.yaml", "--prefect-file", help="The prefect.yaml to refresh."),
) -> None:
    """Generate prefect.yaml's `sync-<source>` deployments from the sources file."""
    from headwater.deploy import plan

    settings = get_settings()
    try:
        found = plan(Path(prefect_file), settings.config, settings.work_pool)
    except HeadwaterError as error:
        _fail(error)
    if found.up_to_date:
        typer.echo(f"{prefect_file}: up to date with {settings.config}")
        return
    if check:
        typer.echo(f"{prefect_file} is out of date with {settings.config}: {found.summary}; "
                   "run `headwater deploy`", err=True)
        raise typer.Exit(1)
    Path(prefect_file).write_text(found.refreshed)
    typer.echo(f"{prefect_file}: refreshed ({found.summary})")


@app.command()
def config(markdown: bool = typer.Option(False, help="Print the README's table.")) -> None:
    """Show the settings in effect (or, with --markdown, the table of every setting)."""
    if markdown:
        typer.echo(settings_table())
        return
    from headwater.settings import env_value

    for name, value in get_settings().model_dump().items():
        typer.echo(f"HEADWATER_{name.upper()}={env_value(value)}")


def _evaluation_failed(state: object) -> None:
    error = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
    if isinstance(error, HeadwaterError):
        _fail(error)
    typer.echo(f"error: the evaluation failed: {error}", err=True)
    raise typer.Exit(1)


@eval_app.command("run")
def eval_run(
    dataset: str = typer.Option(..., "--dataset", help="A query set: JSON lines of "
                                '{"query", "relevant": (ids or urls), "grades"?, "id"?}.'),
    variant: Annotated[list[str] | None, typer.Option(
        "--variant", help="Repeatable; the first is the A/B baseline. A preset (default, "
        "bm25, vector, mmr) or name:key=value,... with alpha, top_k, mmr, "
        "max_chunks_per_doc, collection, fusion, query_properties (joined by +), e.g. "
        "top1:top_k=1 or ranked:fusion=rankedFusion,query_properties=text+title^3.")] = None,
    principal: Annotated[list[str] | None, typer.Option(
        "--principal", help="Repeatable: ask as user:<id> / group:<id> (default: public "
        "documents only).")] = None,
    split: str = typer.Option("all", "--split", help="tune, test (the halves a seeded hash "
                              "of each query's id puts it in) or all."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Score retrieval variants on a query set; results are stored to compare over time."""
    import json

    from flows.evaluate import evaluate_retrieval
    from headwater.records import Caller
    from tasks.evaluate import SPLITS, parse_variant, report_markdown

    variant, principal = variant or ["default"], principal or []
    try:
        for spec in variant:
            parse_variant(spec)
        Caller.from_principals(principal)
    except HeadwaterError as error:
        _fail(error)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--principal") from error
    if split not in SPLITS:
        raise typer.BadParameter(f"use one of {', '.join(SPLITS)}", param_hint="--split")
    state = evaluate_retrieval(dataset, variant, principal, split, return_state=True)
    if not state.is_completed():
        _evaluation_failed(state)
    report = state.result()
    typer.echo(json.dumps(report, indent=2) if as_json else report_markdown(report))


@eval_app.command("python-docs")
def eval_python_docs(
    html_dir: str = typer.Option("/usr/share/doc/python3.11/html", "--html-dir",
                                 help="Python's HTML docs (Debian: python3.11-doc)."),
    subset: str = typer.Option("library", "--subset",
                               help="Pages under this folder (library, reference, ...) or all."),
    pages: int = typer.Option(0, "--pages", help="At most this many pages, chosen with the "
                              "seed (0: every page of the subset)."),
    queries: int = typer.Option(1000, "--queries", help="Index terms sampled as queries."),
    seed: int = typer.Option(7, "--seed"),
    split: str = typer.Option("test", "--split", help="The held-out half (test), the tuning "
                              "half (tune) or all queries."),
    grid: bool = typer.Option(False, "--grid", help="Run the tuning grid (alpha, fusion, "
                              "BM25 properties) on --split tune and name the variant the rule "
                              "chooses."),
) -> None:
    """The public benchmark: sync Python's docs, ask their index terms, compare BM25, vector
    and hybrid retrieval. Installs nothing: the docs must be there."""
    import importlib.util

    from headwater.settings import PROJECT_ROOT
    from tasks.evaluate import SPLITS, report_markdown

    if split not in SPLITS:  # before a sync of many minutes, not after
        raise typer.BadParameter(f"use one of {', '.join(SPLITS)}", param_hint="--split")
    # bench/ holds scripts, not an installed package.
    spec = importlib.util.spec_from_file_location("python_docs",
                                                  PROJECT_ROOT / "bench" / "python_docs.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    try:
        report = bench.run(Path(html_dir), subset, pages or None, queries, seed, split=split,
                           grid=grid)
    except HeadwaterError as error:
        _fail(error)
    typer.echo(f"{report['pages']} pages, {report['sync']['chunks_written']} chunks written "
               f"by this run's sync\n")
    typer.echo(bench.grid_markdown(report, report["chosen"]) if grid
               else report_markdown(report))


@eval_app.command("history")
def eval_history(
    dataset: str | None = typer.Option(None, "--dataset", help="Only runs on this query set "
                                       "(as it is now)."),
    variant: str | None = typer.Option(None, "--variant", help="Only this variant."),
    limit: int = typer.Option(20, "--limit"),
) -> None:
    """Stored evaluations, newest first, to follow a variant's metrics over time."""
    from headwater.state import StateStore
    from tasks.evaluate import METRICS, fingerprint, load_query_set

    try:
        found = fingerprint(load_query_set(dataset)) if dataset else None
    except HeadwaterError as error:
        _fail(error)
    runs = StateStore(get_settings().resolved_state_db_url).evaluation_runs(found, variant,
                                                                             limit)
    typer.echo(f"{'when':<20}{'run':<38}{'variant':<16}{'set':<14}"
               + "".join(f"{m:<11}" for m in METRICS) + "p95 ms")
    for r in runs:
        typer.echo(f"{r.at:%Y-%m-%d %H:%M}    {r.run_id:<38}{r.variant[:15]:<16}"
                   f"{r.dataset_fingerprint[:12]:<14}"
                   + "".join(f"{r.metrics.get(m, 0):<11}" for m in METRICS)
                   + str(r.metrics.get("latency_p95_ms", "-")))


if __name__ == "__main__":
    sys.exit(app())
