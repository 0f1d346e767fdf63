"""Invariant 6 (the edge cannot read what it queued) and tamper detection (issue 2, acceptance 3).

Every test runs the real CLI and, where it matters, the real daemon as a subprocess, against a
throw-away site whose keys the test generated.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import CryptoError, FormatError
from agent.format import crypto, layout
from agent.format.codec import decompress
from agent.format.keys import load_recipient_private, load_recipient_public, load_verify_key
from agent.format.manifest import Manifest
from tests.kits.site import Site, drop_file, tree_digest

# Small chunks so a test file of a few hundred KiB spans several chunks.
# pack_below 0B: each file its own object, so a test can damage one file's chunk or manifest
# (tests/system/test_packs.py damages packs).
SMALL_CHUNKS = {"chunking": {"min_size": "64KiB", "avg_size": "192KiB", "max_size": "512KiB",
                             "pack_below": "0B"}}
NO_PACKS = {"chunking": {"pack_below": "0B"}}
MakeSite = Callable[..., Site]


# ---- helpers -------------------------------------------------------------------------------


def sealed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def cloud_objects(site: Site) -> dict[str, Path]:
    """Object key -> file, for every object in the local-folder cloud."""
    return {p.relative_to(site.cloud).as_posix(): p for p in sealed_files(site.cloud)}


def open_manifest(site: Site, blob: bytes) -> Manifest:
    """What restore does, with the cloud-side private key: open, check signature, parse."""
    recipient = load_recipient_private(site.recipient_key)
    header, payload = crypto.open_sealed(blob, recipient)
    signed = decompress(header.compression, payload, header.plaintext_len)
    verify_key = load_verify_key(site.keys.cloud_dir / "sites" / f"{site.site_id}.pub")
    return Manifest.from_json(crypto.verify_manifest(signed, verify_key))


def cloud_manifests(site: Site) -> dict[str, tuple[str, Manifest]]:
    """Manifest name -> (cloud key, manifest)."""
    out: dict[str, tuple[str, Manifest]] = {}
    for key, path in cloud_objects(site).items():
        if key.startswith(layout.manifests_prefix(site.site_id)):
            m = open_manifest(site, path.read_bytes())
            out[m.name] = (key, m)
    return out


def flip(path: Path, position: int) -> None:
    """Flip one bit of one byte in place."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def put_direct(site: Site, *files: Path) -> dict[str, str]:
    """`skyferry put` with no daemon running: writes into the store itself. name -> object id.
    One put per file, so each is an object of its own (small files put together are packed)."""
    ids: dict[str, str] = {}
    for f in files:
        r = site.cli("put", "-c", str(site.config), str(f))
        ids.update(re.findall(r"^(.+): accepted as object (\S+)$", r.stdout, re.MULTILINE))
    assert len(ids) == len(files), ids
    return {Path(f).name: oid for f, oid in ids.items()}


def report(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def problems_naming(rep: dict[str, Any], *needles: str) -> list[dict[str, str]]:
    """Problems whose `what` or `reason` mentions every needle."""
    return [p for p in rep["problems"]
            if all(n in p["what"] or n in p["reason"] for n in needles)]


def index_rows(site: Site, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{site.state / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def chunks_of(site: Site, object_id: str) -> list[str]:
    return [r[0] for r in index_rows(
        site, "SELECT chunk_id FROM object_chunks WHERE object_id=? ORDER BY seq", object_id)]


def local_chunk(site: Site, chunk: str) -> Path:
    return site.state / "chunks" / chunk[:2] / chunk


def no_temp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if "skyferry-tmp" in p.name or p.name.endswith(".tmp")]


# ---- invariant 6: a captured site yields ciphertext ----------------------------------------


def edge_key_candidates(edge_dir: Path) -> list[tuple[str, X25519PrivateKey]]:
    """Every X25519 private key a thief could make from what the edge holds, plus a random one.

    The edge must hold no X25519 private key at all; the candidates are what is left to try:
    raw bytes of each key file reinterpreted as an X25519 scalar (the Ed25519 seed, the dedup
    key, the recipient's public key).
    """
    out: list[tuple[str, X25519PrivateKey]] = [("fresh random key", X25519PrivateKey.generate())]
    for path in sorted(edge_dir.iterdir()):
        data = path.read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
        assert not isinstance(key, X25519PrivateKey), f"{path} is an X25519 private key"
        if isinstance(key, Ed25519PrivateKey):
            seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
            out.append((f"{path.name} seed as X25519", X25519PrivateKey.from_private_bytes(seed)))
            continue
        try:
            pub = serialization.load_pem_public_key(data)
        except ValueError:
            pub = None
        if pub is not None:
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            out.append((f"{path.name} as X25519 scalar", X25519PrivateKey.from_private_bytes(raw)))
            continue
        raw = bytes.fromhex(data.decode().strip())  # the dedup key
        assert len(raw) == 32
        out.append((f"{path.name} as X25519 scalar", X25519PrivateKey.from_private_bytes(raw)))
    assert len(out) == 4, [name for name, _ in out]
    return out


def assert_unreadable(blobs: dict[str, bytes], candidates: list[tuple[str, X25519PrivateKey]],
                      secrets_: list[bytes], names: list[bytes]) -> None:
    for where, blob in blobs.items():
        for label, key in candidates:
            try:
                crypto.open_sealed(blob, key)
            except CryptoError:
                continue
            pytest.fail(f"{where} opened with {label}")
        for s in secrets_:
            assert s not in blob, f"plaintext visible in {where}"
        for n in names:
            assert n not in blob, f"file name visible in {where}"


def test_edge_keys_cannot_open_store_or_cloud_and_plaintext_never_shows(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site(extra=SMALL_CHUNKS)
    token = secrets.token_hex(6)
    marker = f"SKYFERRY-CONFIDENTIAL-{token}".encode()
    text_name = f"payroll-{token}.txt"
    bin_name = f"telemetry-{token}.bin"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # Compressible text (zstd would keep the marker as a literal once) and incompressible
    # random data (stored uncompressed: any plaintext slice would show as is).
    text = b"".join(marker + b" quarterly figure %d, nothing to see here\n" % i
                    for i in range(8000))
    noise = bytearray(os.urandom(700_000))
    noise[350_000:350_000 + len(marker)] = marker
    rand = bytes(noise)
    (inbox / text_name).write_bytes(text)
    (inbox / bin_name).write_bytes(rand)
    # Slices of the random file: if any plaintext chunk were stored in the clear, one shows.
    slices = [rand[i:i + 48] for i in range(0, len(rand) - 48, 65_536)]
    secrets_ = [marker, *slices, text[1000:1064]]
    names = [text_name.encode(), bin_name.encode(), token.encode()]
    candidates = edge_key_candidates(site.keys.edge_dir)

    ids = put_direct(site, inbox / text_name, inbox / bin_name)

    # 1. The store, before any upload.
    chunk_files = sealed_files(site.state / "chunks")
    manifest_files = sealed_files(site.state / "manifests")
    assert len(chunk_files) >= 4 and len(manifest_files) == 2
    assert_unreadable({str(p): p.read_bytes() for p in chunk_files + manifest_files},
                      candidates, secrets_, names)
    # The index (and its WAL) hold neither the names nor the data.
    for p in site.state.iterdir():
        if p.is_file():
            raw = p.read_bytes()
            for s in [*secrets_, *names]:
                assert s not in raw, f"{s[:30]!r} visible in {p}"
    # Chunk ids are keyed: the unkeyed hash of a chunk's plaintext is not its id.
    stored_ids = {p.name for p in chunk_files}
    assert crypto.content_hash(text) not in stored_ids
    assert crypto.content_hash(rand[:65_536]) not in stored_ids

    # 2. The cloud, after upload.
    site.start()
    site.wait_drained(expect_objects=2)
    site.stop()
    objects = cloud_objects(site)
    assert sum("/chunks/" in k for k in objects) >= 4
    assert sum("/manifests/" in k for k in objects) == 2
    assert_unreadable({k: p.read_bytes() for k, p in objects.items()},
                      candidates, secrets_, names)
    for key in objects:
        assert token not in key and "payroll" not in key and "telemetry" not in key
    assert not any(marker in p.read_bytes() for p in sealed_files(site.state))
    assert marker not in site.log_path.read_bytes()

    # 3. The cloud side, with the private key, gets everything back byte for byte.
    out = tmp_path / "restored"
    rep = report(site.restore(out))
    assert rep["ok"] and rep["objects_ok"] == 2
    assert (out / site.site_id / "put" / text_name).read_bytes() == text
    assert (out / site.site_id / "put" / bin_name).read_bytes() == rand
    # ...and every manifest really is the one the edge signed for those objects.
    assert {m.object_id for _, m in cloud_manifests(site).values()} == set(ids.values())


# ---- tampered cloud objects ----------------------------------------------------------------

# Where to flip one byte, as a function of the sealed object's length.
HEADER_FIELDS: dict[str, Callable[[int], int]] = {
    "magic": lambda n: 0,
    "version": lambda n: 4,
    "kind": lambda n: 5,
    "algorithm": lambda n: 6,
    "compression": lambda n: 7,
    "plaintext_len": lambda n: 12,
    "ephemeral_key": lambda n: 30,
    "nonce": lambda n: 55,
    "ciphertext_start": lambda n: crypto.HEADER_SIZE,
    "ciphertext_middle": lambda n: (crypto.HEADER_SIZE + n - crypto.TAG_SIZE) // 2,
    "tag": lambda n: n - 1,
}


@dataclass
class Damage:
    name: str
    what: str  # "chunk" or "manifest"
    detail: str


def test_flipped_byte_in_any_cloud_chunk_or_manifest_is_named_and_never_restored(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site(extra=SMALL_CHUNKS)
    files: dict[str, bytes] = {}
    for field_name in HEADER_FIELDS:
        files[f"chunk-{field_name}.bin"] = os.urandom(20_000)
        files[f"manifest-{field_name}.bin"] = os.urandom(20_000)
    files["chunk-multi-last.bin"] = os.urandom(1_500_000)  # several chunks, the last damaged
    files["chunk-multi-first.bin"] = os.urandom(1_500_000)
    for i in range(3):
        files[f"good/ok-{i}.txt"] = (f"good file {i}\n" * 3000).encode()
    files["good/big.bin"] = os.urandom(1_200_000)
    for name, data in files.items():
        drop_file(site.spool(), name, data)
    site.start()
    site.wait_drained(expect_objects=len(files))
    site.stop()

    manifests = cloud_manifests(site)
    assert set(manifests) == set(files)
    damaged: dict[str, Damage] = {}
    for name, (key, m) in manifests.items():
        if name.startswith("chunk-multi-"):
            assert len(m.chunks) >= 3, "the multi-chunk file should span several chunks"
            ref = m.chunks[-1] if name.endswith("last.bin") else m.chunks[0]
            path = site.cloud / layout.chunk_key(site.site_id, ref.id)
            flip(path, HEADER_FIELDS["ciphertext_middle"](path.stat().st_size))
            damaged[name] = Damage(name, "chunk", ref.id)
        elif name.startswith("chunk-"):
            field_name = name.removeprefix("chunk-").removesuffix(".bin")
            assert len(m.chunks) == 1
            path = site.cloud / layout.chunk_key(site.site_id, m.chunks[0].id)
            flip(path, HEADER_FIELDS[field_name](path.stat().st_size))
            damaged[name] = Damage(name, "chunk", m.chunks[0].id)
        elif name.startswith("manifest-"):
            field_name = name.removeprefix("manifest-").removesuffix(".bin")
            path = site.cloud / key
            flip(path, HEADER_FIELDS[field_name](path.stat().st_size))
            damaged[name] = Damage(name, "manifest", key)
    good = {n: d for n, d in files.items() if n not in damaged}
    assert len(damaged) == 2 * len(HEADER_FIELDS) + 2

    def check_named(rep: dict[str, Any]) -> None:
        assert not rep["ok"]
        assert len(rep["problems"]) == len(damaged), rep["problems"]
        for d in damaged.values():
            if d.what == "manifest":
                # The manifest cannot be read, so only its key can be named.
                assert [p for p in rep["problems"] if p["what"] == d.detail], (d, rep)
            else:
                hits = problems_naming(rep, d.name, d.detail)
                assert len(hits) == 1, (d, rep["problems"])
        assert rep["objects_ok"] == len(good)

    v = site.verify(check=False)
    assert v.returncode == 1, v.stderr
    check_named(report(v))

    out = tmp_path / "restored"
    # A previous good copy of a damaged object must survive a failed restore untouched.
    old = out / site.site_id / "files" / "chunk-tag.bin"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"previous version")
    r = site.restore(out, check=False)
    assert r.returncode == 1, r.stderr
    check_named(report(r))
    restored = tree_digest(out / site.site_id / "files")
    assert set(restored) == set(good) | {"chunk-tag.bin"}
    for name in good:
        assert (out / site.site_id / "files" / name).read_bytes() == files[name]
    assert old.read_bytes() == b"previous version"
    assert no_temp_files(out) == []


def test_forged_or_moved_manifest_is_rejected(make_site: MakeSite, tmp_path: Path) -> None:
    """Whoever holds the recipient's public key can seal; only the site's key can sign."""
    site = make_site(extra=NO_PACKS)
    drop_file(site.spool(), "a.txt", b"a" * 5000)
    drop_file(site.spool(), "b.txt", b"b" * 5000)
    site.start()
    site.wait_drained(expect_objects=2)
    site.stop()
    manifests = cloud_manifests(site)
    key_a, m_a = manifests["a.txt"]
    key_b, _ = manifests["b.txt"]

    # Forge: a manifest for a.txt pointing at b's data, signed with a key that is not the site's.
    forged = Manifest(**{**m_a.__dict__, "chunks": manifests["b.txt"][1].chunks})
    body = crypto.sign_manifest(forged.to_json(), Ed25519PrivateKey.generate())
    recipient_pub = load_recipient_public(site.keys.edge_dir / "recipient.pub")
    (site.cloud / key_a).write_bytes(crypto.seal(
        body, recipient_pub, kind=crypto.KIND_MANIFEST, compression=crypto.COMPRESSION_NONE,
        plaintext_len=len(body)))
    # Move: b's genuine manifest copied under another object id.
    moved_key = key_b.rsplit("/", 1)[0] + "/" + "01900000-0000-7000-8000-000000000000"
    (site.cloud / moved_key).write_bytes((site.cloud / key_b).read_bytes())

    r = site.restore(tmp_path / "out", check=False)
    assert r.returncode == 1
    rep = report(r)
    assert {p["what"] for p in rep["problems"]} == {key_a, moved_key}
    assert "signature" in problems_naming(rep, key_a)[0]["reason"]
    assert "moved" in problems_naming(rep, moved_key)[0]["reason"]
    assert set(tree_digest(tmp_path / "out")) == {f"{site.site_id}/files/b.txt"}
    assert (tmp_path / "out" / site.site_id / "files" / "b.txt").read_bytes() == b"b" * 5000


# ---- damaged local chunk files: caught before they leave the site --------------------------


def test_damaged_local_chunk_is_quarantined_not_uploaded(
        make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site(extra=SMALL_CHUNKS)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = {
        "flipped.bin": os.urandom(30_000),
        "truncated.bin": os.urandom(30_000),
        "missing.bin": os.urandom(30_000),
        "multi.bin": os.urandom(1_000_000),  # one middle chunk of several is damaged
        "good-1.bin": os.urandom(30_000),
        "good-2.txt": b"fine data\n" * 5000,
        "good-3.bin": os.urandom(900_000),
    }
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    ids = put_direct(site, *(inbox / n for n in files))  # no daemon: straight into the store

    bad: dict[str, Path] = {}
    for name in ("flipped.bin", "truncated.bin", "missing.bin"):
        (chunk,) = chunks_of(site, ids[name])
        bad[name] = local_chunk(site, chunk)
    multi = chunks_of(site, ids["multi.bin"])
    assert len(multi) >= 3
    bad["multi.bin"] = local_chunk(site, multi[len(multi) // 2])
    flip(bad["flipped.bin"], 200)
    truncate(bad["truncated.bin"], 1000)
    bad["missing.bin"].unlink()
    flip(bad["multi.bin"], bad["multi.bin"].stat().st_size - 1)  # its tag

    site.start()
    site.wait_drained(expect_objects=3)
    site.stop()  # the log line follows the index update: read the log once the daemon is gone
    events = [e for e in site.log_events() if e.get("event") == "chunk_corrupt"]

    # One clear error per damaged chunk, naming the file.
    assert len(events) == len(bad), events
    for name, path in bad.items():
        mine = [e for e in events if str(path) in e["msg"]]
        assert len(mine) == 1, (name, events)
        assert mine[0]["level"] == "error" and mine[0]["chunk"] == path.name
        assert ids[name] in mine[0]["msg"]
    assert "truncated" in next(e["msg"] for e in events if str(bad["truncated.bin"]) in e["msg"])
    assert "missing" in next(e["msg"] for e in events if str(bad["missing.bin"]) in e["msg"])

    # Not uploaded; the objects are marked damaged; the others arrived.
    keys = set(cloud_objects(site))
    for path in bad.values():
        assert layout.chunk_key(site.site_id, path.name) not in keys
    cloud_ids = {k.rsplit("/", 1)[-1] for k in keys if "/manifests/" in k}
    assert cloud_ids == {ids[n] for n in files if n.startswith("good")}
    states = dict(index_rows(site, "SELECT id, state FROM objects"))
    assert {n: states[ids[n]] for n in bad} == dict.fromkeys(bad, "damaged")
    assert site.status()["classes"]["normal"]["items"].get("damaged") == len(bad)

    v = site.verify()
    assert report(v)["ok"] and report(v)["objects_ok"] == 3
    out = tmp_path / "restored"
    site.restore(out)
    assert {n: (out / site.site_id / "put" / n).read_bytes() for n in files
            if n.startswith("good")} == {n: d for n, d in files.items() if n.startswith("good")}
    assert sorted(p.name for p in (out / site.site_id / "put").iterdir()) == [
        "good-1.bin", "good-2.txt", "good-3.bin"]

    # A restart does not report (or try) them again.
    site.start()
    deadline = time.monotonic() + 20
    while sum(e.get("event") == "started" for e in site.log_events()) < 2:
        assert time.monotonic() < deadline, site.log_tail()
        time.sleep(0.1)
    time.sleep(1.5)
    site.stop()
    assert sum(e.get("event") == "chunk_corrupt" for e in site.log_events()) == len(bad)
    # Nothing sent again; only the site's tip (its history, agent/uplink/tips.py) and its
    # heartbeat (agent/uplink/heartbeat.py) may be news.
    news = ("/tips/", "/heartbeats/")
    assert {k for k in cloud_objects(site) if not any(n in k for n in news)} == {
        k for k in keys if not any(n in k for n in news)}


def test_damaged_local_manifest_is_caught_before_upload(make_site: MakeSite,
                                                        tmp_path: Path) -> None:
    site = make_site()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_bytes(b"alpha\n" * 1000)
    (inbox / "b.txt").write_bytes(b"beta\n" * 1000)
    ids = put_direct(site, inbox / "a.txt", inbox / "b.txt")
    flip(site.state / "manifests" / ids["a.txt"], 100)
    site.start()
    site.wait_drained(expect_objects=1)
    site.stop()
    # The edge checks the manifest file against the hash it recorded: one clear error, the
    # object is marked damaged and its manifest never reaches the cloud.
    events = [e for e in site.log_events() if e.get("event") == "manifest_corrupt"]
    assert len(events) == 1 and ids["a.txt"] in events[0]["msg"], events
    assert events[0]["level"] == "error"
    assert ids["a.txt"] not in {m.object_id for _k, m in cloud_manifests(site).values()}
    assert index_rows(site, "SELECT state FROM objects WHERE id=?", ids["a.txt"]) == [
        ("damaged",)]
    rep = report(site.verify())
    assert rep["ok"] and rep["objects_ok"] == 1, rep
    out = tmp_path / "out"
    site.restore(out)
    assert sorted(p.name for p in (out / site.site_id / "put").iterdir()) == ["b.txt"]


# ---- private key permissions ---------------------------------------------------------------


@pytest.mark.parametrize(("key", "mode"), [
    ("site.key", 0o644), ("site.key", 0o640), ("dedup.key", 0o604),
], ids=["site.key-644", "site.key-640", "dedup.key-604"])
def test_agent_refuses_a_readable_private_key(make_site: MakeSite, key: str, mode: int) -> None:
    site = make_site()
    path = site.keys.edge_dir / key
    path.chmod(mode)
    r = site.cli("run", "-c", str(site.config), check=False, timeout=15)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"chmod 600 {path}" in r.stderr
    assert not site.state.exists()


def test_restore_refuses_a_readable_recipient_key(make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site()
    site.recipient_key.chmod(0o644)
    r = site.restore(tmp_path / "out", check=False)
    assert r.returncode == 2
    assert f"chmod 600 {site.recipient_key}" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unsealed_garbage_is_a_format_error_not_a_crash() -> None:
    key = X25519PrivateKey.generate()
    for blob in (b"", b"SKYF", b"x" * 200, crypto.MAGIC + bytes([9]) + b"\0" * 100):
        with pytest.raises(FormatError):
            crypto.open_sealed(blob, key)
