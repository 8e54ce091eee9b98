"""The version loraplex reports (Admin's ServerInfo, KServe's ServerMetadata)."""
from __future__ import annotations

import os


def server_version() -> str:
    """The installed distribution's version; $LORAPLEX_VERSION (else "dev") for an uninstalled checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraplex")
    except PackageNotFoundError:
        return os.environ.get("LORAPLEX_VERSION", "dev")
