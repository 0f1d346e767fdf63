"""The site's config file assembled into frozen `Settings`, reporting every problem at once.

Each problem reads `<key.path>: <what is wrong> (got <value>); <how to fix>` so an operator can
fix the whole file in one pass instead of one error per restart. Each section is read by the room
that owns its keys (agent/config for most, agent/backends for [backend], agent/windows for the
window sources); this module only puts them together, in the order the example file uses, so
problems come out in that order. `agent.daemon.preflight` then checks what the settings point at.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from agent.backends.config import read_backend
from agent.config.intake import read_chunking, read_compression, read_put, read_spools
from agent.config.mqtt import read_mqtt
from agent.config.settings import MqttSettings, Settings, WindowSettings
from agent.config.site import class_names, read_classes, read_keys, read_site, read_store
from agent.config.table import Table, read_toml
from agent.config.telemetry import read_telemetry
from agent.config.uplink import read_uplink
from agent.errors import ConfigError, SkyferryError
from agent.windows.reader import read_windows

TOP_LEVEL_KEYS = (
    "site", "keys", "store", "classes", "chunking", "compression", "spool",
    "put", "backend", "uplink", "windows", "telemetry", "mqtt",
)  # fmt: skip


def load_settings(path: Path) -> Settings:
    """Read and validate the config file; raise one ConfigError listing every problem."""
    return validate(read_toml(path), path)


def validate(data: Mapping[str, object], path: Path) -> Settings:
    """Turn parsed TOML into Settings; relative paths are taken from `path`'s directory."""
    problems: list[str] = []
    root = Table(data, "", problems)
    root.reject_unknown(TOP_LEVEL_KEYS)
    base = path.absolute().parent
    site = read_site(root, base)
    keys = read_keys(root, base)
    store = read_store(root)
    classes = read_classes(root)
    names = class_names(root)
    chunking = read_chunking(root)
    compression = read_compression(root)
    spools = read_spools(root, base, names)
    put = read_put(root, base, site.state_dir, names)
    backend = read_backend(root.table("backend"), base)
    uplink = read_uplink(root)
    windows = _read_windows(root, base)
    telemetry = read_telemetry(root)
    mqtt = read_mqtt(root, base, site.id, names, tuple(s.name for s in spools))
    if mqtt is not None:
        problems += operator_key_problems(mqtt)
    if problems:
        raise ConfigError(problems, str(path))
    return Settings(
        site=site,
        keys=keys,
        backend=backend,
        put=put,
        store=store,
        classes=classes,
        chunking=chunking,
        compression=compression,
        spools=spools,
        uplink=uplink,
        windows=windows,
        telemetry=telemetry,
        mqtt=mqtt,
    )


def _read_windows(root: Table, base: Path) -> WindowSettings:
    return read_windows(root.table("windows"), base)


def operator_key_problems(mqtt: MqttSettings) -> list[str]:
    """One problem per `[mqtt.status] operator_keys` file that holds no operator public key."""
    if not mqtt.status.operator_keys:
        return []
    # Imported only when keys are configured: it loads the crypto library, which `skyferry put`
    # (which reads the config too) never needs.
    from agent.telemetry.command_auth import load_operator_key

    problems: list[str] = []
    for i, path in enumerate(mqtt.status.operator_keys):
        try:
            load_operator_key(path)
        except SkyferryError as e:
            problems.append(f"mqtt.status.operator_keys[{i}]: {e}")
    return problems


def summarize(settings: Settings) -> str:
    """One line naming what the config sets up, printed by `check-config`."""
    spools = ", ".join(s.name for s in settings.spools)
    classes = ", ".join(c.name for c in settings.classes)
    return (
        f"site {settings.site.id}; {len(settings.spools)} spool(s)"
        + (f" ({spools})" if spools else "")
        + f"; {len(settings.classes)} class(es) ({classes}); backend {settings.backend.url}"
        + f"; windows {settings.windows.mode}"
        + (f"; mqtt {settings.mqtt.host}:{settings.mqtt.port} "
           f"({len(settings.mqtt.subscriptions)} subscription(s))" if settings.mqtt else "")
    )
