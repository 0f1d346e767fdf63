"""URL checks shared by the cloud services: scheme://container-or-bucket/prefix."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import SplitResult, urlsplit

from agent.config.table import Table

BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# (what is wrong, how to fix it) for a container or bucket name; None: a good name
NameRule = Callable[[str, str], tuple[str, str] | None]


def split_url(url: str) -> SplitResult | None:
    """urlsplit, or None for what it refuses (ValueError: an unbalanced IPv6 bracket)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def bucket_problem(scheme: str, name: str) -> tuple[str, str] | None:
    if BUCKET_RE.fullmatch(name) is None:
        return ("does not name a valid bucket",
                f"write {scheme}://bucket/prefix; bucket names are 3-63 of a-z, 0-9, '.', '-'")
    return None


def check_cloud_url(t: Table, parts: SplitResult, name_rule: NameRule = bucket_problem) -> bool:
    """The URL names a container or bucket and a clean prefix, nothing else."""
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        t.report("url", "must be scheme://name/prefix without query, user or port",
                 "put the endpoint in endpoint = ... and credentials in their own keys")
        return False
    problem = name_rule(scheme, parts.netloc)
    if problem is not None:
        t.report("url", *problem)
        return False
    if "//" in parts.path or any(p in (".", "..") for p in parts.path.split("/")):
        t.report("url", "has an empty, '.' or '..' segment in its prefix",
                 f"write {scheme}://{parts.netloc}/some/prefix")
        return False
    return True
