"""`skyferry command`: sign an operator command and publish it to a site's broker.

Runs on the operator's side with the private key from `skyferry keygen --operator`; the site
obeys it only if the matching public key is in its `[mqtt.status] operator_keys`.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import SkyferryError
from agent.telemetry.command_auth import load_operator_private, sign_command


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    site: str
    prefix: str = "skyferry"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SkyferryError(f"--broker {text!r} is not HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def send_command(key_file: Path, target: Target, command: dict[str, Any],
                 wait_s: float) -> dict[str, Any] | None:
    """Publish the signed command (QoS 1); with wait_s > 0, return the site's answer (the
    `command` event carrying this command's nonce), or None if none came in time."""
    key = load_operator_private(key_file)
    payload = sign_command(key, target.site, command)
    nonce = json.loads(json.loads(payload)["signed"])["nonce"]
    base = f"{target.prefix}/{target.site}"
    answer: dict[str, Any] = {}
    answered = threading.Event()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            event = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(event, dict) and event.get("nonce") == nonce:
            answer.update(event)
            answered.set()

    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    if target.username is not None:
        client.username_pw_set(target.username, target.password)
    if target.ca_file is not None:
        client.tls_set_context(ssl.create_default_context(cafile=str(target.ca_file)))
    try:
        client.connect(target.host, target.port, keepalive=30)
    except OSError as e:
        raise SkyferryError(f"cannot reach the broker {target.host}:{target.port}: {e}"
                            ) from None
    client.loop_start()
    try:
        if wait_s > 0:
            client.subscribe(f"{base}/events", qos=1)
        info = client.publish(f"{base}/cmd", payload, qos=1)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            raise SkyferryError(f"the broker {target.host}:{target.port} did not take the "
                                "command within 10 s")
        if wait_s > 0 and answered.wait(wait_s):
            return answer
        return None
    finally:
        client.disconnect()
        client.loop_stop()
