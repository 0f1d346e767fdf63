"""Which services the agent can store to: one line per service module.

A service module (agent/backends/<service>.py) defines `SERVICE`, a `Service`: its scheme, its
[backend] keys and credential rules, how it opens and what the link monitor probes for it.
Adding a service is writing that module and adding its line to SERVICE_MODULES.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from functools import cache
from urllib.parse import urlsplit

from agent.backends.protocol import Backend
from agent.backends.service import Service
from agent.config.settings import BackendSettings
from agent.errors import PermanentBackendError

# In the order messages list them.
SERVICE_MODULES = (
    "agent.backends.local",
    "agent.backends.azure",
    "agent.backends.s3",
    "agent.backends.gcs",
)


@cache
def services() -> tuple[Service, ...]:
    found: list[Service] = []
    for name in SERVICE_MODULES:
        service = getattr(importlib.import_module(name), "SERVICE", None)
        if not isinstance(service, Service):
            raise TypeError(f"{name} defines no SERVICE (a agent.backends.service.Service)")
        found.append(service)
    return tuple(found)


def service_for(scheme: str) -> Service | None:
    """The service reading `scheme` (any case); None when no service does."""
    scheme = scheme.lower()
    return next((s for s in services() if s.scheme == scheme), None)


def alias_of(scheme: str) -> Service | None:
    """The service `scheme` is another name for (wasb: azure); None when it is none."""
    scheme = scheme.lower()
    return next((s for s in services() if scheme in s.aliases), None)


def url_forms() -> str:
    """"file:///path, azure://container/prefix or ...": the URLs the agent takes."""
    forms = [s.example for s in services()]
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"


def open_backend(spec: str | BackendSettings, env: Mapping[str, str] | None = None) -> Backend:
    """Build the backend a URL (plus [backend] settings) names; secrets are read here.

    `env` is the environment `*_env` keys are looked up in (default: this process's).
    """
    settings = BackendSettings(url=spec) if isinstance(spec, str) else spec
    environ: Mapping[str, str] = os.environ if env is None else env
    try:
        parts = urlsplit(settings.url)
    except ValueError as e:  # an unbalanced [ or ]
        raise PermanentBackendError(
            f"{settings.url}: not a URL ({e}); use {url_forms()}", "config") from None
    service = service_for(parts.scheme)
    if service is None:
        raise PermanentBackendError(
            f"{settings.url}: unsupported backend scheme {parts.scheme!r}; use {url_forms()}",
            "config")
    return service.open(settings, parts, environ)


def probe_target(settings: BackendSettings) -> str | None:
    """What the link monitor's `probe = "auto"` probes for this backend; None: nothing sensible."""
    try:
        service = service_for(urlsplit(settings.url).scheme)
    except ValueError:
        return None
    return service.probe_target(settings) if service is not None else None
