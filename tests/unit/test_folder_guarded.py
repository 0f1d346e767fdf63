"""FolderBackend.put_plain_guarded / make_durable (`GuardedPut`): plain files, each replaced only
if what its name holds admits it, judged and renamed under its folder's lock, a batch in one
call; many writers at once leave the newest version."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from agent.backends.folder import XATTR_PREFIX
from agent.backends.protocol import GuardedPut, PlainPut
from agent.backends.registry import open_backend

Admit = Callable[[PlainPut, Mapping[str, str] | None], bool]


def _dest(tmp_path: Path) -> GuardedPut:
    b = open_backend(f"file://{tmp_path / 'dest'}")
    assert isinstance(b, GuardedPut)
    return b


def _staged(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / "stage").mkdir(exist_ok=True)
    path = tmp_path / "stage" / name
    path.write_bytes(data)
    return path


def _newer(mine: int) -> tuple[Admit, list[Mapping[str, str] | None]]:
    """An `admit` that lets in only a version newer than the one held, and what it saw."""
    seen: list[Mapping[str, str] | None] = []

    def admit(put: PlainPut, held: Mapping[str, str] | None) -> bool:
        seen.append(held)
        return held is None or int(held["v"]) < mine

    return admit, seen


def _put(dest: GuardedPut, key: str, src: Path, v: int, admit: Admit) -> bool:
    (done,) = asyncio.run(dest.put_plain_guarded(
        [PlainPut(key, src, {"v": str(v)}, 1_600_000_000 * 10**9)], admit))
    return done


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*#*"))


def test_a_new_name_gets_its_file_with_metadata_and_mtime(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    admit, seen = _newer(1)
    assert _put(dest, "s/f/a.txt", _staged(tmp_path, "a", b"version one"), 1, admit)
    assert seen == [None]
    target = tmp_path / "dest/s/f/a.txt"
    assert target.read_bytes() == b"version one"
    assert os.getxattr(target, XATTR_PREFIX + "v") == b"1"
    assert target.stat().st_mtime_ns == 1_600_000_000 * 10**9
    assert _leftovers(tmp_path / "dest") == []


def test_a_refused_put_changes_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    assert _put(dest, "k", _staged(tmp_path, "5", b"five"), 5, _newer(5)[0])
    old, seen = _newer(3)
    assert not _put(dest, "k", _staged(tmp_path, "3", b"three"), 3, old)
    assert seen == [{"v": "5"}]  # it judged what the name held
    assert (tmp_path / "dest/k").read_bytes() == b"five"
    assert _leftovers(tmp_path / "dest") == []
    assert _put(dest, "k", _staged(tmp_path, "7", b"seven"), 7, _newer(7)[0])
    assert (tmp_path / "dest/k").read_bytes() == b"seven"


def test_many_writers_at_once_leave_the_newest(tmp_path: Path) -> None:
    """40 versions of 4 names, put in random order 16 at a time (threads): each name ends with
    its newest content and metadata, whatever the interleaving."""
    dest = _dest(tmp_path)
    versions = [(name, v) for name in "wxyz" for v in range(1, 11)]
    random.Random(7).shuffle(versions)

    async def go() -> list[bool]:
        slots = asyncio.Semaphore(16)

        async def one(name: str, v: int) -> bool:
            src = _staged(tmp_path, f"{name}{v}", f"{name} v{v}".encode() * 1000)
            async with slots:
                (done,) = await dest.put_plain_guarded(
                    [PlainPut(f"files/{name}", src, {"v": str(v)})], _newer(v)[0])
                return done

        return await asyncio.gather(*[one(n, v) for n, v in versions])

    admitted = asyncio.run(go())
    assert any(admitted) and not all(admitted)  # both kinds happened
    for name in "wxyz":
        target = tmp_path / f"dest/files/{name}"
        assert target.read_bytes() == f"{name} v10".encode() * 1000
        assert os.getxattr(target, XATTR_PREFIX + "v") == b"10"
    assert _leftovers(tmp_path / "dest") == []


def test_a_batch_is_judged_file_by_file(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    assert _put(dest, "b", _staged(tmp_path, "b9", b"nine"), 9, _newer(9)[0])
    puts = [PlainPut(k, _staged(tmp_path, f"{k}5", k.encode() * 5), {"v": "5"})
            for k in ("a", "b", "c")]
    assert asyncio.run(dest.put_plain_guarded(puts, _newer(5)[0])) == [True, False, True]
    assert [(tmp_path / "dest" / k).read_bytes() for k in "abc"] == [b"aaaaa", b"nine",
                                                                     b"ccccc"]
    assert _leftovers(tmp_path / "dest") == []


def test_a_failed_put_names_its_key_and_leaves_nothing(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    (tmp_path / "dest" / "d" / "x").mkdir(parents=True)  # a folder where the file goes
    puts = [PlainPut(k, _staged(tmp_path, k.replace("/", "-"), b"x"), {"v": "1"})
            for k in ("d/ok", "d/x")]
    with pytest.raises(Exception, match="put d/x: a folder is where the file goes"):
        asyncio.run(dest.put_plain_guarded(puts, _newer(1)[0]))
    assert _leftovers(tmp_path / "dest") == []


def test_make_durable_syncs_what_is_there(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    assert _put(dest, "a/b", _staged(tmp_path, "b", b"x"), 1, _newer(1)[0])
    # a key replaced or gone meanwhile is not an error: there is nothing of ours to keep
    asyncio.run(dest.make_durable(["a/b", "a/gone"]))


def test_an_invalid_key_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    admit, seen = _newer(1)
    with pytest.raises(Exception, match="not a valid object key"):
        _put(dest, "a/../b", _staged(tmp_path, "c", b"x"), 1, admit)
    assert seen == [] and not (tmp_path / "dest").joinpath("b").exists()


# Names a site's folder can hold that a folder destination used to refuse: one of the form
# LocalStore keeps for its own staging (`<text>#<digits>`), and names of NAME_MAX bytes, which
# left no room for a temporary suffix (ENAMETOOLONG, retried as if transient, never landed).
ODD_NAMES = ("s/run#1", "s/#7", "s/" + "é" * 127 + "x", "s/" + "n" * 255)


@pytest.mark.parametrize("key", ODD_NAMES)
def test_any_name_a_site_folder_holds_is_a_plain_file(tmp_path: Path, key: str) -> None:
    dest = _dest(tmp_path)
    assert _put(dest, key, _staged(tmp_path, "a", b"first"), 1, _newer(1)[0])
    asyncio.run(dest.make_durable([key]))
    assert _put(dest, key, _staged(tmp_path, "b", b"second"), 2, _newer(2)[0])
    path = tmp_path / "dest" / key
    assert path.read_bytes() == b"second"
    assert os.getxattr(path, XATTR_PREFIX + "v") == b"2"
    assert asyncio.run(dest.head(key)) == (6, {"v": "2"})
    asyncio.run(dest.put_plain(key, b"third", metadata={"v": "3"}))
    assert path.read_bytes() == b"third"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "a temporary file left"


def test_a_record_key_localstore_could_not_read_back_is_refused(tmp_path: Path) -> None:
    dest = _dest(tmp_path)
    with pytest.raises(Exception, match="not a valid object key"):
        asyncio.run(dest.put_if_absent("r/run#1", b"x"))  # type: ignore[attr-defined]
    assert not (tmp_path / "dest" / "r").exists()
    assert asyncio.run(dest.put_if_absent("r/run#1#2", b"x"))  # type: ignore[attr-defined]


def test_a_name_the_file_system_cannot_take_is_refused_at_once_not_retried(
        tmp_path: Path) -> None:
    from agent.errors import PermanentBackendError

    dest = _dest(tmp_path)
    with pytest.raises(PermanentBackendError, match="does not take this name"):
        _put(dest, "s/" + "n" * 256, _staged(tmp_path, "a", b"x"), 1, _newer(1)[0])
    assert _leftovers(tmp_path / "dest") == []


def test_a_temporary_name_is_short_hidden_and_never_listed(tmp_path: Path) -> None:
    """What a killed lander leaves between staging and rename: no lister of ours sees it, and
    tools reading the folder skip it (a leading dot)."""
    from agent.backends.folder import _temp_beside

    dest = _dest(tmp_path)
    assert _put(dest, "s/" + "n" * 255, _staged(tmp_path, "a", b"x"), 1, _newer(1)[0])
    left = _temp_beside(tmp_path / "dest" / "s" / ("n" * 255))
    left.write_bytes(b"staged, never renamed")
    assert left.name.startswith(".#") and len(left.name) == 14

    async def listed() -> list[str]:
        return [i.key async for i in dest.list("s/")]  # type: ignore[attr-defined]

    assert asyncio.run(listed()) == ["s/" + "n" * 255]
