"""Restore and verify against what an honest site can produce, a compromised site can sign, and
an attacker holding only the bucket (and recipient.pub) can plant (issue 14).

Objects are sealed and signed directly with the real crypto into a local-folder cloud
(tests/kits/restore.py); restore runs in-process, or as the real CLI where exit codes, one-line
errors or the process's own peak RSS are what is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import UnsafePathError
from agent.format import layout
from agent.format.limits import MAX_CHUNK_PLAINTEXT
from agent.format.manifest import KIND_MQTT_BATCH, NAME_MAX, validate_name
from tests.kits import restore
from tests.kits.restore import SITE, Cloud, forged_zstd, put_raw_manifest, run_cli

# Fixtures shared by the restore tests (tests/kits/restore.py).
keys = restore.keys
cloud = restore.cloud

FILES = Path(SITE) / "files"


def files_below(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def assert_no_temp_files(root: Path) -> None:
    left = [p for p in root.rglob("*") if "skyferry-tmp" in p.name and not p.is_symlink()]
    assert not left, left


def labels(report: object) -> list[str]:
    return [f"{p.what}: {p.reason}" for p in report.problems]  # type: ignore[attr-defined]


# ---- temporary files ---------------------------------------------------------------------------


def test_an_object_named_like_a_temp_file_is_its_own_file(cloud: Cloud, tmp_path: Path) -> None:
    """Today's main wrote x.bin through `.x.bin.skyferry-tmp`, the other object's name."""
    big = os.urandom(3 << 20)  # several chunks: x.bin's temp file is open a while
    cloud.publish("x.bin", big, chunk_size=256 << 10)
    other = b"the other file " * 1000
    for name in (".x.bin.skyferry-tmp", "..x.bin.skyferry-tmp.skyferry-tmp"):
        cloud.publish(name, other)
    out = tmp_path / "out"
    rep = cloud.restore(out)
    assert rep.ok, labels(rep)
    assert rep.objects_ok == 3
    got = files_below(out / FILES)
    assert got == {"x.bin": big, ".x.bin.skyferry-tmp": other,
                   "..x.bin.skyferry-tmp.skyferry-tmp": other}


def test_a_symlink_at_the_old_temp_name_leads_nowhere(cloud: Cloud, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"keep me")
    data = b"restored content\n" * 100
    cloud.publish("x.bin", data)
    cloud.publish("sub/y.bin", data)
    files = tmp_path / "out" / FILES
    (files / "sub").mkdir(parents=True)
    for tmp in (files / ".x.bin.skyferry-tmp", files / "sub" / ".y.bin.skyferry-tmp"):
        tmp.symlink_to(victim)
    rep = cloud.restore(tmp_path / "out")
    assert rep.ok, labels(rep)
    assert victim.read_bytes() == b"keep me"
    assert (files / "x.bin").read_bytes() == data and not (files / "x.bin").is_symlink()
    assert (files / "sub" / "y.bin").read_bytes() == data
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_names_of_restores_temp_form_are_refused_at_ingest() -> None:
    with pytest.raises(UnsafePathError, match="temporary files"):
        validate_name("a/.skyferry-tmp-" + "0f" * 16)
    validate_name("a/.skyferry-tmp-notrandom")  # only the exact form is reserved


# ---- 255-byte names ------------------------------------------------------------------------------


def test_255_byte_names_restore_and_longer_ones_are_refused(cloud: Cloud, tmp_path: Path) -> None:
    long_ascii = "a" * NAME_MAX
    long_utf8 = "é" * (NAME_MAX // 2)  # 254 bytes
    cloud.publish(long_ascii, b"ascii")
    cloud.publish(f"d/{long_utf8}", b"utf8")
    pack = cloud.publish_pack([(f"p/{'b' * NAME_MAX}", b"one"), ("p/small", b"two")])
    too_long = cloud.publish("c" * (NAME_MAX + 1), b"never")
    out = tmp_path / "out"
    rep = cloud.restore(out)
    got = files_below(out / FILES)
    assert got == {long_ascii: b"ascii", f"d/{long_utf8}": b"utf8",
                   f"p/{'b' * NAME_MAX}": b"one", "p/small": b"two"}, labels(rep)
    assert rep.objects_ok == 4 and not rep.ok
    (problem,) = rep.problems
    assert problem.what == too_long.key and "256 bytes" in problem.reason
    assert pack.manifest.entries  # the pack's files each came back on their own
    with pytest.raises(UnsafePathError, match="at most 255"):
        validate_name("x/" + "é" * 128)


# ---- a file and a folder of one name -------------------------------------------------------------


def test_a_file_and_a_later_folder_of_the_same_name(cloud: Cloud, tmp_path: Path) -> None:
    cloud.publish("a", b"file a")
    cloud.publish("a/b", b"file a/b")
    cloud.publish_pack([("p", b"pack p"), ("p/q", b"pack p/q"), ("r", b"pack r")])
    cloud.publish("z", b"file z")
    out = tmp_path / "out"
    rep = cloud.restore(out)
    got = files_below(out / FILES)
    # The newer of each pair is written, the older named; the rest of the pack is restored.
    assert got == {"a/b": b"file a/b", "p/q": b"pack p/q", "r": b"pack r", "z": b"file z"}
    assert rep.objects_ok == len(got) and rep.bytes_ok == sum(map(len, got.values()))
    named = sorted(p.what.split(" (")[0] for p in rep.problems)
    assert named == [f"{SITE}/files/a", f"{SITE}/files/p"], labels(rep)
    assert all("conflicts" in p.reason for p in rep.problems)
    assert_no_temp_files(out)


def test_a_file_already_in_the_way_fails_only_that_file(cloud: Cloud, tmp_path: Path) -> None:
    cloud.publish_pack([("d/x", b"x"), ("e", b"e"), ("f/g", b"g")])
    out = tmp_path / "out"
    (out / FILES).mkdir(parents=True)
    (out / FILES / "d").write_bytes(b"a file where a folder must go")
    (out / FILES / "e").mkdir()  # a folder where a file must go
    rep = cloud.restore(out)
    assert sorted(p.what.split(" (")[0] for p in rep.problems) == [
        f"{SITE}/files/d/x", f"{SITE}/files/e"], labels(rep)
    assert rep.objects_ok == 1 and (out / FILES / "f" / "g").read_bytes() == b"g"
    assert_no_temp_files(out)


def test_a_file_meeting_an_mqtt_batch_is_one_or_the_other(cloud: Cloud, tmp_path: Path) -> None:
    """A spool called `mqtt` and a batch of topic source `t` meet at <site>/mqtt/t/<name>."""
    cloud.publish("t/n.jsonl", b"spool file\n" * 50, source="mqtt")
    cloud.publish("n.jsonl", b'{"m":1}\n' * 70, source="t", kind=KIND_MQTT_BATCH)
    out = tmp_path / "out"
    rep = cloud.restore(out)
    got = files_below(out / SITE)
    assert got == {"mqtt/t/n.jsonl": b'{"m":1}\n' * 70}
    assert rep.objects_ok == 1 and len(rep.problems) == 1, labels(rep)
    assert "mqtt/t/n.jsonl" in rep.problems[0].what and "conflicts" in rep.problems[0].reason


# ---- leftovers and per-file problems -------------------------------------------------------------


def test_absurd_mtimes_are_a_problem_of_that_file(cloud: Cloud, tmp_path: Path) -> None:
    cloud.publish("future", b"f" * 1000, mtime_ns=10**30)
    cloud.publish("past", b"p" * 1000, mtime_ns=-10**30)
    cloud.publish("fine", b"ok")
    pack = cloud.publish_pack([("in-pack-fine", b"1"), ("in-pack-odd", b"2")])
    entries = list(pack.manifest.entries)
    entries[1] = entries[1].__class__(**{**entries[1].__dict__, "mtime_ns": 10**30})
    odd = pack.manifest.__class__(**{**pack.manifest.__dict__, "entries": tuple(entries)})
    (cloud.root / pack.key).unlink()
    cloud.put_manifest(odd)
    out = tmp_path / "out"
    rep = cloud.restore(out)
    assert files_below(out / FILES) == {"fine": b"ok", "in-pack-fine": b"1"}
    assert sorted(p.what.split(" (")[0] for p in rep.problems) == [
        f"{SITE}/files/future", f"{SITE}/files/in-pack-odd", f"{SITE}/files/past"], labels(rep)
    assert all("modification time" in p.reason for p in rep.problems)
    assert rep.objects_ok == 2
    assert_no_temp_files(out)


def test_a_missing_chunk_names_each_file_of_the_pack(cloud: Cloud, tmp_path: Path) -> None:
    files = [(f"f{i:02d}", os.urandom(20_000)) for i in range(12)]
    pack = cloud.publish_pack(files, chunk_size=64 << 10)
    lost = pack.manifest.chunks[2]
    (cloud.root / layout.chunk_key(SITE, lost.id)).unlink()
    out = tmp_path / "out"
    rep = cloud.restore(out)
    restored = files_below(out / FILES)
    named = {p.what.split(" (")[0].rsplit("/", 1)[1] for p in rep.problems}
    # Every file is either back, byte for byte, or named on its own line.
    assert set(restored) | named == {n for n, _ in files} and not set(restored) & named
    assert all(restored[n] == d for n, d in files if n in restored)
    assert rep.objects_ok == len(restored)
    assert all(lost.id in p.reason for p in rep.problems)
    assert_no_temp_files(out)


# ---- memory and crashes driven by the input ------------------------------------------------------

MIB = 1 << 20
RSS_LIMIT = 256 * MIB


def sparse(path: Path, size: int) -> None:
    """A `size`-byte object of zeros that costs no disk (reading it still costs memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def cli(cloud: Cloud, verb: str, *extra: str, out: Path | None = None) -> object:
    args = [verb, "--backend", cloud.url, "--key", str(cloud.keys.recipient_key), "--json",
            *extra]
    if verb == "restore":
        assert out is not None
        args += ["--to", str(out)]
    return run_cli(*args)


def test_garbage_objects_are_refused_by_size_before_reading(cloud: Cloud, tmp_path: Path) -> None:
    """No keys needed: 100 MiB garbage under chunks/ and manifests/ (today: 386 and 847 MiB)."""
    good = cloud.publish("good.bin", b"good" * 1000)
    victim = cloud.publish("victim.bin", os.urandom(100_000))
    sparse(cloud.root / layout.chunk_key(SITE, victim.manifest.chunks[0].id), 100 * MIB)
    garbage = [f"{SITE}/manifests/2026/11/25/garbage-{i}" for i in range(4)]
    for key in garbage:
        sparse(cloud.root / key, 100 * MIB)
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, out=tmp_path / "out")
        assert r.returncode == 1, r.stderr  # type: ignore[attr-defined]
        assert r.peak_rss <= RSS_LIMIT, (verb, r.peak_rss / MIB)  # type: ignore[attr-defined]
        print(f"{verb}: peak RSS {r.peak_rss / MIB:.0f} MiB")  # type: ignore[attr-defined]
        rep = r.report  # type: ignore[attr-defined]
        whats = [p["what"] for p in rep["problems"]]
        assert sorted(w for w in whats if "garbage" in w) == garbage
        assert [w for w in whats if "victim.bin" in w], rep
        assert rep["objects_ok"] == 1
    assert (tmp_path / "out" / FILES / "good.bin").read_bytes() == b"good" * 1000
    assert good.key


def test_forged_plaintext_lengths_cost_no_memory(cloud: Cloud, tmp_path: Path) -> None:
    """Only recipient.pub needed: chunks declaring 128 MiB, manifests declaring 256 MiB."""
    from agent.format import crypto

    good = cloud.publish("good.bin", b"good" * 1000)
    victims = [cloud.publish(f"v{i}.bin", os.urandom(50_000)) for i in range(3)]
    for v in victims:
        cloud.write(layout.chunk_key(SITE, v.manifest.chunks[0].id),
                    forged_zstd(cloud, crypto.KIND_CHUNK, 128 * MIB))
    forged = [f"{SITE}/manifests/2026/11/25/forged-{i}" for i in range(3)]
    blob = forged_zstd(cloud, crypto.KIND_MANIFEST, 256 * MIB)
    for key in forged:
        cloud.write(key, blob)
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, out=tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
        assert r.peak_rss <= RSS_LIMIT, (verb, r.peak_rss / MIB)  # type: ignore[attr-defined]
        print(f"{verb}: peak RSS {r.peak_rss / MIB:.0f} MiB")  # type: ignore[attr-defined]
        rep = r.report  # type: ignore[attr-defined]
        assert rep["objects_ok"] == 1 and len(rep["problems"]) == 6, rep
        for key in forged:
            assert [p for p in rep["problems"] if p["what"] == key and "maximum" in p["reason"]]
    assert good.key


def test_many_largest_forged_manifests_are_read_one_at_a_time(cloud: Cloud,
                                                               tmp_path: Path) -> None:
    """Only recipient.pub needed: eight manifests at the size cap, uncompressed, unsigned."""
    from agent.format import crypto
    from agent.format.limits import MAX_MANIFEST_PLAINTEXT

    good = cloud.publish("good.bin", b"good" * 1000)
    plain = os.urandom(MAX_MANIFEST_PLAINTEXT)
    blob = crypto.seal(plain, cloud.keys.edge.recipient_public, kind=crypto.KIND_MANIFEST,
                       compression=crypto.COMPRESSION_NONE, plaintext_len=len(plain))
    forged = [f"{SITE}/manifests/2026/11/25/big-{i}" for i in range(8)]
    for key in forged:
        cloud.write(key, blob)
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, out=tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
        assert r.peak_rss <= RSS_LIMIT, (verb, r.peak_rss / MIB)  # type: ignore[attr-defined]
        print(f"{verb}: peak RSS {r.peak_rss / MIB:.0f} MiB")  # type: ignore[attr-defined]
        rep = r.report  # type: ignore[attr-defined]
        assert sorted(p["what"] for p in rep["problems"]) == forged, rep
        assert all("signature" in p["reason"] for p in rep["problems"])
        assert rep["objects_ok"] == 1
    assert good.key


def test_a_compromised_sites_signed_absurdities(cloud: Cloud, tmp_path: Path) -> None:
    """A signed 64 GiB chunk, a 1M-chunk-reference manifest, three big legal manifests, a
    naive `created` with --since: each is a named problem; the rest is restored."""
    from agent.format.manifest import ChunkRef

    good = cloud.publish("good.bin", b"good" * 1000)
    huge = cloud.manifest("huge.bin", b"", size=64 << 30, hash="0" * 64,
                          chunks=(ChunkRef("ab" * 32, 0, 64 << 30, "0" * 64),))
    huge_key = cloud.put_manifest(huge)
    naive = cloud.manifest("naive.bin", b"naive", created="2026-11-25T12:00:30")
    naive_key = cloud.put_manifest(naive)
    many = [f'{{"hash":"","id":"{i:x}","length":1,"offset":{i}}}' for i in range(1_000_000)]
    refs_key = put_raw_manifest(cloud, "million.bin", many)  # 47 MB: over the plaintext cap
    tiny_key = put_raw_manifest(cloud, "tiny-refs.bin", many[:200_000])  # 9 MB, too many refs
    # Three manifests just under the caps, whose chunks are missing: each is loaded alone.
    big_keys = [put_raw_manifest(cloud, f"big{j}.bin", [
        f'{{"hash":"{"0" * 64}","id":"{j:02x}{i:062x}","length":1,"offset":{i}}}'
        for i in range(95_000)]) for j in range(3)]
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, "--since", "2026-11-25", out=tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
        assert r.peak_rss <= RSS_LIMIT, (verb, r.peak_rss / MIB)  # type: ignore[attr-defined]
        rep = r.report  # type: ignore[attr-defined]
        by_what = {p["what"]: p["reason"] for p in rep["problems"]}
        assert "more than the format's maximum chunk" in by_what[huge_key]
        assert "huge.bin" in by_what[huge_key]
        assert "time zone" in by_what[naive_key]
        assert "maximum of 16777216" in by_what[refs_key]
        assert "200002 JSON objects" in by_what[tiny_key]  # refs, the body, meta
        assert not set(big_keys) & set(by_what)  # under the caps: loaded, their objects fail
        print(f"{verb}: peak RSS {r.peak_rss / MIB:.0f} MiB")  # type: ignore[attr-defined]
        for j in range(3):
            assert [w for w in by_what if f"big{j}.bin" in w], by_what
        assert rep["objects_ok"] == 1, rep
    assert (tmp_path / "out" / FILES / "good.bin").exists() and good.key


def test_declared_chunk_maximum_is_the_edges() -> None:
    from agent.config.intake import CDC_MAX_CEILING
    from agent.config.settings import ChunkingSettings

    assert MAX_CHUNK_PLAINTEXT == CDC_MAX_CEILING == ChunkingSettings().max_size == 16 * MIB


# ---- silence where an operator needs a signal ----------------------------------------------------


@pytest.mark.parametrize("verb", ["verify", "restore"])
def test_nothing_found_is_not_success(cloud: Cloud, tmp_path: Path, verb: str) -> None:
    cloud.publish("x", b"x")
    r = cli(cloud, verb, "--site", "no-such-site", out=tmp_path / "o1")
    assert r.returncode == 1, r.stdout  # type: ignore[attr-defined]
    (p,) = r.report["problems"]  # type: ignore[attr-defined]
    assert p["what"] == "no-such-site" and "no-such-site/manifests/" in p["reason"]

    empty = tmp_path / "empty-cloud"
    empty.mkdir()
    r = run_cli(verb, "--backend", f"file://{empty}", "--key", str(cloud.keys.recipient_key),
                *(["--to", str(tmp_path / "o2")] if verb == "restore" else []))
    assert r.returncode == 1 and "no site has any manifest" in r.stderr, r.stderr

    missing = tmp_path / "typo"
    r = run_cli(verb, "--backend", f"file://{missing}", "--key", str(cloud.keys.recipient_key),
                *(["--to", str(tmp_path / "o3")] if verb == "restore" else []))
    assert r.returncode == 2 and str(missing) in r.stderr and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not missing.exists()


def test_a_target_that_is_a_file_is_one_line(cloud: Cloud, tmp_path: Path) -> None:
    cloud.publish("x", b"x")
    (tmp_path / "file").write_bytes(b"not a folder")
    r = run_cli("restore", "--backend", cloud.url, "--key", str(cloud.keys.recipient_key),
                "--to", str(tmp_path / "file"))
    assert r.returncode == 2 and "cannot restore into" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "-1", "100000"])
def test_parallel_must_be_sensible(cloud: Cloud, tmp_path: Path, value: str) -> None:
    cloud.publish("x", b"x")
    r = run_cli("restore", "--backend", cloud.url, "--key", str(cloud.keys.recipient_key),
                "--to", str(tmp_path / "out"), "--parallel", value, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--parallel" in lines[0] and value in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_signed_json_that_breaks_the_parser_is_a_problem(cloud: Cloud, tmp_path: Path) -> None:
    """Nesting deeper than the recursion limit, an unparsable `created`: named, not raised."""
    cloud.publish("good.bin", b"good")
    m = cloud.manifest("deep.bin", b"")
    deep_key = cloud.put_manifest(m, b"[" * 200_000 + b"]" * 200_000)
    odd = cloud.manifest("odd-created.bin", b"x", created="yesterday")
    odd_key = cloud.put_manifest(odd)
    rep = cloud.restore(tmp_path / "out")
    by_what = {p.what: p.reason for p in rep.problems}
    assert set(by_what) == {deep_key, odd_key}, labels(rep)
    assert "ISO-8601" in by_what[odd_key]
    assert rep.objects_ok == 1


def test_backend_get_refuses_an_object_over_max_size_unread(tmp_path: Path) -> None:
    import asyncio

    from agent.backends.registry import open_backend
    from agent.errors import ObjectTooLargeError

    sparse(tmp_path / "big", 100 * MIB)
    backend = open_backend(f"file://{tmp_path}")
    with pytest.raises(ObjectTooLargeError, match="104857600 bytes"):
        asyncio.run(backend.get("big", max_size=MIB))
    assert asyncio.run(backend.get("big", max_size=100 * MIB))[:4] == bytes(4)


def test_large_buffers_are_given_back_to_the_system() -> None:
    """The allocator adapter (agent/host/memory.py) takes effect on this (glibc) system."""
    import platform

    from agent.host.memory import fix_malloc_thresholds

    assert fix_malloc_thresholds() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_no_temp_file_outlives_a_cancelled_restore(cloud: Cloud, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmpfile: bool) -> None:
    import asyncio

    import agent.cloud.restore_fs

    if not tmpfile:  # as on a filesystem without O_TMPFILE: a random name, O_EXCL
        monkeypatch.setattr(agent.cloud.restore_fs, "_PROC_FD", str(tmp_path / "no-proc"))
    pub = cloud.publish("slow.bin", os.urandom(200_000), chunk_size=50_000)
    stalled = layout.chunk_key(SITE, pub.manifest.chunks[2].id)
    out = tmp_path / "out"
    restorer = cloud.restorer(parallel=1)
    real_get = restorer.backend.get_buffer
    reached = asyncio.Event()

    async def get_buffer(key: str, max_size: int | None = None) -> memoryview:
        if key == stalled:
            reached.set()
            await asyncio.Event().wait()  # a download that never ends
        return await real_get(key, max_size)

    monkeypatch.setattr(restorer.backend, "get_buffer", get_buffer)

    async def scenario() -> list[str]:
        task = asyncio.create_task(restorer.run(out, show_progress=False))
        await asyncio.wait_for(reached.wait(), 30)
        during = os.listdir(out / FILES)  # the file being written is invisible or temporary
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return during

    during = asyncio.run(scenario())
    assert during == ([] if tmpfile else [n for n in during if n.startswith(".skyferry-tmp-")])
    assert tmpfile or len(during) == 1
    assert os.listdir(out / FILES) == []


@pytest.mark.parametrize("name", ["c" * (NAME_MAX + 1), "d/" + "é" * 128,
                                  ".skyferry-tmp-" + "ab" * 16])
def test_put_refuses_names_restore_could_never_write(make_site: object, tmp_path: Path,
                                                     name: str) -> None:
    """What cannot be restored is refused at ingest, with the reason and what to do."""
    site = make_site()  # type: ignore[operator]
    f = tmp_path / "x.txt"
    f.write_bytes(b"x")
    r = site.cli("put", "-c", str(site.config), str(f), "--name", name, check=False)
    assert r.returncode == 1, r.stdout
    assert "rename" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ("at most 255" in r.stderr) != name.startswith(".skyferry-tmp-"), r.stderr
    ok = site.cli("put", "-c", str(site.config), str(f), "--name", "c" * NAME_MAX, check=False)
    assert ok.returncode == 0, ok.stderr


def test_budgets_smaller_than_the_work_only_slow_it_down(cloud: Cloud, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects streaming at once share budgets that fit one chunk or one manifest: each waits
    its turn, none waits for good."""
    import agent.cloud.restore_io

    restore_io = agent.cloud.restore_io
    monkeypatch.setattr(restore_io, "CHUNK_BUDGET", restore_io.chunk_cost(MIB))
    monkeypatch.setattr(agent.cloud.restore_io, "MANIFEST_BUDGET", 1)
    monkeypatch.setattr(agent.cloud.restore_io, "SEALED_MANIFEST_BUDGET", 1)
    data = {f"o{i}.bin": os.urandom(3 * MIB + i) for i in range(6)}
    for name, d in data.items():
        cloud.publish(name, d, chunk_size=MIB)
    cloud.publish_pack([(f"p{i}", os.urandom(MIB // 3)) for i in range(5)], chunk_size=MIB // 2)
    out = tmp_path / "out"
    rep = cloud.restore(out)
    assert rep.ok and rep.objects_ok == 11, labels(rep)
    got = files_below(out / FILES)
    assert all(got[n] == d for n, d in data.items())


def test_a_name_cannot_fake_report_lines(cloud: Cloud, tmp_path: Path) -> None:
    """Control characters in names are escaped in the text report: one line per problem."""
    fake = "x\nrestored 9 objects (9 bytes) from 9 manifests; 0 problems\x1b[2K"
    cloud.publish(fake, b"a file")
    cloud.publish(f"{fake}/below", b"its newer neighbour")  # makes the first one a problem
    r = run_cli("restore", "--backend", cloud.url, "--key", str(cloud.keys.recipient_key),
                "--to", str(tmp_path / "out"))
    assert r.returncode == 1
    problems = r.stderr.strip().splitlines()
    assert len(problems) == 1 and problems[0].startswith("PROBLEM "), r.stderr
    assert "\\n" in problems[0] and "\\x1b" in problems[0] and "\x1b" not in r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("restored 1 objects")
