"""azure://container/prefix: Azure Blob Storage (account key, SAS token, connection string,
or Azure default credentials)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult

from obstore.store import AzureStore, ObjectStore

from agent.backends.failures import Failures
from agent.backends.objstore import ObstoreBackend, open_cloud
from agent.backends.secrets import read_secret
from agent.backends.service import Secrets, Service
from agent.backends.urls import check_cloud_url
from agent.config.settings import BackendSettings, SecretRef, ServiceSettings
from agent.config.table import Table
from agent.errors import PermanentBackendError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

    from agent.backends.azure_blocks import AzureBlocks

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")  # the emulator's published development key, not a secret
CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
CREDENTIALS = ("account_key", "sas_token", "connection_string")


@dataclass(frozen=True)
class AzureSettings(ServiceSettings):
    account: str | None = None  # the storage account's name (not secret)
    # One of these, or Azure default credentials.
    account_key: SecretRef | None = None
    sas_token: SecretRef | None = None
    connection_string: SecretRef | None = None

    def secrets(self) -> dict[str, SecretRef | None]:
        return {name: getattr(self, name) for name in CREDENTIALS}


def _read(t: Table, secrets: Secrets) -> AzureSettings:
    return AzureSettings(account=t.string("account", None), account_key=secrets["account_key"],
                         sas_token=secrets["sas_token"],
                         connection_string=secrets["connection_string"])


def _check_credentials(t: Table, settings: ServiceSettings) -> None:
    secrets = settings.secrets()
    kinds = [n for n in CREDENTIALS if secrets[n]]
    if len(kinds) > 1:
        t.report(f"{kinds[1]}_{secrets[kinds[1]].source}",  # type: ignore[union-attr]
                 f"conflicts with {kinds[0]}",
                 "give one credential: an account key, a SAS token or a connection string")
    if not t.has("account") and not secrets["connection_string"]:
        t.require("account", 'account = "mystorageaccount" (the storage account name)')


def _container_problem(scheme: str, name: str) -> tuple[str, str] | None:
    if CONTAINER_RE.fullmatch(name) is None:
        return ("does not name a valid Azure container",
                "write azure://container/prefix; container names are 3-63 of a-z, 0-9 and "
                "single '-'")
    return None


def _check_url(t: Table, parts: SplitResult) -> bool:
    return check_cloud_url(t, parts, _container_problem)


def parse_connection_string(text: str) -> dict[str, str]:
    """Azure `Key=Value;...` connection strings (values may contain '=')."""
    out: dict[str, str] = {}
    for part in text.strip().split(";"):
        if part.strip():
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"connection string part {name.strip()!r} has no '='")
            out[name.strip()] = value.strip()
    return out


def _from_connection_string(s: BackendSettings, ref: SecretRef, env: Mapping[str, str],
                            account: str | None,
                            kw: dict[str, Any]) -> tuple[str | None, str | None]:
    """Fills `kw` from the connection string; returns (account, endpoint)."""
    creds = f"connection string from {ref.describe()}"
    try:
        parts = parse_connection_string(read_secret(ref, env, "backend connection string"))
    except ValueError as e:
        raise PermanentBackendError(f"{s.url}: {creds}: {e}", "config") from None
    if parts.get("UseDevelopmentStorage", "").lower() == "true":
        parts = {"AccountName": AZURITE_ACCOUNT, "AccountKey": AZURITE_KEY,
                 "BlobEndpoint": f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}"}
    account = account or parts.get("AccountName")
    if "AccountKey" in parts:
        kw["account_key"] = parts["AccountKey"]
    if "SharedAccessSignature" in parts:
        kw["sas_key"] = parts["SharedAccessSignature"].lstrip("?")
    endpoint = s.endpoint
    if endpoint is None and "BlobEndpoint" in parts:
        endpoint = parts["BlobEndpoint"].rstrip("/")
    elif endpoint is None and "EndpointSuffix" in parts and account:
        proto = parts.get("DefaultEndpointsProtocol", "https")
        endpoint = f"{proto}://{account}.blob.{parts['EndpointSuffix']}"
    return account, endpoint


@dataclass(frozen=True)
class _Access:
    """Where and as whom: what obstore and the Azure SDK are both built from."""

    account: str
    endpoint: str | None
    kw: dict[str, Any]  # obstore's credential arguments
    creds: str  # where the credentials came from, for messages
    allow_http: bool  # a connection string asked for http


def _access(s: BackendSettings, env: Mapping[str, str]) -> _Access:
    opts = s.service if isinstance(s.service, AzureSettings) else AzureSettings()
    kw: dict[str, Any] = {}
    account, endpoint = opts.account, s.endpoint
    allow_http = False
    if opts.connection_string is not None:
        creds = f"connection string from {opts.connection_string.describe()}"
        account, endpoint = _from_connection_string(s, opts.connection_string, env, account, kw)
        allow_http = bool(endpoint and endpoint.startswith("http://"))
    elif opts.account_key is not None:
        creds = f"account key from {opts.account_key.describe()}"
        kw["account_key"] = read_secret(opts.account_key, env, "backend account key")
    elif opts.sas_token is not None:
        creds = f"SAS token from {opts.sas_token.describe()}"
        kw["sas_key"] = read_secret(opts.sas_token, env, "backend SAS token").lstrip("?")
    else:
        creds = "Azure default credentials (AZURE_* environment, managed identity)"
    if not account:
        raise PermanentBackendError(
            f"{s.url}: no storage account name; set [backend] account", "config")
    return _Access(account, endpoint, kw, creds, allow_http)


def _store(s: BackendSettings, container: str, env: Mapping[str, str], client: ClientConfig,
           retry: RetryConfig) -> tuple[ObjectStore, str]:
    a = _access(s, env)
    kw = dict(a.kw)
    if a.allow_http:
        client = {**client, "allow_http": True}  # the connection string asked for it
    if a.endpoint is not None:
        # Not use_emulator=True: obstore then ignores `endpoint` and dials port 10000.
        kw["endpoint"] = a.endpoint
    store = AzureStore(container, account_name=a.account, client_options=client,
                       retry_config=retry, **kw)
    return store, a.creds


def _blocks(settings: BackendSettings, container: str, env: Mapping[str, str],
            backend: ObstoreBackend) -> AzureBlocks | None:
    """Resumable block uploads through the Azure SDK, for an account key or SAS token (the
    default credential chain would need azure-identity: those chunks go in one request)."""
    a = _access(settings, env)
    credential: Any
    if "account_key" in a.kw:
        credential = {"account_name": a.account, "account_key": a.kw["account_key"]}
    elif "sas_key" in a.kw:
        credential = a.kw["sas_key"]
    else:
        return None
    # The SDK (and aiohttp) is loaded only for a backend that uses it: not by every CLI run
    # that imports the registry (0.37 s of imports).
    from agent.backends.azure_blocks import BLOCK_SIZE, AzureBlocks

    url = a.endpoint or f"https://{a.account}.blob.core.windows.net"
    failures = Failures(settings.url, backend.where, backend.credentials)
    # A renewed client's requests may run as long as the deadline of a block's upload.
    grace_s = settings.timeout_s + BLOCK_SIZE / settings.min_rate_bps
    return AzureBlocks(url, container, credential, failures, settings.connect_timeout_s,
                       settings.timeout_s, grace_s)


def _open(settings: BackendSettings, parts: SplitResult,
          environ: Mapping[str, str]) -> ObstoreBackend:
    backend = open_cloud(settings, parts, environ, _store, "container")
    backend.resumable = _blocks(settings, parts.netloc, environ, backend)
    return backend


def _probe_target(settings: BackendSettings) -> str | None:
    if settings.endpoint:
        return settings.endpoint
    account = getattr(settings.service, "account", None)
    return f"https://{account}.blob.core.windows.net/" if account else None


def _secret_problem(name: str, key: str, ref: SecretRef, value: str) -> str | None:
    """Account keys are base64 (a connection string's too); checked offline."""
    if name == "connection_string":
        try:
            value = parse_connection_string(value).get("AccountKey", "")
        except ValueError as e:
            return (f"{key}: is not an Azure connection string: {e} (got {ref.describe()}); "
                    "copy it from the portal")
    if name in ("account_key", "connection_string") and value:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return (f"{key}: the Azure account key is not valid base64 (got {ref.describe()}, "
                    "content not shown); copy the key exactly as the portal shows it "
                    "(Storage account > Access keys)")
    return None


SERVICE = Service(
    scheme="azure", example="azure://container/prefix",
    aliases=("az", "abfs", "abfss", "wasb", "wasbs"),
    check_url=_check_url, open=_open, probe_target=_probe_target,
    keys=("account", "account_key_file", "account_key_env", "sas_token_file", "sas_token_env",
          "connection_string_file", "connection_string_env"),
    secrets=CREDENTIALS, read=_read, check_credentials=_check_credentials,
    secret_problem=_secret_problem,
)
