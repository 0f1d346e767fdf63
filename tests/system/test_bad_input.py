"""Bad input gets one clear error naming the thing, and changes nothing else (issue 2, acc. 7).

Bad config, missing keys, unsafe paths in (validly signed) manifests, truncated chunk files.
The real CLI and daemon run as subprocesses against a throw-away site.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.format import crypto, layout
from agent.format.codec import decompress
from agent.format.keys import load_edge_keys, load_recipient_private, load_verify_key
from agent.format.manifest import ChunkRef, Manifest, now_iso, uuid7
from tests.kits.site import Site, drop_file, render_toml, tree_digest

MakeSite = Callable[..., Site]
# pack_below 0B: each file its own object, so a test can damage one file's chunk or manifest.
SMALL_CHUNKS = {"chunking": {"min_size": "64KiB", "avg_size": "192KiB", "max_size": "512KiB",
                             "pack_below": "0B"}}


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder below `roots`: (mode, mtime_ns, content digest)."""
    out: dict[str, tuple[int, int, str]] = {}
    for root in roots:
        if not root.exists():
            continue
        digests = tree_digest(root)
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            out[f"{root}:{rel}"] = (st.st_mode, st.st_mtime_ns, str(digests.get(rel, "")))
    return out


def report(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    assert not any("Traceback" in ln for ln in lines), stderr
    return "\n".join(lines)


# ---- bad config ----------------------------------------------------------------------------

BAD_CONFIGS = [
    # (id, extra config merged into the site's valid one, key path the message must name)
    ("bad-int", {"uplink": {"streams": 0}}, "uplink.streams"),
    ("unknown-key", {"site": {"idd": "x"}}, "site.idd"),
    ("bad-size", {"store": {"quota": "lots"}}, "store.quota"),
    ("bad-class", {"spool": [{"name": "files", "path": "/nonexistent/spool", "priority": "asap"}]},
     "spool[0].priority"),
    ("schedule-without-windows", {"windows": {"mode": "schedule"}}, "windows.mode"),
    ("bad-backend", {"backend": {"url": "file://relative/cloud"}}, "backend.url"),
    ("bad-site-id", {"site": {"id": "Camp Alpha"}}, "site.id"),
]


@pytest.mark.parametrize(("changes", "key"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_key_and_creates_nothing(
        make_site: MakeSite, changes: dict[str, Any], key: str) -> None:
    site = make_site(extra=changes)
    before = snapshot(site.root)
    for args in (["run", "-c", str(site.config)], ["check-config", str(site.config)]):
        r = site.cli(*args, check=False, timeout=30)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        msg = one_line_error(r.stderr)
        assert f"{key}:" in msg, (args, msg)
        assert str(site.config) in msg
    assert not site.state.exists()
    assert snapshot(site.root) == before


def test_toml_syntax_error_and_missing_config_name_line_and_path(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site()
    broken = tmp_path / "broken.toml"
    text = site.config.read_text().replace("[backend]", "[backend\n", 1)
    broken.write_text(text)
    line = text.splitlines().index("[backend") + 1
    missing = tmp_path / "absent.toml"
    before = snapshot(site.root)
    for cfg, needles in ((broken, [str(broken), f"line {line}"]),
                         (missing, [str(missing), "not found"])):
        for args in (["run", "-c", str(cfg)], ["check-config", str(cfg)]):
            r = site.cli(*args, check=False, timeout=30)
            assert r.returncode == 2, (args, r.stderr)
            msg = one_line_error(r.stderr)
            assert all(n in msg for n in needles), msg
    assert not site.state.exists()
    assert snapshot(site.root) == before


def test_bad_config_leaves_an_existing_queue_untouched(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site()
    f = tmp_path / "queued.bin"
    f.write_bytes(os.urandom(50_000))
    site.cli("put", "-c", str(site.config), str(f))  # no daemon: queued in the store
    good_config = site.config.read_text()
    site.config.write_text(good_config + "\n[uplink]\nstreams = 100\n")
    before = snapshot(site.state, site.cloud)
    for cmd in ("run", "put"):
        args = [cmd, "-c", str(site.config)] + ([str(f)] if cmd == "put" else [])
        r = site.cli(*args, check=False, timeout=30)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "uplink.streams" in one_line_error(r.stderr)
    assert snapshot(site.state, site.cloud) == before
    # Fixed, the same queue drains normally.
    site.config.write_text(good_config)
    site.start()
    site.wait_drained(expect_objects=1)
    site.stop()


# ---- missing keys --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["recipient.pub", "site.key", "dedup.key"])
def test_missing_key_is_named_with_keygen_hint_and_creates_nothing(
        make_site: MakeSite, tmp_path: Path, key: str) -> None:
    site = make_site()
    path = site.keys.edge_dir / key
    path.unlink()
    f = tmp_path / "data.bin"
    f.write_bytes(b"some data")
    before = snapshot(site.root)
    for args in (["run", "-c", str(site.config)], ["put", "-c", str(site.config), str(f)]):
        r = site.cli(*args, check=False, timeout=30)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        msg = one_line_error(r.stderr)
        assert str(path) in msg and "skyferry keygen" in msg, (args, msg)
        assert not site.state.exists(), f"`skyferry {args[0]}` created {site.state}"
    assert snapshot(site.root) == before


def test_missing_key_leaves_an_existing_queue_untouched(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site()
    f = tmp_path / "queued.bin"
    f.write_bytes(os.urandom(50_000))
    site.cli("put", "-c", str(site.config), str(f))
    signing = site.keys.edge_dir / "site.key"
    hidden = tmp_path / "site.key.away"
    shutil.move(signing, hidden)
    before = snapshot(site.state, site.cloud)
    for args in (["run", "-c", str(site.config)], ["put", "-c", str(site.config), str(f)]):
        r = site.cli(*args, check=False, timeout=30)
        assert r.returncode == 2
        assert str(signing) in one_line_error(r.stderr)
    assert snapshot(site.state, site.cloud) == before
    shutil.move(hidden, signing)
    site.start()
    site.wait_drained(expect_objects=1)
    site.stop()


def test_restore_key_problems_are_named(make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site()
    drop_file(site.spool(), "a.txt", b"hello\n" * 100)
    site.start()
    site.wait_drained(expect_objects=1)
    site.stop()
    out = tmp_path / "out"
    base = ["restore", "--backend", site.backend_url, "--to", str(out), "--json"]

    absent = tmp_path / "nope" / "recipient.key"
    r = site.cli(*base, "--key", str(absent), check=False)
    assert r.returncode == 2
    assert str(absent) in r.stderr and "skyferry keygen" in r.stderr

    wrong = site.keys.edge_dir / "site.key"  # the edge's signing key is not the recipient key
    r = site.cli(*base, "--key", str(wrong), check=False)
    assert r.returncode == 2
    assert str(wrong) in r.stderr and "X25519" in r.stderr
    assert not out.exists()

    # The site's public key is missing beside the recipient key: every manifest is refused.
    site_pub = site.keys.cloud_dir / "sites" / f"{site.site_id}.pub"
    site_pub.unlink()
    r = site.restore(out, check=False)
    assert r.returncode == 1
    rep = report(r)
    assert rep["objects_ok"] == 0 and len(rep["problems"]) == 1
    assert str(site_pub) in rep["problems"][0]["reason"]
    assert not [p for p in out.rglob("*") if p.is_file()]


# ---- unsafe paths in a manifest ------------------------------------------------------------


class Publisher:
    """Writes objects into the cloud folder exactly as the edge would, with the site's keys.

    Lets a test craft manifests the pipeline would never produce, yet that are correctly
    sealed to the recipient and signed by the site: restore must not trust their content.
    """

    def __init__(self, site: Site) -> None:
        e = site.keys.edge_dir
        self.site = site
        self.keys = load_edge_keys(e / "recipient.pub", e / "site.key", e / "dedup.key")

    def publish(self, name: str, data: bytes, *, source: str = "files") -> tuple[str, Manifest]:
        cid = crypto.chunk_id(self.keys.dedup_key, data)
        blob = crypto.seal(data, self.keys.recipient_public, kind=crypto.KIND_CHUNK,
                           compression=crypto.COMPRESSION_NONE, plaintext_len=len(data))
        self._write(layout.chunk_key(self.site.site_id, cid), blob)
        m = Manifest(
            object_id=uuid7(), site=self.site.site_id, source=source, kind="file", name=name,
            size=len(data), mtime_ns=1_700_000_000 * 10**9, hash=crypto.content_hash(data),
            priority="normal", created=now_iso(),
            chunks=(ChunkRef(cid, 0, len(data), crypto.content_hash(data)),),
        )
        body = crypto.sign_manifest(m.to_json(), self.keys.signing_key)
        sealed = crypto.seal(body, self.keys.recipient_public, kind=crypto.KIND_MANIFEST,
                             compression=crypto.COMPRESSION_NONE, plaintext_len=len(body))
        key = layout.manifest_key(self.site.site_id, time.time(), m.object_id)
        self._write(key, sealed)
        return key, m

    def _write(self, key: str, blob: bytes) -> None:
        path = self.site.cloud / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)


def test_unsafe_paths_in_signed_manifests_are_refused(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site()
    # One real object through the daemon, so good data from the real pipeline is in the mix.
    drop_file(site.spool(), "real/data.csv", b"t,v\n1,2\n" * 500)
    site.start()
    site.wait_drained(expect_objects=1)
    site.stop()

    outside = tmp_path / "outside"  # what a link in the target points to
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"not yours")
    parent = tmp_path / "restore-parent"
    target = parent / "target"
    files_dir = target / site.site_id / "files"
    files_dir.mkdir(parents=True)
    (files_dir / "link").symlink_to(outside, target_is_directory=True)
    (files_dir / "filelink").symlink_to(outside / "keep.txt")
    abs_evil = tmp_path / "abs-evil"
    etc_evil = Path("/etc/evil")
    assert not etc_evil.exists()

    pub = Publisher(site)
    token = secrets.token_hex(4).encode()
    refused_at_load = [
        "../evil", "../../../evil", "/etc/evil", str(abs_evil), "a/../../evil",
        "a/../../../../evil", "./x", "a//b", "x/", "", "a/./b", "nul\x00byte",
    ]
    refused_at_write = ["link/x", "filelink"]
    bad: dict[str, tuple[str, Manifest]] = {}
    for name in refused_at_load + refused_at_write:
        bad[name] = pub.publish(name, b"EVIL " + token + name.encode())
    bad_source = pub.publish("fine.txt", b"EVIL " + token + b"source", source="../..")
    good = {name: f"good {name}\n".encode() * 50
            for name in ("ok.txt", "sub/dir/ok.bin", "..hidden-but-fine", "a..b")}
    for name, data in good.items():
        pub.publish(name, data)

    try:
        for cmd in ("verify", "restore"):
            r = site.verify(check=False) if cmd == "verify" else site.restore(target, check=False)
            assert r.returncode == 1, (cmd, r.stderr)
            rep = report(r)
            problems = rep["problems"]
            # Every bad manifest is named (by key when refused on reading it, by object when
            # refused at the write), and the reason says why.
            for name in refused_at_load:
                key, _ = bad[name]
                hits = [p for p in problems if p["what"] == key]
                assert len(hits) == 1, (cmd, name, problems)
                assert "unsafe path" in hits[0]["reason"]
            assert [p for p in problems if p["what"] == bad_source[0]]
            write_problems = [p for p in problems if "/manifests/" not in p["what"]]
            if cmd == "restore":
                for name in refused_at_write:
                    _, m = bad[name]
                    hits = [p for p in write_problems if m.object_id in p["what"]]
                    assert len(hits) == 1, (name, problems)
                    assert "outside" in hits[0]["reason"]
                assert len(problems) == len(bad) + 1
                assert rep["objects_ok"] == len(good) + 1
            else:
                # verify writes nothing, so a link in some target folder cannot matter to it.
                assert len(problems) == len(refused_at_load) + 1
    finally:
        leaked = etc_evil.exists()
        if leaked:
            etc_evil.unlink()
    assert not leaked, "restore wrote /etc/evil"

    # Nothing outside the target; the links and what they point to are untouched.
    assert sorted(p.name for p in parent.iterdir()) == ["target"]
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_bytes() == b"not yours"
    assert (files_dir / "link").is_symlink() and (files_dir / "filelink").is_symlink()
    assert not abs_evil.exists()
    for p in tmp_path.rglob("*"):
        if p.is_file() and not p.is_symlink() and site.cloud not in p.parents:
            assert b"EVIL " + token not in p.read_bytes(), f"bad object written to {p}"
    # The good objects are there, byte for byte, and nothing else was written.
    written = {p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*")
               if p.is_file() and not p.is_symlink()}
    assert written == {*good, "real/data.csv"}
    for name, data in good.items():
        assert (files_dir / name).read_bytes() == data


# ---- truncated chunk files -----------------------------------------------------------------


def test_truncated_or_missing_cloud_objects_are_named(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site(extra=SMALL_CHUNKS)
    files = {f"f{i}.bin": os.urandom(30_000) for i in range(7)}
    files["multi.bin"] = os.urandom(900_000)
    for name, data in files.items():
        drop_file(site.spool(), name, data)
    site.start()
    site.wait_drained(expect_objects=len(files))
    site.stop()

    recipient = load_recipient_private(site.recipient_key)
    verify_key = load_verify_key(site.keys.cloud_dir / "sites" / f"{site.site_id}.pub")
    manifests: dict[str, tuple[str, Manifest]] = {}
    for p in (site.cloud / site.site_id / "manifests").rglob("*"):
        if p.is_file():
            header, payload = crypto.open_sealed(p.read_bytes(), recipient)
            body = crypto.verify_manifest(
                decompress(header.compression, payload, header.plaintext_len), verify_key)
            m = Manifest.from_json(body)
            manifests[m.name] = (p.relative_to(site.cloud).as_posix(), m)

    def chunk_file(name: str, index: int = 0) -> Path:
        return site.cloud / layout.chunk_key(site.site_id, manifests[name][1].chunks[index].id)

    damage: dict[str, tuple[str, str]] = {}  # name -> (what must be named, how)
    for name, size in (("f0.bin", None), ("f1.bin", 10), ("f2.bin", 0),
                       ("f3.bin", crypto.HEADER_SIZE + crypto.TAG_SIZE)):
        path = chunk_file(name)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2 if size is None else size)
        damage[name] = (path.name, "chunk")
    chunk_file("f4.bin").unlink()
    damage["f4.bin"] = (manifests["f4.bin"][1].chunks[0].id, "missing")
    mkey = manifests["f5.bin"][0]
    with open(site.cloud / mkey, "r+b") as f:
        f.truncate(40)
    damage["f5.bin"] = (mkey, "manifest")
    last = chunk_file("multi.bin", len(manifests["multi.bin"][1].chunks) - 1)
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 1)
    damage["multi.bin"] = (last.name, "chunk")

    target = tmp_path / "out"
    for cmd in ("verify", "restore"):
        r = site.verify(check=False) if cmd == "verify" else site.restore(target, check=False)
        assert r.returncode == 1, (cmd, r.stderr)
        rep = report(r)
        assert len(rep["problems"]) == len(damage), rep["problems"]
        assert rep["objects_ok"] == len(files) - len(damage)
        for name, (needle, how) in damage.items():
            if how == "manifest":
                hits = [p for p in rep["problems"] if p["what"] == needle]
            else:
                hits = [p for p in rep["problems"]
                        if name in p["what"] and needle in p["reason"]]
            assert len(hits) == 1, (cmd, name, rep["problems"])
            if how == "missing":
                assert "missing" in hits[0]["reason"]
    restored = tree_digest(target / site.site_id / "files")
    assert set(restored) == {"f6.bin"}
    assert (target / site.site_id / "files" / "f6.bin").read_bytes() == files["f6.bin"]
    assert not [p for p in target.rglob("*") if "tmp" in p.name]


def test_render_toml_round_trips_bad_values() -> None:
    """The bad-config tests rely on the test TOML writer keeping the bad value as written."""
    import tomllib

    data = {"site": {"id": "Camp Alpha"}, "uplink": {"streams": 0}}
    assert tomllib.loads(render_toml(data)) == data
