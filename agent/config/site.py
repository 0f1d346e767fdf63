"""The [site], [keys], [store] and [classes] sections: who the site is and what it queues.

Also the naming rules every section shares (source and class names) and the check that a
`priority` names a configured class, used by spools, `put` and MQTT subscriptions alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

from agent.config.settings import (
    DEFAULT_CLASSES,
    ClassSettings,
    KeySettings,
    QuotaPolicy,
    SiteSettings,
    StoreSettings,
)
from agent.config.table import Table

SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
RESERVED_SOURCE = "put"  # the source name `skyferry put` uses


def read_site(root: Table, base: Path) -> SiteSettings:
    t = root.table("site", ("id", "state_dir"))
    t.require("id", 'id = "camp-alpha"')
    site_id = t.string("id", None)
    t.ensure(
        "id",
        site_id is None or SITE_ID_RE.fullmatch(site_id) is not None,
        "is not a valid site id",
        "use 1-63 lower-case letters, digits or '-', starting with a letter or digit "
        "(it becomes part of cloud object keys)",
    )
    t.require("state_dir", 'state_dir = "/var/lib/skyferry"')
    return SiteSettings(id=site_id or "", state_dir=t.path("state_dir", base, Path()))


def read_keys(root: Table, base: Path) -> KeySettings:
    t = root.table("keys", ("recipient_public", "signing_key", "dedup_key"))
    paths: dict[str, Path] = {}
    for name, example in (
        ("recipient_public", "keys/recipient.pub"),
        ("signing_key", "keys/site.key"),
        ("dedup_key", "keys/dedup.key"),
    ):
        t.require(name, f'{name} = "{example}"')
        paths[name] = t.path(name, base, Path())
    return KeySettings(**paths)


def read_store(root: Table) -> StoreSettings:
    t = root.table("store", ("quota",))
    quota = t.size("quota", None)
    t.positive("quota", quota, 'give a size such as "50GiB", or remove quota for no limit')
    return StoreSettings(quota_bytes=quota)


def read_classes(root: Table) -> tuple[ClassSettings, ...]:
    if not root.has("classes"):
        return DEFAULT_CLASSES
    table = root.table("classes")
    if not table.data and isinstance(root.raw("classes"), dict):
        root.report(
            "classes",
            "defines no class",
            "add [classes.<name>] tables, or remove [classes] to use the defaults "
            "critical, high, normal, bulk",
        )
    classes = [c for name in table.data if (c := _class(table, name)) is not None]
    _reject_duplicate_ranks(table, classes)
    return tuple(sorted(classes, key=lambda c: c.rank))


def _class(table: Table, name: str) -> ClassSettings | None:
    if not isinstance(table.raw(name), dict):
        table.report(name, "must be a table", f"write it as [classes.{name}] with rank = ...")
        return None
    t = table.table(name, ("rank", "policy", "ttl"))
    if NAME_RE.fullmatch(name) is None:
        table.problems.append(
            f"{table.key(name)}: is not a valid class name (got {name!r}); "
            "use lower-case letters, digits, '_' or '-', starting with a letter or digit"
        )
    t.require("rank", "rank = 0 (lower is served first)")
    rank = t.integer("rank", -1)  # -1 when missing or invalid: already reported
    if type(t.raw("rank")) is int and rank == t.raw("rank"):  # else already reported
        t.ensure("rank", rank >= 0, "must not be negative", "use 0 for the most urgent class")
    policy = t.choice("policy", ("refuse", "evict-oldest"), "evict-oldest")
    ttl = t.duration("ttl", None)
    t.positive("ttl", ttl, 'give a duration such as "7d", or remove ttl to keep data forever')
    return ClassSettings(name=name, rank=rank, policy=cast(QuotaPolicy, policy), ttl_s=ttl)


def class_names(root: Table) -> tuple[str, ...]:
    """Class names as written, valid or not, so a broken class is reported once, not at each use."""
    if not root.has("classes"):
        return tuple(c.name for c in DEFAULT_CLASSES)
    written = root.raw("classes")
    return tuple(written) if isinstance(written, dict) else ()


def _reject_duplicate_ranks(table: Table, classes: list[ClassSettings]) -> None:
    seen: dict[int, str] = {}
    for c in classes:
        if c.rank < 0:
            continue  # missing or invalid: already reported
        if c.rank in seen:
            table.problems.append(
                f"classes.{c.name}.rank: is already used by class {seen[c.rank]!r} "
                f"(got {c.rank}); give every class a different rank"
            )
        else:
            seen[c.rank] = c.name


def check_priority(t: Table, default: str, names: tuple[str, ...]) -> str:
    """Read `priority` and make sure it names a configured class."""
    priority = t.string("priority", None)
    if priority is None and t.has("priority"):
        return default  # not a string: already reported
    if not names:
        return priority or default  # a [classes] without classes is reported on its own
    if priority in names or (priority is None and default in names):
        return priority or default
    fix = f"use one of {', '.join(names)}"
    if t.has("priority"):
        t.report("priority", "names no configured class", fix)
    else:
        t.problems.append(
            f"{t.key('priority')}: the default class {default!r} is not configured "
            f"(got nothing); set priority, or add [classes.{default}]; {fix}"
        )
    return priority or default
