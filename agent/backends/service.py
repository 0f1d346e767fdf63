"""What a storage service module (agent/backends/<service>.py) gives the registry.

A service owns its URL scheme, its [backend] keys and their credential rules, how a `Backend`
is opened for it, and what the link monitor probes for it. Everything shared (the obstore
adapter, error mapping, retries, the [backend] keys every service has) lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult

from agent.backends.protocol import Backend
from agent.config.settings import BackendSettings, SecretRef, ServiceSettings
from agent.config.table import Table

Secrets = Mapping[str, SecretRef | None]


def _no_keys(t: Table, secrets: Secrets) -> ServiceSettings:
    return ServiceSettings()


def _no_rules(t: Table, settings: ServiceSettings) -> None:
    return None


def _form_unchecked(name: str, key: str, ref: SecretRef, value: str) -> str | None:
    return None


def _no_environment(settings: BackendSettings, environ: Mapping[str, str]) -> list[str]:
    return []


@dataclass(frozen=True)
class Service:
    scheme: str
    example: str  # the URL's form as messages show it: "s3://bucket/prefix"
    # Checks the URL's form (reporting to the table); True when usable.
    check_url: Callable[[Table, SplitResult], bool]
    # Opens the backend the settings name; secrets are read here, from `environ`.
    open: Callable[[BackendSettings, SplitResult, Mapping[str, str]], Backend]
    # What the link monitor's `probe = "auto"` probes; None when nothing sensible.
    probe_target: Callable[[BackendSettings], str | None]
    aliases: tuple[str, ...] = ()  # schemes written by habit (wasb, s3a): refused with a hint
    keys: tuple[str, ...] = ()  # the [backend] keys only this service reads
    secrets: tuple[str, ...] = ()  # secrets, each written as <name>_file or <name>_env
    # Reads the service's keys (secrets already read, by name) into its settings.
    read: Callable[[Table, Secrets], ServiceSettings] = _no_keys
    # Which keys go together (one credential, a key id with its secret): checked when chosen.
    check_credentials: Callable[[Table, ServiceSettings], None] = _no_rules
    # A secret's form, checked offline by check-config: a problem line, or None.
    secret_problem: Callable[[str, str, SecretRef, str], str | None] = _form_unchecked
    # Settings that name environment variables not set in `environ`: problem lines.
    environment_problems: Callable[[BackendSettings, Mapping[str, str]], list[str]] = (
        _no_environment)
