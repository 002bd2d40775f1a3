"""Thin Prefect flows that only compose the stages in `tasks/`."""

# Imported first so Prefect, which reads its settings once at import, finds the stack's API.
import headwater  # noqa: F401
