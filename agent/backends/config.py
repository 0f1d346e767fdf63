"""The [backend] table: which object store, where, and with which credentials.

Read through agent.config.table so problems are reported like every other section's.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from agent.config.settings import BackendSettings, SecretRef
from agent.config.table import Table, boolean, env_name, one_of, read_toml, secret
from agent.errors import ConfigError

BACKEND_COMMON_KEYS = ("url", "endpoint", "allow_http", "connect_timeout", "timeout", "min_rate")
# key -> the schemes it applies to
BACKEND_SCHEME_KEYS: dict[str, tuple[str, ...]] = {
    "account": ("azure",),
    "account_key_file": ("azure",), "account_key_env": ("azure",),
    "sas_token_file": ("azure",), "sas_token_env": ("azure",),
    "connection_string_file": ("azure",), "connection_string_env": ("azure",),
    "region": ("s3",),
    "access_key_id": ("s3",), "access_key_id_env": ("s3",),
    "secret_access_key_file": ("s3",), "secret_access_key_env": ("s3",),
    "session_token_file": ("s3",), "session_token_env": ("s3",),
    "profile": ("s3",),
    "service_account_key_file": ("gs",), "service_account_key_env": ("gs",),
}  # fmt: skip
# Written inline, these would sit in a world-readable file, in backups and in support
# bundles: the config names where a secret is, never the secret.
INLINE_SECRETS = ("account_key", "sas_token", "connection_string", "secret_access_key",
                  "session_token", "service_account_key")
BACKEND_KEYS = BACKEND_COMMON_KEYS + tuple(BACKEND_SCHEME_KEYS)
BACKEND_SCHEMES = {"file": "file", "azure": "azure", "s3": "s3", "gs": "gs"}
SCHEME_ALIASES = {"az": "azure", "abfs": "azure", "abfss": "azure", "wasb": "azure",
                  "wasbs": "azure", "s3a": "s3", "gcs": "gs"}
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")


def read_backend(t: Table, base: Path) -> BackendSettings:
    for name in INLINE_SECRETS:
        if t.has(name):
            # Not t.report: that would echo the secret into logs and terminals.
            t.problems.append(
                f"{t.key(name)}: secrets are not accepted inline in the config file (got a "
                f"value, not shown); put it in a file only skyferry can read and set "
                f'{name}_file = "/etc/skyferry/{name}", or name an environment variable with '
                f'{name}_env = "VARIABLE"'
            )
    t.reject_unknown(BACKEND_KEYS + INLINE_SECRETS)
    t.require("url", 'url = "file:///var/lib/skyferry-cloud"')
    url = t.string("url", None)
    scheme = _check_backend_url(t, url) if url is not None else None
    for name, schemes in BACKEND_SCHEME_KEYS.items():
        if t.has(name) and scheme is not None and scheme not in schemes:
            t.report(name, f"applies to {', '.join(s + '://' for s in schemes)} backends only",
                     f"remove it, or change url (it is {scheme}://)")
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
    secrets = {name: secret(t, name, base) for name in INLINE_SECRETS}
    key_id_env = env_name(t, "access_key_id_env")
    key_id = t.string("access_key_id", None)
    one_of(t, "access_key_id", "access_key_id_env")
    if scheme == "azure":
        _check_azure_credentials(t, secrets)
    if scheme == "s3":
        _check_s3_credentials(t, secrets, key_id is not None or key_id_env is not None)
    return BackendSettings(
        url=url or "", endpoint=endpoint, region=t.string("region", None),
        allow_http=allow_http, connect_timeout_s=connect_timeout, timeout_s=timeout,
        min_rate_bps=min_rate, account=t.string("account", None),
        account_key=secrets["account_key"], sas_token=secrets["sas_token"],
        connection_string=secrets["connection_string"], access_key_id=key_id,
        access_key_id_env=key_id_env, secret_access_key=secrets["secret_access_key"],
        session_token=secrets["session_token"], profile=t.string("profile", None),
        service_account_key=secrets["service_account_key"],
    )



def _split_url(url: str) -> SplitResult | None:
    """urlsplit, or None for what it refuses (ValueError: an unbalanced IPv6 bracket)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _endpoint(t: Table) -> str | None:
    endpoint = t.string("endpoint", None)
    if endpoint is None:
        return None
    parts = _split_url(endpoint)
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        t.report("endpoint", "is not an http(s) URL",
                 'write the service URL, e.g. "https://s3.eu-central-1.example.net"')
        return None
    return endpoint.rstrip("/")



def _check_azure_credentials(t: Table, secrets: dict[str, SecretRef | None]) -> None:
    kinds = [n for n in ("account_key", "sas_token", "connection_string") if secrets[n]]
    if len(kinds) > 1:
        t.report(f"{kinds[1]}_{secrets[kinds[1]].source}",  # type: ignore[union-attr]
                 f"conflicts with {kinds[0]}",
                 "give one credential: an account key, a SAS token or a connection string")
    if not t.has("account") and not secrets["connection_string"]:
        t.require("account", 'account = "mystorageaccount" (the storage account name)')


def _check_s3_credentials(t: Table, secrets: dict[str, SecretRef | None], has_id: bool) -> None:
    has_secret = secrets["secret_access_key"] is not None
    if has_id and not has_secret:
        t.problems.append(
            f"{t.key('secret_access_key_file')}: access_key_id is set but its secret is not "
            "(got nothing); add secret_access_key_file or secret_access_key_env, or remove "
            "access_key_id to use the default credential chain")
    if has_secret and not has_id:
        t.problems.append(
            f"{t.key('access_key_id')}: a secret access key is set but not its key id "
            '(got nothing); add access_key_id = "AKIA..." or access_key_id_env')
    if secrets["session_token"] and not has_secret:
        t.report("session_token_" + secrets["session_token"].source,
                 "needs an access key pair", "add access_key_id and secret_access_key_file")
    if t.has("profile") and (has_id or has_secret):
        t.report("profile", "conflicts with the access key pair",
                 "use either a profile or access_key_id + secret_access_key_file")


def _check_backend_url(t: Table, url: str) -> str | None:
    """Check the URL's form; return its scheme when usable."""
    parts = _split_url(url)
    if parts is None:
        t.report("url", "is not a URL (an unbalanced [ or ])",
                 "use file:///path, azure://container/prefix, s3://bucket/prefix or "
                 "gs://bucket/prefix")
        return None
    scheme = parts.scheme.lower()
    if scheme in SCHEME_ALIASES:
        good = SCHEME_ALIASES[scheme]
        t.report("url", f"{scheme}:// is not a scheme skyferry reads",
                 f"write {good}://{'container' if good == 'azure' else 'bucket'}/prefix")
        return None
    if scheme not in BACKEND_SCHEMES:
        t.report("url", "is not a backend URL",
                 "use file:///path, azure://container/prefix, s3://bucket/prefix or "
                 "gs://bucket/prefix")
        return None
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            t.report("url", "a relative file: path is not allowed",
                     "write an absolute path after three slashes, e.g. file:///srv/cloud")
            return None
        return scheme
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        t.report("url", "must be scheme://name/prefix without query, user or port",
                 "put the endpoint in endpoint = ... and credentials in their own keys")
        return None
    if scheme == "azure":
        if CONTAINER_RE.fullmatch(parts.netloc) is None:
            t.report("url", "does not name a valid Azure container",
                     "write azure://container/prefix; container names are 3-63 of a-z, 0-9 "
                     "and single '-'")
            return None
    elif BUCKET_RE.fullmatch(parts.netloc) is None:
        t.report("url", "does not name a valid bucket",
                 f"write {scheme}://bucket/prefix; bucket names are 3-63 of a-z, 0-9, '.', '-'")
        return None
    if "//" in parts.path or any(p in (".", "..") for p in parts.path.split("/")):
        t.report("url", "has an empty, '.' or '..' segment in its prefix",
                 f"write {scheme}://{parts.netloc}/some/prefix")
        return None
    return scheme


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
