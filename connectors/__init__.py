"""Source connectors, one module per source system, all behind `connectors.base.Connector`."""

from __future__ import annotations

from connectors.base import Connector
from headwater.config import ConfigError, SourceConfig


def open_connector(config: SourceConfig) -> Connector:
    """The connector for a configured source."""
    from connectors.confluence import ConfluenceConnector
    from connectors.database import DatabaseConnector
    from connectors.filesystem import FolderConnector
    from connectors.s3 import S3Connector
    from connectors.sharepoint import SharePointConnector

    kinds: dict[str, type] = {"folder": FolderConnector, "s3": S3Connector,
                              "database": DatabaseConnector,
                              "sharepoint": SharePointConnector,
                              "confluence": ConfluenceConnector}
    if config.type not in kinds:
        raise ConfigError(
            f"source {config.name!r} has unknown type {config.type!r}; known: {sorted(kinds)}"
        )
    return kinds[config.type](config)
