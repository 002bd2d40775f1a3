"""Structured logs: one JSON object (or one readable line) per event, with the ids in context."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, unbind_contextvars

from headwater.settings import get_settings

__all__ = ["bind_contextvars", "bound_contextvars", "configure_logging",
           "configure_process_logging", "get_logger", "resolved_format", "unbind_contextvars"]

# Headwater's own packages log at HEADWATER_LOG_LEVEL; libraries keep their own levels.
OWN_PACKAGES = ("headwater", "tasks", "flows", "connectors")

def _prefect_flow_run(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The Prefect flow run a line was written in, wherever its task ran (a Dask worker gets
    Prefect's run context, not the flow's bound ids)."""
    if "flow_run_id" not in event and "prefect.context" in sys.modules:
        from prefect.context import FlowRunContext, TaskRunContext

        if (flow := FlowRunContext.get()) is not None:
            event["flow_run_id"] = str(flow.flow_run.id)
        elif (task := TaskRunContext.get()) is not None and task.task_run.flow_run_id:
            event["flow_run_id"] = str(task.task_run.flow_run_id)
    return event


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    _prefect_flow_run,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]

structlog.configure(
    processors=[
        *_SHARED,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
        # stdlib handlers render the event, so Headwater's lines and every library's look alike.
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines carry whatever ids are bound in the current context."""
    return structlog.stdlib.get_logger(name)


def resolved_format(log_format: str, stream: TextIO | None = None) -> str:
    """`auto` means console lines for a person at a terminal, JSON lines for a collector."""
    if log_format != "auto":
        return log_format
    target = stream or sys.stderr
    return "console" if getattr(target, "isatty", lambda: False)() else "json"


def _drop_noise(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # uvicorn repeats its message with ANSI colours; the stdlib call's positional args are
    # already in the message.
    for key in ("color_message", "positional_args"):
        event.pop(key, None)
    return event


def _formatter(renderer: Any, exceptions: bool = True) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_noise,
            *([structlog.processors.format_exc_info] if exceptions else []),
            renderer,
        ],
    )


class HeadwaterLogHandler(logging.StreamHandler):
    """Writes rendered lines to the given stream, or to whatever sys.stderr is when a line is
    written (test runners swap it)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        logging.Handler.__init__(self)
        self._target = stream

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return self._target or sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._target = value


class PrefectRunForwarder(logging.Handler):
    """Sends Headwater's own lines written inside a Prefect flow or task run to the Prefect
    API too, so the run's page in the UI shows them with their ids."""

    def __init__(self) -> None:
        super().__init__()
        self._api: logging.Handler | None = None
        # The UI shows time and level in columns of its own.
        self.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _drop_noise,
                        _without("timestamp", "level", "logger"),
                        structlog.dev.ConsoleRenderer(
                            colors=False, pad_event_to=0,
                            exception_formatter=structlog.dev.plain_traceback)],
        ))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] not in OWN_PACKAGES or "prefect.context" not in sys.modules:
            return False  # Prefect's run loggers send their own lines; the API has no runs
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None

    def emit(self, record: logging.LogRecord) -> None:
        if self._api is None:
            from prefect.logging.handlers import APILogHandler

            self._api = APILogHandler()
            self._api.setFormatter(self.formatter)
        self._api.handle(record)


def _without(*keys: str) -> Any:
    def drop(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key in keys:
            event.pop(key, None)
        return event
    return drop


def _is_prefect_console(handler: logging.Handler) -> bool:
    kind = type(handler)
    return kind.__module__ == "prefect.logging.handlers" and kind.__name__ in (
        "PrefectConsoleHandler", "_SafeStreamHandler")


def _ours(handler: logging.Handler) -> bool:
    return isinstance(handler, HeadwaterLogHandler | PrefectRunForwarder)


def configure_logging(log_format: str | None = None, level: str | None = None,
                      stream: TextIO | None = None) -> None:
    """Route every logger (Headwater's, Prefect's, uvicorn's) through one formatter.

    Safe to call again: a later call replaces what an earlier one installed, and also takes
    over console handlers Prefect installed since (Prefect sets up logging when imported).
    """
    settings = get_settings()
    chosen = resolved_format(log_format or settings.log_format, stream)
    target = stream or sys.stderr
    # Plain tracebacks: a rich one would print local variables, and with them secrets or PII.
    renderer = (structlog.processors.JSONRenderer() if chosen == "json"
                else structlog.dev.ConsoleRenderer(
                    colors=getattr(target, "isatty", lambda: False)(),
                    exception_formatter=structlog.dev.plain_traceback))
    console = HeadwaterLogHandler(stream)
    console.setFormatter(_formatter(renderer, exceptions=chosen == "json"))

    loggers = [logging.getLogger(), *(
        item for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if _ours(handler) or _is_prefect_console(handler):
                logger.removeHandler(handler)
                if not isinstance(handler, PrefectRunForwarder):
                    logger.addHandler(console)  # a logger that does not propagate keeps one
    root = logging.getLogger()
    root.addHandler(console)
    root.addHandler(PrefectRunForwarder())
    for name in OWN_PACKAGES:
        logging.getLogger(name).setLevel((level or settings.log_level).upper())
    # Python's warnings become log lines too, so a JSON stream stays JSON.
    logging.captureWarnings(chosen == "json")
    if chosen == "json":
        # Progress bars (loading the model's weights) are not log lines; both libraries read
        # these when imported, so set them before the model is loaded.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()


_process_configured: int | None = None


def configure_process_logging() -> None:
    """`configure_logging` once in this process: for processes Headwater does not start itself
    (Dask workers receiving a sync's batches), where nothing else would set logging up."""
    global _process_configured
    if _process_configured != os.getpid():
        configure_logging()
        _process_configured = os.getpid()
