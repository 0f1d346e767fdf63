"""Restore and verify attacked where the restore and history work of issue 14 meet: tips read
from a bucket the attacker controls, tips a compromised site signs, and the restore journal
(`<to>/.skyferry/`) against a local user who can write the target folder.

Objects are sealed and signed with the real crypto into a local-folder cloud
(tests/restorekit.py); the CLI is run where exit codes, tracebacks or peak RSS are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import crypto, tips
from tests.restorekit import SITE, Cloud, Keys, make_keys, run_cli

MIB = 1 << 20
RSS_LIMIT = 256 * MIB
STREAM = "ab" * 16


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def cloud(keys: Keys, tmp_path: Path) -> Cloud:
    return Cloud(tmp_path / "cloud", keys)


def cli(cloud: Cloud, verb: str, out: Path | None = None) -> object:
    args = [verb, "--backend", cloud.url, "--key", str(cloud.keys.recipient_key), "--json"]
    if verb == "restore":
        assert out is not None
        args += ["--to", str(out)]
    return run_cli(*args)


def signed_tip(cloud: Cloud, body: bytes) -> bytes:
    """A tip sealed and signed with the site's key, whatever its body says."""
    signed = cloud.keys.edge.signing_key.sign(tips.TIP_CONTEXT + body) + body
    return crypto.seal(signed, cloud.keys.edge.recipient_public, kind=crypto.KIND_TIP,
                       compression=crypto.COMPRESSION_NONE, plaintext_len=len(signed))


def tip_body(highest: str = "1", queued: str = "[]") -> bytes:
    return (f'{{"created":"2026-11-25T12:00:00+00:00","highest":{highest},"n":1,'
            f'"queued":{queued},"site":"{SITE}","stream":"{STREAM}","type":"tip",'
            f'"version":1,"void":[]}}').encode()


# ---- tips ----------------------------------------------------------------------------------------


def test_a_huge_object_at_a_tip_key_is_refused_unread(cloud: Cloud, tmp_path: Path) -> None:
    """No keys needed: 300 MiB of garbage at a tip key was read whole (645 MiB peak RSS)."""
    cloud.publish("good.bin", b"good" * 1000)
    key = tips.tip_key(SITE, STREAM, 1)
    path = cloud.root / key
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(300 * MIB)
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
        assert r.peak_rss <= RSS_LIMIT, (verb, r.peak_rss / MIB)  # type: ignore[attr-defined]
        rep = r.report  # type: ignore[attr-defined]
        assert [p for p in rep["problems"] if p["what"] == key], rep
        assert rep["objects_ok"] == 1


@pytest.mark.parametrize("body", [
    tip_body(highest="9" * 5000),  # beyond the interpreter's int-from-string limit
    tip_body(queued="[" * 100_000 + "]" * 100_000),  # deeper than the recursion limit
], ids=["huge-int", "deep-nesting"])
def test_a_signed_tip_that_breaks_the_json_parser_is_a_problem(cloud: Cloud, tmp_path: Path,
                                                               body: bytes) -> None:
    """A compromised site's signed tip made `verify` a traceback."""
    cloud.publish("good.bin", b"good" * 1000)
    key = tips.tip_key(SITE, STREAM, 1)
    cloud.write(key, signed_tip(cloud, body))
    r = cli(cloud, "verify")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
    rep = r.report  # type: ignore[attr-defined]
    assert [p for p in rep["problems"] if p["what"] == key], rep
    assert rep["objects_ok"] == 1
    assert json.dumps(rep)
