"""Signed operator commands (agent/telemetry/command_auth.py), without a daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import KeyFileError
from agent.telemetry.command_auth import (
    CommandRefused,
    CommandVerifier,
    generate_operator_keys,
    key_id,
    load_operator_key,
    load_operator_private,
    sign_command,
)


def verifier(tmp_path: Path, now: list[float]) -> tuple[CommandVerifier, Ed25519PrivateKey]:
    private, public = generate_operator_keys(tmp_path / "op")
    pub = load_operator_key(public)
    v = CommandVerifier({key_id(pub): pub}, "site-a", 300.0, tmp_path / "nonces.json",
                        clock=lambda: now[0])
    return v, load_operator_private(private)


def refused(v: CommandVerifier, payload: bytes) -> str:
    with pytest.raises(CommandRefused) as e:
        v.verify(payload)
    return e.value.reason


def test_signed_fresh_command_passes_once(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    v, key = verifier(tmp_path, now)
    cmd = {"cmd": "priority", "object": "o1", "class": "high"}
    payload = sign_command(key, "site-a", cmd, now=now[0] - 299)
    body = v.verify(payload)
    assert (body["cmd"], body["object"], body["class"]) == ("priority", "o1", "high")
    assert refused(v, payload) == "replay"
    # A new verifier (a restart) reads the nonces back.
    v2 = CommandVerifier(v.keys, "site-a", 300.0, tmp_path / "nonces.json", clock=lambda: now[0])
    assert refused(v2, payload) == "replay"
    # Once the window has passed the nonce is forgotten, and the command is stale anyway.
    now[0] += 601
    assert refused(v2, payload) == "stale"
    assert len(json.loads((tmp_path / "nonces.json").read_text())) == 1


def test_every_kind_of_bad_command_is_refused_with_its_reason(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    v, key = verifier(tmp_path, now)
    stranger_file, _ = generate_operator_keys(tmp_path / "stranger")
    stranger = load_operator_private(stranger_file)
    good = json.loads(sign_command(key, "site-a", {"cmd": "pause"}, now=now[0]))
    cases = {
        b"pause": "unsigned",
        b"": "unsigned",
        b"\xff\xfe": "unsigned",
        b'{"cmd": "pause"}': "unsigned",
        b"[1, 2]": "unsigned",
        json.dumps({**good, "sig": "not base64!"}).encode(): "bad_signature",
        json.dumps({**good, "sig": 5}).encode(): "bad_signature",
        json.dumps({**good, "signed": good["signed"].replace("pause", "flush")}).encode():
            "bad_signature",
        json.dumps({**good, "key": "0" * 16}).encode(): "bad_signature",
        sign_command(stranger, "site-a", {"cmd": "pause"}, now=now[0]): "bad_signature",
        sign_command(key, "site-b", {"cmd": "pause"}, now=now[0]): "other_site",
        sign_command(key, "site-a", {"cmd": "pause"}, now=now[0] - 301): "stale",
        sign_command(key, "site-a", {"cmd": "pause"}, now=now[0] + 301): "stale",
        sign_command(key, "site-a", {"cmd": "pause"}, now=now[0], nonce="short"): "malformed",
    }
    for payload, reason in cases.items():
        assert refused(v, payload) == reason, payload[:80]
    assert not (tmp_path / "nonces.json").exists()  # nothing refused was remembered


def test_unreadable_nonce_file_refuses_what_was_signed_before(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    v, key = verifier(tmp_path, now)
    (tmp_path / "nonces.json").write_text("{not json")
    v2 = CommandVerifier(v.keys, "site-a", 300.0, tmp_path / "nonces.json", clock=lambda: now[0])
    old = sign_command(key, "site-a", {"cmd": "pause"}, now=now[0] - 10)
    assert refused(v2, old) == "replay"
    assert v2.verify(sign_command(key, "site-a", {"cmd": "pause"}, now=now[0] + 1))


def test_operator_keys_are_checked_and_never_overwritten(tmp_path: Path) -> None:
    private, _ = generate_operator_keys(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_operator_keys(tmp_path)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_operator_key(private)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_operator_key(tmp_path / "missing.pub")


def test_keygen_operator_and_command_usage_errors(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import main

    assert main(["keygen", "--operator", "--out", str(tmp_path / "ops")]) == 0
    assert (tmp_path / "ops" / "operator.key").exists()
    assert (tmp_path / "ops" / "operator.pub").exists()
    assert main(["keygen", "--out", str(tmp_path / "site")]) == 2  # --site is needed
    assert "needs --site" in capsys.readouterr().err
    key = str(tmp_path / "ops" / "operator.key")
    assert main(["command", "--key", key, "--site", "s", "priority", "obj"]) == 2
    assert main(["command", "--key", key, "--site", "s", "pause", "extra"]) == 2
    assert main(["command", "--key", key, "--site", "s", "--broker", "h:x", "pause"]) == 2
    err = capsys.readouterr().err
    assert "OBJECT CLASS" in err and "HOST:PORT" in err


def test_a_flood_of_refused_commands_does_not_flood_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """Any client of the broker may publish on the cmd topic: refusals are counted, each
    answered, but logged in a short burst and then summarised, not one line per message."""
    import asyncio
    import logging
    from typing import Any

    from agent.obs.metrics import Metrics
    from agent.telemetry.commands import Commands

    metrics = Metrics()

    async def run_blocking(fn: Any, *args: Any) -> Any:
        return fn(*args)

    cmds = Commands(None, None, lambda: None, run_blocking, metrics, True)  # type: ignore[arg-type]

    async def flood() -> list[dict[str, Any]]:
        return [await cmds.apply(b'{"cmd": "pause", "junk": %d}' % i) for i in range(1000)]

    with caplog.at_level(logging.INFO, logger="skyferry.commands"):
        answers = asyncio.run(flood())
    assert len(answers) == 1000 and not any(a["ok"] for a in answers)
    assert metrics.commands_refused.labels("untrusted")._value.get() == 1000
    lines = [r for r in caplog.records if r.name == "skyferry.commands"]
    assert 1 <= len(lines) <= 30, len(lines)
