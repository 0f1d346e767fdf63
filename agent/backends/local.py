"""file:///path: a folder on this machine (a mounted share, a test cloud)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, unquote

from agent.backends.folder import FolderBackend
from agent.backends.service import Service
from agent.config.settings import BackendSettings
from agent.config.table import Table
from agent.errors import PermanentBackendError


def _check_url(t: Table, parts: SplitResult) -> bool:
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        t.report("url", "a relative file: path is not allowed",
                 "write an absolute path after three slashes, e.g. file:///srv/cloud")
        return False
    return True


def _open(settings: BackendSettings, parts: SplitResult,
          environ: Mapping[str, str]) -> FolderBackend:
    url = settings.url
    if parts.netloc not in ("", "localhost"):
        raise PermanentBackendError(f"{url}: file URLs take an absolute path: file:///path",
                                    "config")
    root = Path(unquote(parts.path))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermanentBackendError(f"{url}: cannot create {root}: {e.strerror}",
                                    "config") from None
    return FolderBackend(root, url)


def _probe_target(settings: BackendSettings) -> str | None:
    return settings.url  # the folder itself: a mounted share that is gone means no link


SERVICE = Service(scheme="file", example="file:///path", check_url=_check_url, open=_open,
                  probe_target=_probe_target)
