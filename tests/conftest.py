"""Shared fixtures: a throw-away site per test, with keys the test generates."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kits.mqtt import Broker
from tests.kits.site import Site


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    made: list[Site] = []

    def make(**kw: Any) -> Site:
        site = Site(tmp_path / f"site{len(made)}", **kw)
        made.append(site)
        return site

    yield make
    for s in made:
        s.close()


# Object-store emulators (Azurite, moto), started once per session, and per-test clouds.
from tests.kits.emulators import (  # noqa: E402, F401
    azurite,
    azurite_queue,
    make_cloud,
    make_queues,
    moto,
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Mosquitto on a free port, killed after the test (tests/kits/mqtt.py)."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()
