"""Where a work queue is and how to reach it: `QueueOptions`, the queue URL forms, and the TOML
table that names them (read like [backend]: problems by key path, secrets as *_file / *_env).

No service SDK is imported here, so checking a config costs nothing; the adapters
(workqueue_azure.py, workqueue_sqs.py) open what `address` describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.config.settings import SecretRef
from agent.config.table import Table, boolean, env_name, one_of, read_toml, secret
from agent.errors import ConfigError

AZURE_SECRETS = ("account_key", "sas_token", "connection_string")
SQS_SECRETS = ("secret_access_key", "session_token")
SECRETS = AZURE_SECRETS + SQS_SECRETS
AZURE_KEYS = tuple(f"{s}_{how}" for s in AZURE_SECRETS for how in ("file", "env"))
SQS_KEYS = ("region", "access_key_id", "access_key_id_env", "profile",
            *(f"{s}_{how}" for s in SQS_SECRETS for how in ("file", "env")))
COMMON_KEYS = ("url", "dead_letter", "endpoint", "allow_http", "connect_timeout", "timeout",
               "retries")
QUEUE_KEYS = COMMON_KEYS + AZURE_KEYS + SQS_KEYS
URL_FORMS = ('"azqueue://<account>/<queue>", "sqs://<region>/<account-id>/<queue>" or the SQS '
             'queue\'s https URL')

AZURE_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")
AZURE_QUEUE_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
SQS_REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")
SQS_ACCOUNT_RE = re.compile(r"\d{12}")
SQS_QUEUE_RE = re.compile(r"[A-Za-z0-9_-]{1,80}")
# sqs.<region>.amazonaws.com[.cn] and the legacy <region>.queue.amazonaws.com
SQS_HOST_RE = re.compile(r"(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?")


@dataclass(frozen=True)
class QueueOptions:
    """How to reach a queue: what the URL does not say. Secrets are read when it is opened."""

    endpoint: str | None = None  # Azure: the account URL (Azurite: http://host:port/account)
    dead_letter: str | None = None  # a queue name beside the work queue, or a queue URL
    allow_http: bool = False
    connect_timeout_s: float = 10.0
    timeout_s: float = 30.0  # waiting for an answer (SQS adds the long-poll wait to it)
    retries: int = 3  # retries the service's SDK makes after a transient failure
    # Azure Storage Queue: one of these (there is no default credential chain here).
    account_key: SecretRef | None = None
    sas_token: SecretRef | None = None
    connection_string: SecretRef | None = None
    # SQS: a key pair, a profile, or the AWS default credential chain.
    region: str | None = None  # when the URL does not name it (a queue URL on an endpoint)
    access_key_id: str | None = None
    access_key_id_env: str | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None
    profile: str | None = None


@dataclass(frozen=True)
class QueueSettings:
    """A [queue] table: the work queue's URL and how to reach it."""

    url: str
    options: QueueOptions


@dataclass(frozen=True)
class QueueAddress:
    """A parsed queue URL. Azure: `endpoint` is the account URL; SQS: `queue_url` is what the API
    takes and `endpoint` where the client connects (None: the region's public endpoint)."""

    service: str  # "azqueue" or "sqs"
    account: str  # the storage account, or the AWS account id
    queue: str
    region: str | None = None
    queue_url: str = ""
    endpoint: str | None = None


def address(url: str, options: QueueOptions) -> QueueAddress | str:
    """The queue `url` names (with `options`' endpoint and region), or what is wrong with it."""
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(/[^?#]*)?", url)
    if m is None:
        return f"is not a queue URL; use {URL_FORMS}"
    scheme, host, path = m[1].lower(), m[2], (m[3] or "")
    if scheme == "azqueue":
        return _azure(host, path.strip("/"), options)
    if scheme == "sqs":
        parts = path.strip("/").split("/")
        if len(parts) != 2:
            return "is not sqs://<region>/<account-id>/<queue>"
        return _sqs(parts[0], parts[1], host, None, options)
    if scheme in ("http", "https"):
        if host.endswith(".queue.core.windows.net"):
            return f"names an Azure queue by its https URL; write azqueue://{host.split('.')[0]}" \
                   f"/{path.strip('/')} (and endpoint = ... for a private endpoint)"
        if scheme == "http" and not options.allow_http:
            return "is plain http:// but allow_http is false; use https:// (or allow_http = true" \
                   " for emulators)"
        parts = path.strip("/").split("/")
        if len(parts) != 2:
            return "is not an SQS queue URL (https://sqs.<region>.amazonaws.com/<account>/<queue>)"
        hm = SQS_HOST_RE.fullmatch(host.lower())
        region = options.region or (hm[1] or hm[2] if hm else None)
        if region is None:
            return "does not name the queue's region; add region = \"us-east-1\" (or the queue's)"
        endpoint = options.endpoint or (None if hm else f"{scheme}://{host}")
        return _sqs(parts[0], parts[1], region, endpoint, options, queue_url=url)
    return f"is not a queue URL; use {URL_FORMS}"


def _azure(account: str, queue: str, options: QueueOptions) -> QueueAddress | str:
    if AZURE_ACCOUNT_RE.fullmatch(account) is None:
        return ("does not name an Azure storage account; write azqueue://<account>/<queue> "
                "(account names are 3-24 of a-z and 0-9)")
    if AZURE_QUEUE_RE.fullmatch(queue) is None:
        return ("does not name a valid Azure queue; queue names are 3-63 of a-z, 0-9 and single "
                "'-', starting and ending with a letter or digit")
    endpoint = options.endpoint or f"https://{account}.queue.core.windows.net"
    return QueueAddress("azqueue", account, queue, queue_url=f"{endpoint}/{queue}",
                        endpoint=endpoint)


def _sqs(account: str, queue: str, region: str, endpoint: str | None, options: QueueOptions,
         queue_url: str | None = None) -> QueueAddress | str:
    if SQS_REGION_RE.fullmatch(region) is None:
        return f"does not name an AWS region (got {region!r}); e.g. sqs://eu-west-1/<account>/<q>"
    if SQS_ACCOUNT_RE.fullmatch(account) is None:
        return f"does not name a 12-digit AWS account id (got {account!r})"
    if queue.endswith(".fifo"):
        return "names a FIFO queue; work items need a standard queue (no message groups)"
    if SQS_QUEUE_RE.fullmatch(queue) is None:
        return "does not name a valid SQS queue; queue names are 1-80 of A-Z, a-z, 0-9, '-', '_'"
    endpoint = endpoint or options.endpoint
    if queue_url is None:
        domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
        base = endpoint or f"https://sqs.{region}.{domain}"
        queue_url = f"{base}/{account}/{queue}"
    return QueueAddress("sqs", account, queue, region=region, queue_url=queue_url,
                        endpoint=endpoint)


def dead_letter_address(work: QueueAddress, options: QueueOptions) -> QueueAddress | str:
    """The dead-letter queue: a name beside the work queue, or a URL of the same service."""
    value = options.dead_letter or ""
    if "://" not in value:
        if work.service == "azqueue":
            return _azure(work.account, value, options)
        assert work.region is not None
        base = work.queue_url.rsplit("/", 1)[0]
        return _sqs(work.account, value, work.region, work.endpoint, options,
                    queue_url=f"{base}/{value}")
    found = address(value, options)
    if isinstance(found, str):
        return found
    if found.service != work.service:
        return "is a queue of another service than url's; use one of the same service"
    if work.service == "azqueue" and found.account != work.account:
        return (f"is in storage account {found.account}, not {work.account}; the credentials "
                "are the work queue's: use a queue of the same account")
    return found


def read_queue(t: Table, base: Path) -> QueueSettings:
    """A [queue] table (url, dead_letter, endpoint, credentials...); problems go to `t`."""
    for name in SECRETS:
        if t.has(name):
            # Not t.report: that would echo the secret into logs and terminals.
            t.problems.append(
                f"{t.key(name)}: secrets are not accepted inline in the config file (got a "
                f"value, not shown); put it in a file only skyferry can read and set "
                f'{name}_file = "/etc/skyferry/{name}", or name an environment variable with '
                f'{name}_env = "VARIABLE"')
    t.reject_unknown(QUEUE_KEYS + SECRETS)
    t.require("url", 'url = "azqueue://<account>/<queue>" or "sqs://<region>/<account-id>/<queue>"')
    t.require("dead_letter", 'dead_letter = "<queue>-dead" (a second queue, for failed items)')
    options = _read_options(t, base)
    url = t.string("url", "")
    found = address(url, options) if url else None
    if isinstance(found, str):
        t.report("url", found, f"use {URL_FORMS}")
    elif found is not None:
        _check_service_keys(t, found.service, options)
        if options.dead_letter:
            dead = dead_letter_address(found, options)
            if isinstance(dead, str):
                t.report("dead_letter", dead, "give a queue name beside url's, or its URL")
    return QueueSettings(url=url, options=options)


def _read_options(t: Table, base: Path) -> QueueOptions:
    d = QueueOptions()
    allow_http = boolean(t, "allow_http", False)
    endpoint = t.string("endpoint", None)
    if endpoint is not None:
        if re.fullmatch(r"https?://[^/?#]+(/[^?#]*)?", endpoint) is None:
            t.report("endpoint", "is not an http(s) URL",
                     'write the service URL, e.g. "http://127.0.0.1:10001/devstoreaccount1"')
        elif endpoint.startswith("http://") and not allow_http:
            t.report("endpoint", "is plain http:// but allow_http is false",
                     "use https://, or set allow_http = true (test setups and emulators only)")
        endpoint = endpoint.rstrip("/")
    connect_timeout = t.duration("connect_timeout", d.connect_timeout_s)
    t.positive("connect_timeout", connect_timeout, 'give a duration such as "10s"')
    timeout = t.duration("timeout", d.timeout_s)
    t.positive("timeout", timeout, 'give a duration such as "30s"')
    retries = t.integer("retries", d.retries)
    t.ensure("retries", 0 <= retries <= 20, "must be 0 to 20", "retries = 3")
    key_id_env = env_name(t, "access_key_id_env")
    one_of(t, "access_key_id", "access_key_id_env")
    found = {name: secret(t, name, base) for name in SECRETS}
    return QueueOptions(
        endpoint=endpoint, dead_letter=t.string("dead_letter", None), allow_http=allow_http,
        connect_timeout_s=connect_timeout, timeout_s=timeout, retries=retries,
        account_key=found["account_key"], sas_token=found["sas_token"],
        connection_string=found["connection_string"], region=t.string("region", None),
        access_key_id=t.string("access_key_id", None), access_key_id_env=key_id_env,
        secret_access_key=found["secret_access_key"], session_token=found["session_token"],
        profile=t.string("profile", None))


def _check_service_keys(t: Table, service: str, o: QueueOptions) -> None:
    """Keys of the other service are mistakes; the chosen one's credentials must go together."""
    others = SQS_KEYS if service == "azqueue" else AZURE_KEYS
    for name in others:
        if t.has(name):
            t.report(name, f"does not apply to {service}:// queues",
                     "remove it, or change url")
    if service == "azqueue":
        given = [n for n in AZURE_SECRETS if getattr(o, n) is not None]
        if not given:
            t.problems.append(
                f"{t.key('account_key_file')}: an Azure queue needs a credential (got none); "
                "set account_key_file (or _env), sas_token_file or connection_string_file")
        elif len(given) > 1:
            t.problems.append(f"{t.key(given[1] + '_file')}: conflicts with {given[0]}; give "
                              "one credential")
        return
    has_id = o.access_key_id is not None or o.access_key_id_env is not None
    if has_id != (o.secret_access_key is not None):
        t.problems.append(
            f"{t.key('access_key_id')}: an access key id and its secret go together (got only "
            "one); set both access_key_id (or _env) and secret_access_key_file (or _env), or "
            "neither for the AWS default credential chain")
    if o.session_token is not None and not has_id:
        t.problems.append(f"{t.key('session_token_file')}: needs an access key pair; add "
                          "access_key_id and secret_access_key_file")
    if o.profile is not None and has_id:
        t.report("profile", "conflicts with the access key pair",
                 "use either a profile or access_key_id + secret_access_key_file")


def load_queue_settings(path: Path, table: str = "queue") -> QueueSettings:
    """Only the [queue] table (or `table`) of a TOML file."""
    data = read_toml(path)
    raw = data.get(table, {})
    problems: list[str] = []
    if not isinstance(raw, dict):
        problems.append(f"{table}: must be a table (got a value); write it as a [{table}] section")
        raw = {}
    settings = read_queue(Table(raw, table, problems), path.absolute().parent)
    if problems:
        raise ConfigError(problems, str(path))
    return settings
