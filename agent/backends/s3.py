"""s3://bucket/prefix: Amazon S3 and S3-compatible stores (MinIO, Ceph; a key pair, a
profile, or the AWS default credential chain)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult

from obstore.store import ObjectStore, S3Store

from agent.backends.failures import Failures
from agent.backends.objstore import ObstoreBackend, open_cloud
from agent.backends.secrets import read_secret
from agent.backends.service import Secrets, Service
from agent.backends.urls import check_cloud_url
from agent.config.settings import BackendSettings, SecretRef, ServiceSettings
from agent.config.table import Table, env_name, one_of
from agent.errors import PermanentBackendError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

    from agent.backends.s3_multipart import S3Parts


@dataclass(frozen=True)
class S3Settings(ServiceSettings):
    region: str | None = None
    # A key pair (the id is not secret, so it may be inline), or the default chain.
    access_key_id: str | None = None
    access_key_id_env: str | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None
    profile: str | None = None  # an AWS shared-config profile (needs boto3)

    def secrets(self) -> dict[str, SecretRef | None]:
        return {"secret_access_key": self.secret_access_key,
                "session_token": self.session_token}


def _read(t: Table, secrets: Secrets) -> S3Settings:
    key_id_env = env_name(t, "access_key_id_env")
    key_id = t.string("access_key_id", None)
    one_of(t, "access_key_id", "access_key_id_env")
    return S3Settings(region=t.string("region", None), access_key_id=key_id,
                      access_key_id_env=key_id_env,
                      secret_access_key=secrets["secret_access_key"],
                      session_token=secrets["session_token"], profile=t.string("profile", None))


def _check_credentials(t: Table, settings: ServiceSettings) -> None:
    assert isinstance(settings, S3Settings)
    has_id = settings.access_key_id is not None or settings.access_key_id_env is not None
    has_secret = settings.secret_access_key is not None
    if has_id and not has_secret:
        t.problems.append(
            f"{t.key('secret_access_key_file')}: access_key_id is set but its secret is not "
            "(got nothing); add secret_access_key_file or secret_access_key_env, or remove "
            "access_key_id to use the default credential chain")
    if has_secret and not has_id:
        t.problems.append(
            f"{t.key('access_key_id')}: a secret access key is set but not its key id "
            '(got nothing); add access_key_id = "AKIA..." or access_key_id_env')
    if settings.session_token and not has_secret:
        t.report("session_token_" + settings.session_token.source,
                 "needs an access key pair", "add access_key_id and secret_access_key_file")
    if t.has("profile") and (has_id or has_secret):
        t.report("profile", "conflicts with the access key pair",
                 "use either a profile or access_key_id + secret_access_key_file")


def _key_pair(s: BackendSettings, opts: S3Settings, env: Mapping[str, str],
              kw: dict[str, Any]) -> str:
    """Fills `kw` with the key pair (and session token); returns the credentials' description."""
    assert opts.secret_access_key is not None
    if opts.access_key_id_env is not None:
        key_id = env.get(opts.access_key_id_env, "")
        if not key_id:
            raise PermanentBackendError(
                f"{s.url}: environment variable {opts.access_key_id_env} (access key id) is "
                "not set", "config")
    else:
        key_id = opts.access_key_id or ""
    kw["access_key_id"] = key_id
    kw["secret_access_key"] = read_secret(opts.secret_access_key, env,
                                          "backend secret access key")
    creds = f"access key {key_id[:4]}… with secret from {opts.secret_access_key.describe()}"
    if opts.session_token is not None:
        kw["token"] = read_secret(opts.session_token, env, "backend session token")
        creds += f" and session token from {opts.session_token.describe()}"
    return creds


def _store(s: BackendSettings, bucket: str, env: Mapping[str, str], client: ClientConfig,
           retry: RetryConfig) -> tuple[ObjectStore, str]:
    opts = s.service if isinstance(s.service, S3Settings) else S3Settings()
    kw: dict[str, Any] = {
        # The service checks this SHA-256 of the body and refuses the PUT on a mismatch.
        "checksum_algorithm": "sha256",
    }
    provider = None
    if opts.region:
        kw["region"] = opts.region
    if s.endpoint:
        kw["endpoint"] = s.endpoint
        kw["virtual_hosted_style_request"] = False  # path-style: MinIO, Ceph, emulators
    if opts.secret_access_key is not None:
        creds = _key_pair(s, opts, env, kw)
    elif opts.profile is not None:
        try:
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            raise PermanentBackendError(
                f"{s.url}: profile = {opts.profile!r} needs boto3: pip install boto3",
                "config") from None
        provider = Boto3CredentialProvider(boto3.Session(profile_name=opts.profile))
        creds = f"AWS profile {opts.profile!r}"
    else:
        creds = ("AWS default credential chain (AWS_* environment, web identity, container, "
                 "instance metadata)")
    store = S3Store(bucket, client_options=client, retry_config=retry,
                    credential_provider=provider, **kw)
    return store, creds


def _parts(settings: BackendSettings, bucket: str, env: Mapping[str, str],
           backend: ObstoreBackend) -> S3Parts:
    """Resumable multipart uploads through aiobotocore, with the same credentials."""
    from agent.backends.s3_multipart import PART_SIZE, S3Parts  # loaded only when used

    opts = settings.service if isinstance(settings.service, S3Settings) else S3Settings()
    kw: dict[str, Any] = {}
    if opts.secret_access_key is not None:
        _key_pair(settings, opts, env, kw)
    client_kw: dict[str, Any] = {
        "region_name": opts.region or "us-east-1",
        **{boto: kw[ours] for ours, boto in (("access_key_id", "aws_access_key_id"),
                                             ("secret_access_key", "aws_secret_access_key"),
                                             ("token", "aws_session_token")) if ours in kw}}
    if settings.endpoint:
        client_kw["endpoint_url"] = settings.endpoint
    failures = Failures(settings.url, backend.where, backend.credentials)
    # A renewed client's requests may run as long as the deadline of a part's upload.
    grace_s = settings.timeout_s + PART_SIZE / settings.min_rate_bps
    return S3Parts(bucket, client_kw, opts.profile if opts.secret_access_key is None else None,
                   failures, settings.connect_timeout_s, settings.timeout_s, grace_s)


def _open(settings: BackendSettings, parts: SplitResult,
          environ: Mapping[str, str]) -> ObstoreBackend:
    backend = open_cloud(settings, parts, environ, _store, "bucket")
    backend.resumable = _parts(settings, parts.netloc, environ, backend)
    return backend


def _probe_target(settings: BackendSettings) -> str | None:
    if settings.endpoint:
        return settings.endpoint
    region = getattr(settings.service, "region", None)
    return f"https://s3.{region}.amazonaws.com/" if region else "https://s3.amazonaws.com/"


def _environment_problems(settings: BackendSettings, environ: Mapping[str, str]) -> list[str]:
    name = getattr(settings.service, "access_key_id_env", None)
    if name is not None and not environ.get(name):
        return [f"backend.access_key_id_env: environment variable {name} is not set (got "
                "nothing); set it in the service's environment (systemd: EnvironmentFile=)"]
    return []


SERVICE = Service(
    scheme="s3", example="s3://bucket/prefix", aliases=("s3a",),
    check_url=check_cloud_url, open=_open, probe_target=_probe_target,
    keys=("region", "access_key_id", "access_key_id_env", "secret_access_key_file",
          "secret_access_key_env", "session_token_file", "session_token_env", "profile"),
    secrets=("secret_access_key", "session_token"), read=_read,
    check_credentials=_check_credentials, environment_problems=_environment_problems,
)
