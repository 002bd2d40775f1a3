"""Headwater's exception tree: each error carries a message for the user and one for the log."""

from __future__ import annotations


class HeadwaterError(Exception):
    """Base of every error Headwater raises on purpose."""

    def __init__(self, user_message: str, log_message: str | None = None) -> None:
        super().__init__(user_message)
        self.user_message = user_message
        self.log_message = log_message or user_message


class StackError(HeadwaterError):
    """A local server could not be built, started, reached or stopped."""


class SourceError(HeadwaterError):
    """A source system refused, failed or returned something unusable."""


class ComplianceError(HeadwaterError):
    """A document could not be processed under its compliance policy."""


class QualityGateFailed(HeadwaterError):
    """A batch broke a data-quality threshold; nothing was written."""


class IndexWriteError(HeadwaterError):
    """Weaviate rejected or could not be reached for a write."""

    def __init__(
        self,
        user_message: str,
        log_message: str | None = None,
        failed_objects: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(user_message, log_message)
        self.failed_objects = failed_objects or []


class IndexUnavailable(HeadwaterError):
    """Weaviate could not be reached or did not answer in time."""


class TransientError(HeadwaterError):
    """A failure that may pass on its own: a timeout, a throttled or restarting server."""


# Error handling as data: which failures a task retry may cure.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    IndexUnavailable,
    ConnectionError,
    TimeoutError,
)


def is_transient(error: BaseException | None) -> bool:
    return isinstance(error, TRANSIENT_ERRORS)


def retry_transient(task: object, task_run: object, state: object) -> bool:
    """A Prefect `retry_condition_fn`: retry a task only when it failed transiently."""
    try:
        error = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
    except Exception as unreadable:  # a result that cannot be read is not worth retrying
        error = unreadable
    return is_transient(error)
