"""The [backend] table: which object store, where, and with which credentials.

The keys every service shares are read here; each service module reads its own (the registry
says which exist). Read through agent.config.table so problems are reported like every other
section's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.backends.registry import alias_of, service_for, services, url_forms
from agent.backends.service import Service
from agent.backends.urls import split_url
from agent.config.settings import BackendSettings, ServiceSettings
from agent.config.table import Table, boolean, read_toml, secret
from agent.errors import ConfigError

BACKEND_COMMON_KEYS = ("url", "endpoint", "allow_http", "connect_timeout", "timeout", "min_rate")


def backend_keys() -> tuple[str, ...]:
    """Every key a [backend] table may hold (secrets as <name>_file and <name>_env)."""
    return BACKEND_COMMON_KEYS + tuple(k for s in services() for k in s.keys)


def inline_secrets() -> tuple[str, ...]:
    """Written inline, these would sit in a world-readable file, in backups and in support
    bundles: the config names where a secret is, never the secret."""
    return tuple(name for s in services() for name in s.secrets)


def read_backend(t: Table, base: Path) -> BackendSettings:
    for name in inline_secrets():
        if t.has(name):
            # Not t.report: that would echo the secret into logs and terminals.
            t.problems.append(
                f"{t.key(name)}: secrets are not accepted inline in the config file (got a "
                f"value, not shown); put it in a file only skyferry can read and set "
                f'{name}_file = "/etc/skyferry/{name}", or name an environment variable with '
                f'{name}_env = "VARIABLE"'
            )
    t.reject_unknown(backend_keys() + inline_secrets())
    t.require("url", 'url = "file:///var/lib/skyferry-cloud"')
    url = t.string("url", None)
    chosen = _check_backend_url(t, url) if url is not None else None
    if chosen is not None:
        for other in services():
            for name in other.keys if other is not chosen else ():
                if t.has(name):
                    t.report(name, f"applies to {other.scheme}:// backends only",
                             f"remove it, or change url (it is {chosen.scheme}://)")
    common = _read_common(t)
    secrets = {name: secret(t, name, base) for name in inline_secrets()}
    own: ServiceSettings = ServiceSettings()
    for service in services():
        read = service.read(t, secrets)
        if service is chosen:
            own = read
    if chosen is not None:
        chosen.check_credentials(t, own)
    return replace(common, url=url or "", service=own)


def _read_common(t: Table) -> BackendSettings:
    """The keys every service shares (url and the service's own come later)."""
    defaults = BackendSettings(url="")
    endpoint = _endpoint(t)
    allow_http = boolean(t, "allow_http", False)
    if endpoint and endpoint.startswith("http://") and not allow_http:
        t.report("endpoint", "is plain http:// but allow_http is false",
                 "use https://, or set allow_http = true (test setups and emulators only)")
    connect_timeout = t.duration("connect_timeout", defaults.connect_timeout_s)
    t.positive("connect_timeout", connect_timeout, 'give a duration such as "10s"')
    timeout = t.duration("timeout", defaults.timeout_s)
    t.positive("timeout", timeout, 'give a duration such as "30s"')
    min_rate = t.rate("min_rate", defaults.min_rate_bps)
    t.positive("min_rate", min_rate, 'give a rate such as "64kbit/s"')
    return BackendSettings(url="", endpoint=endpoint, allow_http=allow_http,
                           connect_timeout_s=connect_timeout, timeout_s=timeout,
                           min_rate_bps=min_rate)


def _endpoint(t: Table) -> str | None:
    endpoint = t.string("endpoint", None)
    if endpoint is None:
        return None
    parts = split_url(endpoint)
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        t.report("endpoint", "is not an http(s) URL",
                 'write the service URL, e.g. "https://s3.eu-central-1.example.net"')
        return None
    return endpoint.rstrip("/")


def _check_backend_url(t: Table, url: str) -> Service | None:
    """Check the URL's form; return its service when usable."""
    parts = split_url(url)
    if parts is None:
        t.report("url", "is not a URL (an unbalanced [ or ])", f"use {url_forms()}")
        return None
    scheme = parts.scheme.lower()
    alias = alias_of(scheme)
    if alias is not None:
        t.report("url", f"{scheme}:// is not a scheme skyferry reads", f"write {alias.example}")
        return None
    service = service_for(scheme)
    if service is None:
        t.report("url", "is not a backend URL", f"use {url_forms()}")
        return None
    return service if service.check_url(t, parts) else None


def load_backend_settings(path: Path, url: str | None = None) -> BackendSettings:
    """Only the [backend] table of a config file (for restore and verify); `url` overrides."""
    data = read_toml(path)
    table = data.get("backend", {})
    problems: list[str] = []
    if not isinstance(table, dict):
        problems.append("backend: must be a table (got a value); write it as a [backend] section")
        table = {}
    if url is not None:
        table = {**table, "url": url}
    settings = read_backend(Table(table, "backend", problems), path.absolute().parent)
    if problems:
        raise ConfigError(problems, str(path))
    return settings
