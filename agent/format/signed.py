"""Small sealed records signed by a site (tips, heartbeats): bounded, decrypted, verified.

One reading for every such record: the sealed bytes and the declared plaintext are held to the
record's cap before anything is decompressed, the sealed kind must be the record's, and the
signature covers the record's own context before the body, so one kind of record can never be
taken for another.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import CryptoError, FormatError
from agent.format import crypto
from agent.format.codec import decompress


def open_signed(key: str, blob: bytes, recipient: X25519PrivateKey,
                site_key: Ed25519PublicKey, *, kind: int, context: bytes, cap: int,
                what: str) -> bytes:
    """The verified body of the `what` record sealed in `blob` (stored at `key`)."""
    if len(blob) > cap:
        raise FormatError(f"{key} is {len(blob)} bytes, over the {cap}-byte {what} cap")
    header, payload = crypto.open_sealed(blob, recipient)
    if header.kind != kind:
        raise FormatError(f"{key} holds sealed kind {header.kind}, not a {what}")
    if header.plaintext_len > cap:
        raise FormatError(f"{key} claims a {header.plaintext_len}-byte {what}: over the cap")
    signed = bytes(decompress(header.compression, payload, header.plaintext_len))
    signature, body = signed[:crypto.SIGNATURE_SIZE], signed[crypto.SIGNATURE_SIZE:]
    try:
        site_key.verify(signature, context + body)
    except InvalidSignature:
        raise CryptoError(f"{key}: {what} signature does not verify with the site's "
                          "key") from None
    return body


def record_fields(raw: bytes, what: str, version: int) -> dict[str, Any]:
    """The JSON object of a `what` record (its "type" field), at the one `version` read here."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also integers or nesting beyond the parser
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("type") != what:
        raise FormatError(f"not a {what} object")
    if data.get("version") != version:
        raise FormatError(f"{what} version {data.get('version')!r} is not supported "
                          f"(this skyferry reads {version})")
    return data
