"""Headwater: a permission-aware, compliance-checked RAG index over enterprise sources."""

import os

# Models come from installed packages only; nothing may be fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Presidio's e-mail recognizer asks tldextract for the public suffix list: use the snapshot
# bundled with tldextract instead of downloading it (an empty URL list disables fetching).
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")


def _point_prefect_at_the_stack() -> None:
    # Prefect reads its settings once, at import: flows run from here must reach the stack's
    # server (not a throwaway ephemeral one) unless the user chose another API.
    from headwater.settings import get_settings

    os.environ.setdefault("PREFECT_API_URL", get_settings().prefect_api_url)


_point_prefect_at_the_stack()
