"""What a queue message asks a lander to do (agent/cloud/land_notify.py): work items, Event Grid
BlobCreated (Event Grid schema and CloudEvents, as delivered to a Storage Queue: base64 JSON) and
S3 ObjectCreated (in the SQS body, keys URL-encoded; also inside an SNS envelope). The samples
follow the services' documented event shapes."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote_plus

from agent.cloud.land_notify import SourcePlace, Work, is_manifest_key, parse, work_item

MANIFEST = "camp-alpha/manifests/2026/12/05/0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
CHUNK = "camp-alpha/chunks/ab/abcdef"
AZURE = SourcePlace.of("azure://sealed/fleet")
S3 = SourcePlace.of("s3://sealed-bucket/fleet")


def event_grid(blob: str, container: str = "sealed", kind: str = "Microsoft.Storage.BlobCreated",
               cloud_events: bool = False) -> str:
    subject = f"/blobServices/default/containers/{container}/blobs/{blob}"
    data = {"api": "PutBlob", "contentType": "application/octet-stream", "contentLength": 812,
            "blobType": "BlockBlob",
            "url": f"https://acct.blob.core.windows.net/{container}/{quote_plus(blob)}"}
    if cloud_events:
        event: dict[str, Any] = {"specversion": "1.0", "type": kind, "subject": subject,
                                 "source": "/subscriptions/x/resourceGroups/y/providers/"
                                           "Microsoft.Storage/storageAccounts/acct",
                                 "id": "9aeb0fdf", "time": "2026-12-05T12:00:00Z",
                                 "data": data}
    else:
        event = {"topic": "/subscriptions/x/resourceGroups/y/providers/Microsoft.Storage/"
                          "storageAccounts/acct", "subject": subject, "eventType": kind,
                 "id": "831e1650", "data": data, "dataVersion": "", "metadataVersion": "1",
                 "eventTime": "2026-12-05T12:00:00Z"}
    return base64.b64encode(json.dumps(event).encode()).decode()


def s3_event(*keys: str, bucket: str = "sealed-bucket", name: str = "ObjectCreated:Put") -> str:
    return json.dumps({"Records": [
        {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
         "eventTime": "2026-12-05T12:00:00.000Z", "eventName": name,
         "s3": {"s3SchemaVersion": "1.0", "configurationId": "land",
                "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                "object": {"key": quote_plus(k, safe="/"), "size": 812, "eTag": "0" * 32,
                           "sequencer": "0055AED6DCD90281E5"}}} for k in keys]})


def test_work_items_name_one_manifest() -> None:
    assert parse(work_item(MANIFEST), AZURE) == Work((MANIFEST,))
    assert parse(work_item(CHUNK), AZURE).poison


def test_event_grid_blob_created_of_a_manifest_becomes_work_others_are_dropped() -> None:
    assert parse(event_grid(f"fleet/{MANIFEST}"), AZURE) == Work((MANIFEST,))
    assert parse(event_grid(f"fleet/{MANIFEST}", cloud_events=True), AZURE) == Work((MANIFEST,))
    # The adapter may hand over the decoded JSON: the same result.
    decoded = base64.b64decode(event_grid(f"fleet/{MANIFEST}")).decode()
    assert parse(decoded, AZURE) == Work((MANIFEST,))
    for other in (event_grid(f"fleet/{CHUNK}"), event_grid(MANIFEST),  # outside the prefix
                  event_grid(f"fleet/{MANIFEST}", container="other"),
                  event_grid(f"fleet/{MANIFEST}", kind="Microsoft.Storage.BlobDeleted")):
        assert parse(other, AZURE) == Work(), other
    assert parse(event_grid(f"fleet/{MANIFEST}"), S3) == Work(), "not the source's service"


def test_s3_object_created_keys_are_url_decoded_and_filtered() -> None:
    spaced = "camp beta/manifests/2026/12/05/0193a1b2-ü"
    got = parse(s3_event(f"fleet/{MANIFEST}", f"fleet/{CHUNK}", f"fleet/{spaced}"), S3)
    assert got == Work((MANIFEST, spaced))
    assert parse(s3_event(f"fleet/{MANIFEST}", name="ObjectRemoved:Delete"), S3) == Work()
    assert parse(s3_event(f"fleet/{MANIFEST}", bucket="elsewhere"), S3) == Work()
    assert parse(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent",
                             "Bucket": "sealed-bucket"}), S3) == Work()
    sns = json.dumps({"Type": "Notification", "MessageId": "m",
                      "Message": s3_event(f"fleet/{MANIFEST}")})
    assert parse(sns, S3) == Work((MANIFEST,))


def test_anything_else_is_poison_with_a_reason() -> None:
    for body in ("hello", "{}", "[1, 2]", json.dumps({"Records": "x"}),
                 json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]})):
        assert parse(body, S3).poison, body


def test_manifest_keys() -> None:
    assert is_manifest_key(MANIFEST)
    for key in (CHUNK, "camp-alpha/manifests/2026/12/x", "camp-alpha/manifests/2026/12/05/",
                "a/manifests/2026/12/05/b/c"):
        assert not is_manifest_key(key), key
