"""What obstore (or the OS, for file://) raised, mapped to one of agent.errors' classes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)

from agent.errors import (
    BackendError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)

_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([A-Za-z]+)</Code>")
# obstore's debug text names the transport failure: Connect, Request, Timeout, Interrupted, ...
_HTTP_KIND_RE = re.compile(r"HttpError \{\s*kind: (\w+)")


@dataclass(frozen=True)
class Failures:
    """Maps failures of one backend; its messages name the URL, the place and the credentials."""

    url: str
    where: str  # "container x", "bucket y": what a 404 on a write means is missing
    credentials: str  # where the credentials came from

    def map(self, op: str, key: str, e: BaseException) -> BackendError:
        if isinstance(e, BackendError):
            return e
        text = str(e)
        found = detail(text)
        key = key or "/"  # a listing of the whole prefix
        status_m = _STATUS_RE.search(text)
        status = int(status_m[1]) if status_m else None
        if isinstance(e, TimeoutError):
            return TransientBackendError(
                f"{self.url}: {op} {key} timed out (no progress within the backend timeout "
                "and min_rate budget)", "timeout")
        if isinstance(e, NotFoundError | FileNotFoundError) or status == 404:
            if op in ("get", "head"):
                return ObjectNotFoundError(f"{self.url}: {op} {key}: no such object", "not_found")
            return PermanentBackendError(
                f"{self.url}: {op} {key} failed: the {self.where} does not exist or these "
                f"credentials ({self.credentials}) cannot see it ({found}); create it, or fix "
                "url", "not_found")
        if isinstance(e, PermissionDeniedError | UnauthenticatedError | PermissionError) or (
                status in (401, 403)):
            return PermanentBackendError(
                f"{self.url}: {op} {key} was refused ({found}): check the credentials "
                f"({self.credentials}) and their permissions on the {self.where}", "auth")
        if status is not None:
            return self._http(op, key, status, found)
        http_kind = _HTTP_KIND_RE.search(text)
        if http_kind and http_kind[1] == "Timeout":
            return TransientBackendError(f"{self.url}: {op} {key} timed out ({found})", "timeout")
        if isinstance(e, BaseError | OSError):
            return TransientBackendError(f"{self.url}: {op} {key} failed: {found}", "connection")
        return TransientBackendError(f"{self.url}: {op} {key} failed: {found}", "backend")

    def _http(self, op: str, key: str, status: int, found: str) -> BackendError:
        if status in (429, 503):
            return TransientBackendError(
                f"{self.url}: {op} {key}: the service is throttling ({found})", "throttled")
        if status >= 500:
            return TransientBackendError(f"{self.url}: {op} {key}: server error ({found})",
                                         "server_error")
        if status == 408:
            return TransientBackendError(f"{self.url}: {op} {key}: request timeout", "timeout")
        return PermanentBackendError(
            f"{self.url}: {op} {key} was rejected ({found}); check the [backend] settings "
            "(region, endpoint)", "rejected")


def detail(text: str) -> str:
    """The useful part of an obstore message: HTTP status and the service's error code."""
    status = _STATUS_RE.search(text)
    code = _CODE_RE.search(text)
    if status:
        return f"HTTP {status[1]}" + (f" {code[1]}" if code else "")
    first = text.splitlines()[0] if text else "no detail"
    # obstore's first line repeats the whole request; keep it to one readable line.
    return first if len(first) <= 200 else first[:197] + "..."
