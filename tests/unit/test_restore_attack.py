"""Restore and verify attacked where the restore and history work of issue 14 meet: tips read
from a bucket the attacker controls, tips a compromised site signs, and the restore journal
(`<to>/.skyferry/`) against a local user who can write the target folder.

Objects are sealed and signed with the real crypto into a local-folder cloud
(tests/kits/restore.py); the CLI is run where exit codes, tracebacks or peak RSS are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.format import crypto, tips
from tests.kits import restore
from tests.kits.restore import SITE, Cloud, Published, run_cli

# Fixtures shared by the restore tests (tests/kits/restore.py).
keys = restore.keys
cloud = restore.cloud

MIB = 1 << 20
RSS_LIMIT = 256 * MIB
STREAM = "ab" * 16


def cli(cloud: Cloud, verb: str, out: Path | None = None) -> object:
    args = [verb, "--backend", cloud.url, "--key", str(cloud.keys.recipient_key), "--json"]
    if verb == "restore":
        assert out is not None
        args += ["--to", str(out)]
    return run_cli(*args)


def signed_tip(cloud: Cloud, body: bytes) -> bytes:
    """A tip sealed and signed with the site's key, whatever its body says."""
    signed = cloud.keys.edge.signing_key.sign(tips.TIP_CONTEXT + body) + body
    return crypto.seal(signed, cloud.keys.edge.recipient_public, kind=crypto.KIND_TIP,
                       compression=crypto.COMPRESSION_NONE, plaintext_len=len(signed))


def tip_body(highest: str = "1", queued: str = "[]") -> bytes:
    return (f'{{"created":"2026-11-25T12:00:00+00:00","highest":{highest},"n":1,'
            f'"queued":{queued},"site":"{SITE}","stream":"{STREAM}","type":"tip",'
            f'"version":1,"void":[]}}').encode()


# ---- tips ----------------------------------------------------------------------------------------


def test_a_huge_object_at_a_tip_key_is_refused_unread(cloud: Cloud, tmp_path: Path) -> None:
    """No keys needed: 300 MiB of garbage at a tip key was read whole (645 MiB peak RSS)."""
    cloud.publish("good.bin", b"good" * 1000)
    key = tips.tip_key(SITE, STREAM, 1)
    path = cloud.root / key
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(300 * MIB)
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
        assert r.peak_rss <= RSS_LIMIT, (verb, r.peak_rss / MIB)  # type: ignore[attr-defined]
        rep = r.report  # type: ignore[attr-defined]
        assert [p for p in rep["problems"] if p["what"] == key], rep
        assert rep["objects_ok"] == 1


@pytest.mark.parametrize("body", [
    tip_body(highest="9" * 5000),  # beyond the interpreter's int-from-string limit
    tip_body(queued="[" * 100_000 + "]" * 100_000),  # deeper than the recursion limit
], ids=["huge-int", "deep-nesting"])
def test_a_signed_tip_that_breaks_the_json_parser_is_a_problem(cloud: Cloud, tmp_path: Path,
                                                               body: bytes) -> None:
    """A compromised site's signed tip made `verify` a traceback."""
    cloud.publish("good.bin", b"good" * 1000)
    key = tips.tip_key(SITE, STREAM, 1)
    cloud.write(key, signed_tip(cloud, body))
    r = cli(cloud, "verify")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
    rep = r.report  # type: ignore[attr-defined]
    assert [p for p in rep["problems"] if p["what"] == key], rep
    assert rep["objects_ok"] == 1
    assert json.dumps(rep)


# ---- the restore journal, against a local user who can write the target ------------------------


def test_a_journal_folder_swapped_for_a_link_during_restore_is_not_written_through(
        cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.skyferry` was checked when restore started and opened by path with the first file: a
    link planted in between took the journal (and its WAL) outside the target, exit 0."""
    from agent.cloud.restore import Restorer

    cloud.publish("a.txt", b"a")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    write = Restorer.restore_object

    async def planted(self: Restorer, *args: object) -> None:
        (out / ".skyferry").symlink_to(elsewhere)  # after the start, before the first record
        await write(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Restorer, "restore_object", planted)
    rep = cloud.restore(out)
    assert not list(elsewhere.iterdir())
    assert not rep.ok
    assert [p for p in rep.problems if "a.txt" in p.what and "symbolic link" in p.reason], \
        rep.problems


@pytest.mark.parametrize("damage", ["other-columns", "other-types", "not-sqlite"])
def test_a_damaged_or_planted_journal_is_one_clear_problem(cloud: Cloud, tmp_path: Path,
                                                           damage: str) -> None:
    """A journal with other columns or other types (anyone who can write the target can put
    one there; a damaged disk can make one) made restore a traceback."""
    import sqlite3

    cloud.publish("a.txt", b"a")
    out = tmp_path / "out"
    (out / ".skyferry").mkdir(parents=True, mode=0o700)
    path = out / ".skyferry" / "restored.sqlite"
    if damage == "not-sqlite":
        path.write_bytes(b"x" * 8192)
    else:
        db = sqlite3.connect(path)
        if damage == "other-columns":
            db.execute("CREATE TABLE restored (path TEXT PRIMARY KEY, x)")
        else:
            db.execute("CREATE TABLE restored (path TEXT PRIMARY KEY, stream, seq, created, "
                       "object_id)")
            db.execute(f"INSERT INTO restored VALUES ('{SITE}/files/a.txt', 'zz', 'zz', 5, 7)")
        db.commit()
        db.close()
    r = cli(cloud, "restore", out)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr  # type: ignore
    assert "restored.sqlite" in r.stderr + r.stdout  # type: ignore[attr-defined]
    assert not (out / SITE / "files" / "a.txt").exists(), "restored without its rollback check"


def test_a_journal_folder_others_can_write_is_refused(cloud: Cloud, tmp_path: Path) -> None:
    """A `.skyferry` made beforehand by another local user, writable by them: they could swap
    the journal's files under restore. Refused, nothing written into it."""
    cloud.publish("a.txt", b"a")
    out = tmp_path / "out"
    (out / ".skyferry").mkdir(parents=True)
    (out / ".skyferry").chmod(0o777)
    rep = cloud.restore(out)
    assert not rep.ok
    assert [p for p in rep.problems if "writable by other users" in p.reason], rep.problems
    assert not list((out / ".skyferry").iterdir())


# ---- a compromised site's signed absurdities ----------------------------------------------------


@pytest.mark.parametrize("created", [
    "0001-01-01T00:00:00+14:00",  # before year 1 in UTC
    "9999-12-31T23:59:59-14:00",  # after year 9999 in UTC
    "9999-12-31T23:00:00+00:00",  # the next day (version 1's second date folder) is not a date
])
def test_a_signed_created_at_the_end_of_time_is_a_problem(cloud: Cloud, tmp_path: Path,
                                                          created: str) -> None:
    """The history's date-folder rule took the UTC day of `created`: an OverflowError
    traceback out of verify and restore."""
    cloud.publish("good.txt", b"good")
    m = cloud.manifest("bad.txt", b"bad", created=created)
    key = f"{SITE}/manifests/2026/11/25/{m.object_id}"
    cloud.write(key, cloud.seal_manifest(m.to_json()))
    for verb in ("verify", "restore"):
        r = cli(cloud, verb, tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
        rep = r.report  # type: ignore[attr-defined]
        assert [p for p in rep["problems"] if p["what"] == key], rep
        assert rep["objects_ok"] == 1


# ---- history (numbered manifests, tips) ----------------------------------------------------------


def publish_v2(cloud: Cloud, name: str, data: bytes, seq: int, stream: str = STREAM
               ) -> Published:
    """A version 2 manifest numbered `seq` in `stream`, as the site's pipeline signs it."""
    m = cloud.manifest(name, data)
    m = m.numbered(stream, seq, m.created)
    return Published(cloud.put_manifest(m), m, {name: data})


def put_tip(cloud: Cloud, n: int, highest: int, stream: str = STREAM) -> str:
    tip = tips.Tip(SITE, stream, n, cloud.tick(), highest, (), ())
    key = tips.tip_key(SITE, stream, n)
    cloud.write(key, tips.seal_tip(tip, cloud.keys.edge))
    return key


@pytest.mark.parametrize("target", [None, "out"], ids=["verify", "restore"])
def test_a_site_given_twice_is_read_once(cloud: Cloud, tmp_path: Path, target: str | None
                                         ) -> None:
    """`--site camp-alpha --site camp-alpha` read the site twice: each seq was seen twice and
    named "replayed or forged", and every object counted twice."""
    for seq in (1, 2, 3):
        publish_v2(cloud, f"f{seq}", b"x" * seq, seq)
    put_tip(cloud, 1, 3)
    rep = cloud.restore(tmp_path / target if target else None, sites=[SITE, SITE])
    assert rep.ok, rep.problems
    assert (rep.manifests, rep.objects_ok) == (3, 3)


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
def test_a_since_beyond_the_calendar_is_refused_in_one_line(cloud: Cloud, since: str) -> None:
    """Its UTC date folder does not exist: an OverflowError traceback."""
    cloud.publish("a", b"a")
    r = run_cli("verify", "--backend", cloud.url, "--key", str(cloud.keys.recipient_key),
                "--since", since)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--since" in r.stderr and since in r.stderr, r.stderr


def gappy_tip(cloud: Cloud, stream: str, ranges: int, extra: int = 0) -> str:
    """A signed tip whose queued and void lists (`ranges` each, `extra` more queued) leave a
    gap at every other seq."""
    queued = tuple((4 * i + 1, 4 * i + 1) for i in range(ranges + extra))
    void = tuple((4 * i + 3, 4 * i + 3) for i in range(ranges))
    tip = tips.Tip(SITE, stream, 1, cloud.tick(), 4 * (ranges + extra), queued, void)
    key = tips.tip_key(SITE, stream, 1)
    cloud.write(key, tips.seal_tip(tip, cloud.keys.edge))
    return key


def test_signed_tips_claiming_a_gap_at_every_other_seq_are_a_few_lines(
        cloud: Cloud, tmp_path: Path) -> None:
    """A compromised site's tips (400 KB sealed each) said every other seq of 800,000 was
    uploaded: one problem line per gap, 305 MiB peak RSS for one stream, 1081 MiB for four.
    Now each stream's gaps are named up to a bound, then summed; a list longer than a site
    sends (100,000 ranges) refuses the tip."""
    publish_v2(cloud, "a", b"a", 1)
    ranges = tips.MAX_RANGES
    for s in range(4):
        gappy_tip(cloud, f"{s:08x}" + "0" * 24, ranges)
    too_long = gappy_tip(cloud, "f" * 32, ranges, extra=1)
    r = cli(cloud, "verify")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # type: ignore
    assert r.peak_rss <= RSS_LIMIT, r.peak_rss / MIB  # type: ignore[attr-defined]
    print(f"verify: peak RSS {r.peak_rss / MIB:.0f} MiB")  # type: ignore[attr-defined]
    rep = r.report  # type: ignore[attr-defined]
    gaps = [p for p in rep["problems"] if "missing" in p["reason"]]
    assert 4 <= len(gaps) <= 4 * 101, len(gaps)
    # Every stream's gaps are summed up: how many ranges and manifests in all.
    assert all([p for p in gaps if p["what"].endswith(f"stream {s:08x}")
                and f"{2 * ranges} manifests" in p["reason"]] for s in range(4)), gaps[-3:]
    assert [p for p in rep["problems"] if p["what"] == too_long
            and "100001 ranges" in p["reason"]], rep["problems"][-3:]


def test_the_ranges_of_tips_kept_at_once_are_bounded(cloud: Cloud,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stream's tip is kept until every manifest was seen; a compromised site can make
    any number of streams. Beyond the bound a tip is named and its stream not checked."""
    from agent.cloud import history

    monkeypatch.setattr(history, "MAX_RANGES_HELD", 250)
    publish_v2(cloud, "a", b"a", 1)
    keys = [gappy_tip(cloud, f"{s:08x}" + "0" * 24, 50) for s in range(3)]
    rep = cloud.restore(None)
    refused = [p.what for p in rep.problems if "ranges in all" in p.reason]
    assert len(refused) == 1 and refused[0] in keys, rep.problems
    checked = {p.what for p in rep.problems if "missing" in p.reason}
    assert len(checked) == 2, checked  # the other two streams' gaps are named


def test_a_deleted_manifest_is_named_even_behind_planted_garbage(cloud: Cloud) -> None:
    """No keys needed: delete the newest manifest and plant one garbage object among the
    manifests. Gaps no more than the unreadable manifests were not named (they may be those),
    so verify said only "garbage" and never that a manifest was missing."""
    published = [publish_v2(cloud, f"f{seq}", b"x" * seq, seq) for seq in (1, 2, 3)]
    put_tip(cloud, 1, 3)
    (cloud.root / published[2].key).unlink()
    garbage = f"{SITE}/manifests/2026/11/25/{published[2].manifest.object_id[:-1]}0"
    cloud.write(garbage, b"not a manifest" * 10)
    rep = cloud.restore(None)
    assert not rep.ok
    (line,) = [p for p in rep.problems if p.what == garbage]
    assert "manifest 3 missing" in line.reason, rep.problems
    assert len(rep.problems) == 1, rep.problems  # a damaged manifest is still one line
