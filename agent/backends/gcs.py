"""gs://bucket/prefix: Google Cloud Storage (service-account key, or application default
credentials)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult

from obstore.store import GCSStore, ObjectStore

from agent.backends.objstore import ObstoreBackend, open_cloud
from agent.backends.secrets import read_secret
from agent.backends.service import Secrets, Service
from agent.backends.urls import check_cloud_url
from agent.config.settings import BackendSettings, SecretRef, ServiceSettings
from agent.config.table import Table

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig


@dataclass(frozen=True)
class GcsSettings(ServiceSettings):
    service_account_key: SecretRef | None = None  # None: application default credentials

    def secrets(self) -> dict[str, SecretRef | None]:
        return {"service_account_key": self.service_account_key}


def _read(t: Table, secrets: Secrets) -> GcsSettings:
    return GcsSettings(service_account_key=secrets["service_account_key"])


def _store(s: BackendSettings, bucket: str, env: Mapping[str, str], client: ClientConfig,
           retry: RetryConfig) -> tuple[ObjectStore, str]:
    opts = s.service if isinstance(s.service, GcsSettings) else GcsSettings()
    kw: dict[str, Any] = {}
    if s.endpoint:
        kw["base_url"] = s.endpoint
    if opts.service_account_key is not None:
        kw["service_account_key"] = read_secret(opts.service_account_key, env,
                                                "backend service account key")
        creds = f"service account key from {opts.service_account_key.describe()}"
    else:
        creds = "Google application default credentials"
    store = GCSStore(bucket, client_options=client, retry_config=retry, **kw)
    return store, creds


def _open(settings: BackendSettings, parts: SplitResult,
          environ: Mapping[str, str]) -> ObstoreBackend:
    return open_cloud(settings, parts, environ, _store, "bucket")


def _probe_target(settings: BackendSettings) -> str | None:
    return settings.endpoint or "https://storage.googleapis.com/"


def _secret_problem(name: str, key: str, ref: SecretRef, value: str) -> str | None:
    try:
        json.loads(value)
    except ValueError:
        return (f"{key}: is not a JSON service-account key (got {ref.describe()}, content "
                "not shown); download the key file from the Google Cloud console")
    return None


SERVICE = Service(
    scheme="gs", example="gs://bucket/prefix", aliases=("gcs",),
    check_url=check_cloud_url, open=_open, probe_target=_probe_target,
    keys=("service_account_key_file", "service_account_key_env"),
    secrets=("service_account_key",), read=_read, secret_problem=_secret_problem,
)
