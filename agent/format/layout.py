"""Object keys in the cloud: `<prefix>/<site>/chunks/<id[:2]>/<id>` and dated manifests."""

from __future__ import annotations

from datetime import UTC, datetime


def chunk_key(site: str, chunk_id: str) -> str:
    return f"{site}/chunks/{chunk_id[:2]}/{chunk_id}"


def manifest_key(site: str, created: float, object_id: str) -> str:
    day = datetime.fromtimestamp(created, UTC)
    return f"{site}/manifests/{day:%Y/%m/%d}/{object_id}"


def manifests_prefix(site: str) -> str:
    return f"{site}/manifests/"


def site_of(key: str) -> str:
    return key.split("/", 1)[0]
