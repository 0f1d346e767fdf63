"""What a tip or heartbeat body must be before its fields are read (agent/format/signed.py,
`record_fields`): the refusals are FormatErrors that say what is wrong, never a crash."""

from __future__ import annotations

import json

import pytest

from agent.errors import FormatError
from agent.format.heartbeat import HEARTBEAT_VERSION, Heartbeat
from agent.format.tips import TIP_VERSION, Tip

TIP = Tip(site="s1", stream="0123456789abcdef" * 2, n=3, created="2026-12-05T10:00:00+00:00",
          highest=9, queued=((1, 4),), void=((5, 5),))


def test_a_tip_reads_back_what_it_wrote() -> None:
    assert Tip.from_json(TIP.to_json()) == TIP


@pytest.mark.parametrize(("reader", "what", "version"), [
    (Tip.from_json, "tip", TIP_VERSION),
    (Heartbeat.from_json, "heartbeat", HEARTBEAT_VERSION),
])
@pytest.mark.parametrize(("raw", "says"), [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),  # nesting beyond the parser
    (b"[1, 2]", "not a {what} object"),
    (b'"tip"', "not a {what} object"),
    (json.dumps({"type": "manifest", "version": 1}).encode(), "not a {what} object"),
    (json.dumps({"type": "{what}"}).encode(), "version None is not supported"),
    (json.dumps({"type": "{what}", "version": 99}).encode(), "version 99 is not supported"),
    (json.dumps({"type": "{what}", "version": "1"}).encode(), "version '1' is not supported"),
])
def test_refusals_say_what_is_wrong(reader: object, what: str, version: int, raw: bytes,
                                    says: str) -> None:
    raw = raw.replace(b"{what}", what.encode())
    with pytest.raises(FormatError) as e:
        reader(raw)  # type: ignore[operator]
    assert says.format(what=what) in str(e.value)
    if "version" in says:
        assert f"(this skyferry reads {version})" in str(e.value)
    if "not valid JSON" in says:
        assert str(e.value).startswith(f"{what} is not valid JSON")
