"""Object keys in the cloud: `<prefix>/<site>/chunks/<id[:2]>/<id>` and dated manifests."""

from __future__ import annotations

from datetime import UTC, datetime


def chunk_key(site: str, chunk_id: str) -> str:
    return f"{site}/chunks/{chunk_id[:2]}/{chunk_id}"


def chunk_copies_prefix(site: str, chunk_id: str) -> str:
    """Where re-sent copies of a chunk go (docs/FORMAT.md, "Retention"): a reader that does
    not find `chunk_key` takes any copy here (each is checked against the manifest's hash)."""
    return f"{chunk_key(site, chunk_id)}.copies/"


def chunk_copy_key(site: str, chunk_id: str, edge_time: float, tag: str) -> str:
    """A copy's key: the edge time it was sent (14 hex digits of microseconds, so newer copies
    sort later) and a random tag."""
    return f"{chunk_copies_prefix(site, chunk_id)}{max(0, int(edge_time * 1e6)):014x}{tag}"


def manifest_key(site: str, created: float, object_id: str) -> str:
    day = datetime.fromtimestamp(created, UTC)
    return f"{site}/manifests/{day:%Y/%m/%d}/{object_id}"


def manifests_prefix(site: str) -> str:
    return f"{site}/manifests/"


def site_of(key: str) -> str:
    return key.split("/", 1)[0]
