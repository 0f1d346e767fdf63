"""The [mqtt] section: the site broker, subscriptions, batching, status and commands.

Problems are reported like every other section's, by key path with a fix. This reads the file
alone: whether the operator key files hold keys is checked by `agent.daemon.site_config`, which
may load them (reading them needs the command verifier's key format).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from agent.config.settings import (
    MqttBatching,
    MqttProtocol,
    MqttSettings,
    MqttStatusSettings,
    MqttSubscription,
    MqttTls,
)
from agent.config.site import NAME_RE, RESERVED_SOURCE
from agent.config.table import Table, secret

MQTT_KEYS = (
    "host", "port", "protocol", "client_id", "source", "username", "password_file",
    "password_env", "keepalive", "session_expiry", "max_inflight", "reconnect_initial",
    "reconnect_max", "subscribe", "batch", "tls", "status", "max_message_size",
)  # fmt: skip
STATUS_KEYS = ("publish", "interval", "commands", "topic_prefix", "operator_keys",
               "command_max_age")
# One message this size raises peak memory by about 2.5 x its size (its copy as received, its
# JSON Lines encoding, the sealing buffers): 32 MiB keeps that within its size plus 64 MiB.
MAX_MESSAGE_LIMIT = 32 << 20
BATCH_KEYS = ("max_bytes", "max_messages", "max_age")
RESERVED_MQTT_NAME = "mqtt"  # restore writes MQTT batches under <site>/mqtt/


def read_mqtt(root: Table, base: Path, site_id: str, class_names: tuple[str, ...],
              spool_names: tuple[str, ...]) -> MqttSettings | None:
    """Settings of the [mqtt] table, or None when the file has no [mqtt] section."""
    if not root.has("mqtt"):
        return None
    t = root.table("mqtt", MQTT_KEYS)
    d = MqttSettings()
    host = t.string("host", d.host)
    t.ensure("host", bool(host), "must not be empty", 'give the broker address, e.g. "127.0.0.1"')
    port = t.integer("port", d.port)
    t.ensure("port", 0 < port < 65536, "is not a TCP port", "use 1883 (plain) or 8883 (TLS)")
    protocol = _protocol(t)
    client_id = t.string("client_id", f"skyferry-{site_id}")
    t.ensure("client_id", 0 < len(client_id.encode()) <= 23 or protocol == "5",
             "is longer than the 23 bytes MQTT 3.1.1 guarantees",
             "shorten it, or use protocol = \"5\"")
    t.ensure("client_id", bool(client_id), "must not be empty",
             "give a fixed id: the broker keeps queued messages under it while skyferry is away")
    source = t.string("source", d.source)
    t.ensure("source", NAME_RE.fullmatch(source) is not None, "is not a valid source name",
             "use lower-case letters, digits, '_' or '-', starting with a letter or digit")
    t.ensure("source", source != RESERVED_SOURCE and source not in spool_names,
             "is already the name of another source (a spool, or `put`)", "choose another name")
    username = t.string("username", None)
    password = secret(t, "password", base)
    if password is not None and username is None:
        t.problems.append(f"{t.key('username')}: a password is set but no username (got "
                          'nothing); add username = "..." (MQTT sends no password alone)')
    keepalive = t.duration("keepalive", d.keepalive_s)
    t.ensure("keepalive", 1 <= keepalive <= 65535, "must be between 1s and 65535s",
             'a short one (e.g. "15s") notices a stalled broker quickly')
    expiry = t.duration("session_expiry", d.session_expiry_s)
    t.positive("session_expiry", expiry,
               'give how long the broker keeps messages while skyferry is away, e.g. "7d"')
    inflight = t.integer("max_inflight", d.max_inflight)
    t.ensure("max_inflight", 1 <= inflight <= 65535, "must be between 1 and 65535",
             "1000 lets the broker keep sending while a batch is being made durable")
    initial = t.duration("reconnect_initial", d.reconnect_initial_s)
    t.positive("reconnect_initial", initial, 'give a duration such as "1s"')
    most = t.duration("reconnect_max", d.reconnect_max_s)
    t.ensure("reconnect_max", most >= initial, "must not be shorter than reconnect_initial",
             "raise reconnect_max or lower reconnect_initial")
    max_message = _max_message(t, d.max_message_bytes)
    subs = _subscriptions(t, class_names)
    batching, per_class = _batching(t, class_names, inflight)
    tls = _tls(t, base) if t.has("tls") else None
    status = _status(t.table("status", STATUS_KEYS), base)
    return MqttSettings(
        host=host, port=port, protocol=protocol, client_id=client_id, source=source,
        username=username, password=password, tls=tls, keepalive_s=keepalive,
        session_expiry_s=expiry, max_inflight=inflight, reconnect_initial_s=initial,
        reconnect_max_s=most, max_message_bytes=max_message, subscriptions=subs,
        batching=batching,
        class_batching=per_class, status=status,
    )


def _protocol(t: Table) -> MqttProtocol:
    raw = t.raw("protocol")
    if raw == 5:  # written as a number: accept it
        return "5"
    return cast(MqttProtocol, t.choice("protocol", ("5", "3.1.1"), "5"))


def _subscriptions(t: Table, class_names: tuple[str, ...]) -> tuple[MqttSubscription, ...]:
    how = 'write subscribe = [ { topic = "sensors/#", qos = 1, priority = "normal" } ]'
    out: list[MqttSubscription] = []
    for s in t.tables("subscribe", ("topic", "qos", "priority"), how):
        s.require("topic", 'topic = "sensors/#"')
        topic = s.string("topic", "")
        problem = topic_filter_problem(topic) if s.has("topic") else None
        if problem is not None:
            s.report("topic", f"is not a valid MQTT topic filter: {problem}",
                     'write levels separated by "/", "+" for one level, "#" last for the rest')
        qos = s.integer("qos", 1)
        if qos == 2:
            s.report("qos", "2 is not offered",
                     "use qos = 1: QoS 2 publications still arrive (as QoS 1) and are "
                     "acknowledged only once durable; with QoS 2 the broker would hand a "
                     "message over before skyferry could make it durable")
        else:
            s.ensure("qos", qos in (0, 1), "must be 0 or 1",
                     "1 (at least once, acknowledged after it is durable) suits most data")
        priority = s.string("priority", "normal")
        if class_names and priority not in class_names:
            s.report("priority", "names no configured class",
                     f"use one of {', '.join(class_names)}")
        out.append(MqttSubscription(topic=topic, qos=qos, priority=priority))
    return tuple(out)


def topic_filter_problem(topic: str) -> str | None:
    """Why `topic` is not a valid MQTT topic filter, or None."""
    if not topic:
        return "it is empty"
    if "\x00" in topic:
        return "it contains a NUL character"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return '"#" must be a whole level and the last one'
        if "+" in level and level != "+":
            return '"+" must be a whole level'
    return None


def _batch_values(t: Table, d: MqttBatching) -> MqttBatching:
    nbytes = t.size("max_bytes", d.max_bytes)
    t.positive("max_bytes", nbytes, 'give a size such as "1MiB"')
    count = t.integer("max_messages", d.max_messages)
    t.ensure("max_messages", count >= 1, "must be at least 1", "e.g. 200")
    age = t.duration("max_age", d.max_age_s)
    t.positive("max_age", age, 'give a duration such as "5s"')
    return MqttBatching(max_bytes=nbytes, max_messages=count, max_age_s=age)


def _batching(t: Table, class_names: tuple[str, ...], inflight: int
              ) -> tuple[MqttBatching, tuple[tuple[str, MqttBatching], ...]]:
    table = t.table("batch", (*BATCH_KEYS, *class_names))
    default = _batch_values(Table({k: v for k, v in table.data.items() if k in BATCH_KEYS},
                                   table.where, table.problems), MqttBatching())
    per_class: list[tuple[str, MqttBatching]] = []
    for name in class_names:
        if table.has(name):
            sub = table.table(name, BATCH_KEYS)
            per_class.append((name, _batch_values(sub, default)))
    for where, b in (("batch", default), *((f"batch.{n}", b) for n, b in per_class)):
        if b.max_messages > inflight:
            t.problems.append(
                f"mqtt.{where}.max_messages: is larger than max_inflight ({inflight}) (got "
                f"{b.max_messages}); the broker stops sending at max_inflight unacknowledged "
                "messages, so lower max_messages or raise max_inflight")
    return default, tuple(per_class)


def _tls(t: Table, base: Path) -> MqttTls:
    s = t.table("tls", ("ca_file", "cert_file", "key_file", "insecure"))
    cert = s.path("cert_file", base, None)
    key = s.path("key_file", base, None)
    if (cert is None) != (key is None):
        s.problems.append(f"{s.key('key_file')}: cert_file and key_file go together (got only "
                          "one); give both for a client certificate, or neither")
    insecure = s.raw("insecure")
    if insecure is not None and not isinstance(insecure, bool) and s.has("insecure"):
        s.report("insecure", "must be true or false", "write insecure = false")
    return MqttTls(ca_file=s.path("ca_file", base, None), cert_file=cert, key_file=key,
                   insecure=insecure is True)


def _max_message(t: Table, default: int) -> int:
    size = t.size("max_message_size", default)
    t.ensure("max_message_size", 1 <= size <= MAX_MESSAGE_LIMIT,
             "must be between 1 byte and 32MiB",
             'give a size such as "16MiB"; larger payloads belong in files (a spool, or '
             "`skyferry put`)")
    return size if 1 <= size <= MAX_MESSAGE_LIMIT else default


def _operator_keys(t: Table, base: Path) -> tuple[Path, ...]:
    raw = t.raw("operator_keys")
    if not t.has("operator_keys"):
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        t.report("operator_keys", "must be a list of file names",
                 'write operator_keys = ["/etc/skyferry/operators/alice.pub"]')
        return ()
    return tuple(base / Path(v).expanduser() for v in raw)


def _status(t: Table, base: Path) -> MqttStatusSettings:
    d = MqttStatusSettings()
    flags: dict[str, bool] = {}
    for name, default in (("publish", d.publish), ("commands", d.commands)):
        value = t.raw(name)
        if t.has(name) and not isinstance(value, bool):
            t.report(name, "must be true or false", f"write {name} = {str(default).lower()}")
        flags[name] = value if isinstance(value, bool) else default
    interval = t.duration("interval", d.interval_s)
    t.positive("interval", interval, 'give a duration such as "10s"')
    prefix = t.string("topic_prefix", d.topic_prefix)
    t.ensure("topic_prefix", bool(prefix) and "#" not in prefix and "+" not in prefix,
             "must be a plain topic without wildcards", 'e.g. "skyferry"')
    max_age = t.duration("command_max_age", d.command_max_age_s)
    t.ensure("command_max_age", 1 <= max_age <= 86400, "must be between 1s and 1d",
             'e.g. "5m": a signed command older (or newer) than this is refused as stale')
    return MqttStatusSettings(publish=flags["publish"], interval_s=interval,
                              commands=flags["commands"], topic_prefix=prefix.strip("/"),
                              operator_keys=_operator_keys(t, base),
                              command_max_age_s=max_age)
