"""Signed operator commands: only a key the site trusts can pause, resume or flush it.

Any client of the site broker can publish on `<prefix>/<site>/cmd`, so a command is obeyed only
when it carries an Ed25519 signature by one of the operator keys listed in
`[mqtt.status] operator_keys`. The operator's private key stays on the cloud side
(`skyferry keygen --operator`); `skyferry command` signs and publishes.

Wire format (UTF-8 JSON, one object):

    {"signed": "<body: JSON text>", "key": "<key id>", "sig": "<base64 Ed25519 signature>"}

The signature covers `skyferry/v1/command\\0` followed by the body's UTF-8 bytes. The body is a
JSON object: `cmd` plus its arguments (as in agent/telemetry/commands.py), `site` (the site id it
is meant for), `ts` (UNIX time, seconds) and `nonce` (16-64 characters, fresh per command). The
key id is the first 16 hex digits of SHA-256 over the raw public key.

Refused, each with one log line and a count: unsigned payloads, a signature that does not verify
or an unknown key, a body for another site, a `ts` more than `command_max_age` away from the
site's clock (stale), and a nonce already seen within that window (replay). Seen nonces are kept
in `<state_dir>/command-nonces.json` until they fall out of the window, so a restart does not
reopen a replay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.config.settings import Settings
from agent.errors import KeyFileError, SkyferryError
from agent.format.keys import load_pem, write_private, write_public
from agent.obs.logs import log_event

log = logging.getLogger("skyferry.commands")
CONTEXT = b"skyferry/v1/command\x00"
NONCE_FILE = "command-nonces.json"
MAX_NONCES = 10_000  # signed commands within one window; only an operator can add one


class CommandRefused(SkyferryError):
    """A command that is not obeyed; `reason` is a short word for metrics and logs."""

    def __init__(self, reason: str, detail: str, name: str = "?") -> None:
        super().__init__(detail)
        self.reason = reason
        self.name = name


# ---- keys ------------------------------------------------------------------------------------


def generate_operator_keys(out_dir: Path, name: str = "operator") -> tuple[Path, Path]:
    """Write `<name>.key` (private, 0600, stays with the operator) and `<name>.pub`."""
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing:
        raise KeyFileError(f"refusing to overwrite existing key files: {', '.join(existing)}; "
                           "choose another --out folder or move them away first")
    key = Ed25519PrivateKey.generate()
    pem = serialization.Encoding.PEM
    write_private(private, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_public(public, key.public_key().public_bytes(
        pem, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_operator_key(path: Path) -> Ed25519PublicKey:
    return cast(Ed25519PublicKey, load_pem(path, "operator public key", Ed25519PublicKey,
                                            "Ed25519 public key", private=False))


def load_operator_private(path: Path) -> Ed25519PrivateKey:
    return cast(Ed25519PrivateKey, load_pem(path, "operator private key", Ed25519PrivateKey,
                                             "Ed25519 private key", private=True))


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---- signing (operator side) -------------------------------------------------------------------


def sign_command(key: Ed25519PrivateKey, site: str, command: dict[str, Any],
                 now: float | None = None, nonce: str | None = None) -> bytes:
    """The payload to publish on `<prefix>/<site>/cmd` for `command` (e.g. {"cmd": "pause"})."""
    body = {**command, "site": site, "ts": time.time() if now is None else now,
            "nonce": nonce or secrets.token_hex(16)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    sig = key.sign(CONTEXT + text.encode())
    return json.dumps({"signed": text, "key": key_id(key.public_key()),
                       "sig": base64.b64encode(sig).decode("ascii")}).encode()


# ---- verifying (site side) ---------------------------------------------------------------------


@dataclass
class CommandVerifier:
    keys: dict[str, Ed25519PublicKey]  # key id -> key
    site: str
    max_age_s: float
    nonce_path: Path | None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._not_before = float("-inf")  # commands signed earlier count as replays
        self._seen: dict[str, float] = self._load_nonces()

    def verify(self, raw: bytes) -> dict[str, Any]:
        """The command a signed payload carries; raises CommandRefused."""
        body, name = self._authentic(raw)
        if body.get("site") != self.site:
            raise CommandRefused("other_site", f"signed for site {body.get('site')!r}, this "
                                 f"is {self.site!r}", name)
        ts, nonce = body.get("ts"), body.get("nonce")
        if (isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(nonce, str)
                or not 16 <= len(nonce) <= 64):
            raise CommandRefused("malformed", 'a signed command needs "ts" (UNIX seconds) and '
                                 '"nonce" (16-64 characters)', name)
        now = self.clock()
        if abs(now - ts) > self.max_age_s:
            raise CommandRefused("stale", f"signed {now - ts:+.0f}s from now, outside the "
                                 f"{self.max_age_s:.0f}s window ([mqtt.status] "
                                 "command_max_age); check both clocks", name)
        self._prune(now)
        if nonce in self._seen or ts <= self._not_before:
            raise CommandRefused("replay", f"nonce {nonce[:16]} was already used: a replay",
                                 name)
        if len(self._seen) >= MAX_NONCES:
            raise CommandRefused("too_many", f"more than {MAX_NONCES} commands within "
                                 f"{self.max_age_s:.0f}s", name)
        self._seen[nonce] = float(ts)
        self._save_nonces()
        return body

    def _authentic(self, raw: bytes) -> tuple[dict[str, Any], str]:
        try:
            envelope = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            envelope = None
        if not isinstance(envelope, dict) or "sig" not in envelope:
            raise CommandRefused("unsigned", "not signed; send it with `skyferry command`",
                                 name_of(raw))
        text, kid, sig = envelope.get("signed"), envelope.get("key"), envelope.get("sig")
        if not (isinstance(text, str) and isinstance(kid, str) and isinstance(sig, str)):
            raise CommandRefused("bad_signature", 'needs "signed", "key" and "sig" strings')
        key = self.keys.get(kid)
        if key is None:
            raise CommandRefused("bad_signature", f"signed by key {kid[:16]!r}, which is not "
                                 "in [mqtt.status] operator_keys")
        try:
            key.verify(base64.b64decode(sig, validate=True), CONTEXT + text.encode())
            body = json.loads(text)
        except (InvalidSignature, binascii.Error, ValueError):
            raise CommandRefused("bad_signature", f"signature by key {kid} does not verify"
                                 ) from None
        if not isinstance(body, dict) or not isinstance(body.get("cmd"), str):
            raise CommandRefused("malformed", 'the signed body needs a "cmd" string')
        return body, body["cmd"]

    def _prune(self, now: float) -> None:
        for nonce in [n for n, ts in self._seen.items() if ts < now - self.max_age_s]:
            del self._seen[nonce]

    def _load_nonces(self) -> dict[str, float]:
        if self.nonce_path is None:
            return {}
        try:
            data = json.loads(self.nonce_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Lost nonces would reopen replays inside the window: refuse until it has passed.
            log_event(log, logging.WARNING, "command_nonces_unreadable",
                      f"cannot read {self.nonce_path} ({e}); commands signed before now are "
                      "refused as replays until the window has passed")
            self._not_before = self.clock()
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(n): float(t) for n, t in data.items() if isinstance(t, int | float)}

    def _save_nonces(self) -> None:
        if self.nonce_path is None:
            return
        tmp = self.nonce_path.with_name(self.nonce_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._seen, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.nonce_path)


def name_of(raw: bytes) -> str:
    """The command an unchecked payload names (signed or not), for log lines only."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        words = raw[:200].decode("utf-8", "replace").split()
        return words[0][:32] if words else "?"
    if isinstance(data, dict) and isinstance(data.get("signed"), str):
        try:
            data = json.loads(data["signed"])
        except ValueError:
            return "?"
    return str(data.get("cmd", "?"))[:32] if isinstance(data, dict) else "?"


def verifier_for(settings: Settings) -> CommandVerifier:
    """The verifier for a site's [mqtt.status]; an unusable key file is logged and left out
    (commands it signs are then refused) rather than stopping the daemon."""
    m = settings.mqtt
    paths: Sequence[Path] = m.status.operator_keys if m is not None else ()
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = load_operator_key(path)
        except SkyferryError as e:
            log_event(log, logging.ERROR, "operator_key_unusable",
                      f"{e}; commands signed with it are refused")
            continue
        keys[key_id(key)] = key
    if m is not None and m.status.commands and not keys:
        log_event(log, logging.WARNING, "commands_untrusted",
                  "[mqtt.status] commands = true but no operator_keys: every command is "
                  "refused; make a key with `skyferry keygen --operator --out DIR` and list "
                  "DIR/operator.pub in operator_keys")
    max_age = m.status.command_max_age_s if m is not None else 300.0
    return CommandVerifier(keys, settings.site.id, max_age,
                           settings.site.state_dir / NONCE_FILE)
