"""Names that could never be restored safely are refused at ingest, with a clear reason."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import UnsafePathError
from agent.format.manifest import check_name
from tests.kits.site import Site, drop_file


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../../x", "./x", "a//b", "", "a/", "x\x00y",
                                  "bad-\udcff-bytes"])
def test_unsafe_names_rejected(name: str) -> None:
    with pytest.raises(UnsafePathError):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "a/b/c.txt", "données/日本.csv", "..hidden", "a..b"])
def test_safe_names_accepted(name: str) -> None:
    assert str(check_name(name)) == name


def test_put_refuses_a_name_restore_would_reject(make_site: Callable[..., Site],
                                                 tmp_path: Path) -> None:
    site = make_site()
    f = tmp_path / "x.txt"
    f.write_bytes(b"x")
    r = site.cli("put", "-c", str(site.config), str(f), "--name", "../escape", check=False)
    assert r.returncode == 1
    assert "unsafe path '../escape'" in r.stderr and "rename" in r.stderr


def test_non_utf8_spool_name_is_skipped_once_and_others_flow(make_site: Callable[..., Site],
                                                             tmp_path: Path) -> None:
    site = make_site()
    bad = os.fsencode(site.spool()) + b"/bad-\xff.bin"
    with open(bad, "wb") as f:
        f.write(b"unrestorable name")
    drop_file(site.spool(), "good.txt", b"fine")
    site.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (site.spool() / "good.txt").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # several scans: the bad file must be reported once, not every scan
    # Gone from the spool means queued, not yet sent: wait for the upload (the bad file stays,
    # so the spool never empties and `wait_drained` does not apply).
    while time.monotonic() < deadline + 30 and not sum(
            c["items"].get("committed", 0) for c in site.status()["classes"].values()):
        time.sleep(0.2)
    site.stop()
    failures = [e for e in site.log_events() if e.get("event") == "spool_skipped"]
    assert len(failures) == 1 and "not valid UTF-8" in failures[0]["msg"], failures
    assert os.path.exists(bad), "a file that was not accepted must stay in the spool"
    report = json.loads(site.restore(tmp_path / "out").stdout)
    assert report["objects_ok"] == 1
