"""What a queue message asks a lander to do: our own work items, and the storage services' own
object-created events (notification mode).

- A work item (what the lister sends): {"skyferry": "land", "manifest": "<source key>"}.
- Azure Event Grid, BlobCreated, delivered to a Storage Queue: the message is the event's JSON,
  base64-encoded (the Event Grid schema, or CloudEvents 1.0); the blob is named by `subject`,
  /blobServices/default/containers/<container>/blobs/<blob name>.
- S3 event notifications delivered to SQS: {"Records": [...]} with eventName ObjectCreated:*,
  s3.bucket.name and s3.object.key (URL-encoded, a space as "+"); also the same wrapped in an
  SNS notification ({"Type": "Notification", "Message": "..."}), and the s3:TestEvent S3 sends
  when a notification is configured.

Only manifests of the configured source (its container or bucket, below its prefix, in
<site>/manifests/) become work; any other object's event is dropped. A message that is none of
these is poison: dead-lettered at once with the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

WORK_ITEM = "land"
BLOB_CREATED = "Microsoft.Storage.BlobCreated"
_SUBJECT = "/blobServices/default/containers/"


@dataclass(frozen=True)
class Work:
    manifests: tuple[str, ...] = ()  # source keys of manifests to land
    poison: str = ""  # why this message is not something a lander understands


def work_item(key: str) -> str:
    return json.dumps({"skyferry": WORK_ITEM, "manifest": key})


@dataclass(frozen=True)
class SourcePlace:
    """Where the source store's keys live in the service: its container or bucket and prefix."""

    scheme: str
    container: str
    prefix: str

    @classmethod
    def of(cls, url: str) -> SourcePlace:
        parts = urlsplit(url)
        return cls(parts.scheme, parts.netloc, unquote(parts.path).strip("/"))

    def key(self, container: str, name: str) -> str | None:
        """The source key of object `name` in `container`; None when not under the source."""
        if container != self.container:
            return None
        if self.prefix:
            if not name.startswith(self.prefix + "/"):
                return None
            name = name[len(self.prefix) + 1:]
        return name


def is_manifest_key(key: str) -> bool:
    """<site>/manifests/YYYY/MM/DD/<object id>."""
    parts = key.split("/")
    return (len(parts) == 6 and parts[1] == "manifests" and all(parts)
            and all(p.isdigit() for p in parts[2:5]))


def parse(body: str, place: SourcePlace) -> Work:
    """The manifests `body` names (none: nothing to do), or why it is poison."""
    doc = _json(body)
    if doc is None:
        return Work(poison="not JSON, nor base64-encoded JSON: not a work item nor a storage "
                           "event")
    if isinstance(doc, dict) and doc.get("skyferry") == WORK_ITEM:
        key = doc.get("manifest")
        if isinstance(key, str) and is_manifest_key(key):
            return Work((key,))
        return Work(poison=f"work item names no manifest key: {str(key)[:200]!r}")
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        return parse(str(doc["Message"]), place)  # S3 -> SNS -> SQS
    if isinstance(doc, dict) and ("Records" in doc or doc.get("Event") == "s3:TestEvent"):
        return _s3(doc, place)
    events = doc if isinstance(doc, list) else [doc]
    if events and all(isinstance(e, dict) and ("eventType" in e or "specversion" in e)
                      for e in events):
        return _event_grid(events, place)
    return Work(poison="JSON, but neither a work item, an S3 event nor an Event Grid event")


def _json(body: str) -> Any:
    for text in (body, _unbase64(body)):
        if text is None:
            continue
        try:
            return json.loads(text)
        except ValueError:
            continue
    return None


def _unbase64(body: str) -> str | None:
    try:
        return base64.b64decode(body.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _s3(doc: dict[str, Any], place: SourcePlace) -> Work:
    records = doc.get("Records") or []
    if not isinstance(records, list):
        return Work(poison="S3 event: Records is not a list")
    keys = []
    for r in records:
        try:
            created = str(r["eventName"]).startswith("ObjectCreated:")
            bucket, name = r["s3"]["bucket"]["name"], unquote_plus(r["s3"]["object"]["key"])
        except (KeyError, TypeError):
            return Work(poison="S3 event record without eventName, s3.bucket.name or "
                               "s3.object.key")
        key = place.key(str(bucket), name) if created and place.scheme == "s3" else None
        if key is not None and is_manifest_key(key):
            keys.append(key)
    return Work(tuple(keys))


def _event_grid(events: list[dict[str, Any]], place: SourcePlace) -> Work:
    keys = []
    for e in events:
        kind = e.get("eventType") or e.get("type")
        subject = str(e.get("subject") or "")
        if kind != BLOB_CREATED or place.scheme != "azure":
            continue
        if not subject.startswith(_SUBJECT) or "/blobs/" not in subject:
            return Work(poison=f"Event Grid BlobCreated with a subject not naming a blob: "
                               f"{subject[:200]!r}")
        container, name = subject[len(_SUBJECT):].split("/blobs/", 1)
        key = place.key(container, name)
        if key is not None and is_manifest_key(key):
            keys.append(key)
    return Work(tuple(keys))
