"""One exception hierarchy; every message says what went wrong, where, and how to fix it."""

from __future__ import annotations


class SkyferryError(Exception):
    """Root of every error skyferry raises on purpose."""


class ConfigError(SkyferryError):
    """The configuration file is missing, malformed or invalid."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = problems
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))


class KeyFileError(SkyferryError):
    """A key file is missing, unreadable, malformed or has unsafe permissions."""


class CryptoError(SkyferryError):
    """A sealed object could not be opened or a signature did not verify (tampered or wrong key)."""


class FormatError(SkyferryError):
    """Bytes do not follow the documented format (see docs/FORMAT.md)."""


class StoreError(SkyferryError):
    """The local durable queue is unusable."""


class CorruptChunkError(StoreError):
    """A sealed chunk file on local disk does not match what the index recorded."""


class QuotaExceededError(StoreError):
    """Accepting this data would exceed the state_dir quota and the class policy is `refuse`."""


class DiskFullError(QuotaExceededError):
    """The filesystem holding state_dir has no room: refused like a full quota (sources back
    off and keep their data) until uploads free space or the filesystem grows."""


class StoreLockedError(StoreError):
    """Another process (normally the running daemon) holds the store."""


class BackendError(SkyferryError):
    """The object storage backend failed or refused an operation."""

    def __init__(self, message: str, kind: str = "backend") -> None:
        super().__init__(message)
        # What metrics count it as: timeout, connection, throttled, server_error, auth, ...
        self.kind = kind


class TransientBackendError(BackendError):
    """Retrying may help: a timeout, a reset connection, a 5xx answer, throttling (429/503)."""


class PermanentBackendError(BackendError):
    """Retrying cannot help: credentials, permissions, missing bucket/container."""


class ObjectConflictError(BackendError):
    """An object already sits under the key with other content: someone must look at it."""


class RestoreError(SkyferryError):
    """A restore or verify run found missing, corrupt or unsafe objects."""


class UnsafePathError(RestoreError):
    """A manifest names a path that would escape the restore target."""


class SourceError(SkyferryError):
    """A data source (spool folder, MQTT, put) cannot ingest."""


class SourceUnsettledError(SourceError):
    """The file was written to between being looked at and being opened, and is still there:
    nothing of it was read. A spool file is then simply not settled yet."""


class IngestStoppedError(SourceError):
    """The daemon is stopping: an ingest was abandoned; its data stays at the source."""


class ObjectNotFoundError(BackendError):
    """The backend has no object under that key."""


class ObjectTooLargeError(BackendError):
    """An object is larger than the format allows for it: refused without being read."""
