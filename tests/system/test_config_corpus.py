"""`check-config` refuses everything `run` would refuse at start, naming the key (issue 13, acc. 3).

A corpus of broken configs, each made from a working throw-away site by one change to the file
or to what it points at (key files, folders, secrets). For each: `check-config` exits 2 with one
line per problem naming the key path and a fix, no traceback; `run` gives the same verdict and
starts nothing. Both run in-process through the real CLI entry point (`agent.cli.main.main`); a few
go through `python -m agent` as well. The documented example passes once its paths exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.backends.azure import AZURITE_KEY
from agent.cli import main as cli
from agent.format.keys import generate_keys
from tests.kits.example import EXAMPLE, example_site
from tests.kits.site import Site

BIG = "9" * 400  # the issue's 400-digit numbers
Change = Callable[[Site], None]


def config(changes: dict[str, Any] | Callable[[Site], dict[str, Any]]) -> Change:
    """A change to the config file: `changes` merged into the site's tables (see Site.extra)."""
    def apply(site: Site) -> None:
        site.extra = changes(site) if callable(changes) else changes
        site.write_config()
    return apply


def spools(*entries: Callable[[Site], dict[str, Any]]) -> Change:
    """Replace the [[spool]] list; each entry is built from the site."""
    return config(lambda s: {"spool": [e(s) for e in entries]})


def spool_at(path: Callable[[Site], Path], name: str = "files", **kw: Any
             ) -> Callable[[Site], dict[str, Any]]:
    return lambda s: {"name": name, "path": str(path(s)), **kw}


def chmod(name: str, mode: int) -> Change:
    return lambda s: (s.keys.edge_dir / name).chmod(mode)


def key_points_at(key: str, target: Callable[[Site], Path]) -> Change:
    return config(lambda s: {"keys": {key: str(target(s))}})


def write_key(name: str, data: bytes, mode: int = 0o600) -> Change:
    def apply(site: Site) -> None:
        path = site.keys.edge_dir / name
        path.write_bytes(data)
        path.chmod(mode)
    return apply


def secret_file(site: Site, text: str, mode: int = 0o600) -> str:
    path = site.root / "secret"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def azure(extra: Callable[[Site], dict[str, Any]]) -> Change:
    return config(lambda s: {"backend": {"url": "azure://container", "account": "acct",
                                         **extra(s)}})


def both(*changes: Change) -> Change:
    def apply(site: Site) -> None:
        for c in changes:
            c(site)
    return apply


def make_file(rel: str) -> Change:
    def apply(site: Site) -> None:
        (site.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (site.root / rel).write_bytes(b"x")
    return apply


def state(s: Site) -> Path:
    return s.state


def edge(s: Site) -> Path:
    return s.keys.edge_dir


def symlinked_spool(site: Site) -> None:
    (site.root / "alias").symlink_to(site.spool())
    spools(spool_at(lambda s: s.spool()),
           spool_at(lambda s: s.root / "alias", "other"))(site)


def state_inside_spool(site: Site) -> None:
    config(lambda s: {"site": {"state_dir": str(s.spool() / "st")}})(site)


def done_in_other_spool(site: Site) -> None:
    (site.root / "b").mkdir()
    spools(spool_at(lambda s: s.spool(), after="move", done_dir=str(site.root / "b" / "done")),
           spool_at(lambda s: s.root / "b", "other"))(site)


# (id, change, key path the message must name)
CORPUS: list[tuple[str, Change, str]] = [
    # ---- absurd numbers --------------------------------------------------------------------
    ("size-400-digits", config({"store": {"quota": BIG}}), "store.quota"),
    ("size-400-digit-integer", config({"store": {"quota": int(BIG)}}), "store.quota"),
    ("size-over-max", config({"chunking": {"pack_size": "2048TiB"}}), "chunking.pack_size"),
    ("duration-400-digits", config({"uplink": {"aging": BIG + "s"}}), "uplink.aging"),
    ("duration-bare-400-digits", config({"uplink": {"retry_max": BIG}}), "uplink.retry_max"),
    ("duration-over-max", config({"backend": {"timeout": "4000d"}}), "backend.timeout"),
    ("spool-settle-infinite", spools(spool_at(lambda s: s.spool(), settle=BIG + "h")),
     "spool[0].settle"),
    ("cycle-infinite", config({"windows": {"mode": "schedule",
                                           "cycle": {"open": BIG + "s", "closed": "1s"}}}),
     "windows.cycle.open"),
    ("rate-400-digits", config({"uplink": {"rate": BIG + "Mbit/s"}}), "uplink.rate"),
    ("rate-400-digit-integer", config({"uplink": {"rate": int(BIG)}}), "uplink.rate"),
    ("rate-over-max", config({"uplink": {"rate": "1Tbit/s"}}), "uplink.rate"),
    ("integer-400-digits", config({"uplink": {"streams": int(BIG)}}), "uplink.streams"),
    ("rank-400-digits", config({"classes": {"normal": {"rank": int(BIG)}}}),
     "classes.normal.rank"),
    ("ratio-nan", config({"compression": {"min_ratio": float("nan")}}),
     "compression.min_ratio"),
    ("mqtt-batch-400-digits", config({"mqtt": {"batch": {"max_bytes": BIG}}}),
     "mqtt.batch.max_bytes"),
    # ---- key files -------------------------------------------------------------------------
    ("signing-key-missing", lambda s: (s.keys.edge_dir / "site.key").unlink(),
     "keys.signing_key"),
    ("recipient-missing", lambda s: (s.keys.edge_dir / "recipient.pub").unlink(),
     "keys.recipient_public"),
    ("dedup-missing", lambda s: (s.keys.edge_dir / "dedup.key").unlink(), "keys.dedup_key"),
    ("signing-key-644", chmod("site.key", 0o644), "keys.signing_key"),
    ("signing-key-640", chmod("site.key", 0o640), "keys.signing_key"),
    ("dedup-key-604", chmod("dedup.key", 0o604), "keys.dedup_key"),
    ("public-key-as-signing-key",
     key_points_at("signing_key", lambda s: s.keys.cloud_dir / "sites" / f"{s.site_id}.pub"),
     "keys.signing_key"),
    ("recipient-private-as-public",
     key_points_at("recipient_public", lambda s: s.keys.cloud_dir / "recipient.key"),
     "keys.recipient_public"),
    ("x25519-as-signing-key",
     key_points_at("signing_key", lambda s: s.keys.cloud_dir / "recipient.key"),
     "keys.signing_key"),
    ("signing-key-not-pem", write_key("site.key", b"not a key\n"), "keys.signing_key"),
    ("signing-key-is-a-folder", key_points_at("signing_key", lambda s: s.keys.edge_dir),
     "keys.signing_key"),
    ("dedup-key-not-hex", write_key("dedup.key", b"zz" * 32 + b"\n"), "keys.dedup_key"),
    ("dedup-key-short", write_key("dedup.key", b"ab" * 16 + b"\n"), "keys.dedup_key"),
    # ---- backend and MQTT secrets ----------------------------------------------------------
    ("azure-key-not-base64", azure(lambda s: {"account_key_file": secret_file(s, "no base64!")}),
     "backend.account_key_file"),
    ("azure-key-file-644", azure(lambda s: {"account_key_file": secret_file(s, AZURITE_KEY,
                                                                             0o644)}),
     "backend.account_key_file"),
    ("azure-key-file-missing", azure(lambda s: {"account_key_file": str(s.root / "nope")}),
     "backend.account_key_file"),
    ("azure-key-env-unset", azure(lambda s: {"account_key_env": "SKYFERRY_TEST_UNSET_VAR"}),
     "backend.account_key_env"),
    ("connection-string-bad-key", azure(lambda s: {"connection_string_file": secret_file(
        s, "AccountName=acct;AccountKey=not*base64;EndpointSuffix=core.windows.net")}),
     "backend.connection_string_file"),
    ("s3-secret-env-unset", config({"backend": {
        "url": "s3://bucket", "access_key_id": "AKIA", "region": "us-east-1",
        "secret_access_key_env": "SKYFERRY_TEST_UNSET_VAR"}}),
     "backend.secret_access_key_env"),
    ("mqtt-password-644", config(lambda s: {"mqtt": {
        "username": "u", "password_file": secret_file(s, "pw", 0o644)}}),
     "mqtt.password_file"),
    # ---- state_dir -------------------------------------------------------------------------
    ("state-dir-is-a-file", both(make_file("state"), config({})), "site.state_dir"),
    ("state-dir-under-proc", config({"site": {"state_dir": "/proc/self/skyferry"}}),
     "site.state_dir"),
    ("state-dir-parent-is-a-file", both(make_file("blocker"), config(
        lambda s: {"site": {"state_dir": str(s.root / "blocker" / "state")}})),
     "site.state_dir"),
    # ---- spool paths -----------------------------------------------------------------------
    ("spool-is-a-file", both(make_file("plain"), spools(spool_at(lambda s: s.root / "plain"))),
     "spool[0].path"),
    ("spool-under-proc", spools(spool_at(lambda s: Path("/proc/self/fd"))), "spool[0].path"),
    ("spool-missing", spools(spool_at(lambda s: s.root / "typo")), "spool[0].path"),
    ("spool-missing-create-false", spools(spool_at(lambda s: s.root / "typo", create=False)),
     "spool[0].path"),
    ("spool-is-state-dir", spools(spool_at(state, create=True)), "spool[0].path"),
    ("spool-contains-state-dir", state_inside_spool, "spool[0].path"),
    ("spool-inside-state-dir", spools(spool_at(lambda s: s.state / "in", create=True)),
     "spool[0].path"),
    ("spool-is-key-folder", spools(spool_at(edge)), "spool[0].path"),
    ("spool-contains-key-folder", spools(spool_at(lambda s: s.root / "keys")),
     "spool[0].path"),
    ("spool-inside-spool", spools(spool_at(lambda s: s.spool()),
                                  spool_at(lambda s: s.spool() / "sub", "sub", create=True)),
     "spool[1].path"),
    ("spool-same-via-symlink", symlinked_spool, "spool[1].path"),
    ("done-dir-is-state-dir", spools(spool_at(lambda s: s.spool(), after="move",
                                              done_dir="STATE")),
     "spool[0].done_dir"),
    ("done-dir-in-other-spool", done_in_other_spool, "spool[0].done_dir"),
    ("done-dir-is-spool", spools(spool_at(lambda s: s.spool(), after="move",
                                          done_dir="SPOOL")), "spool[0].done_dir"),
    ("done-dir-is-a-file", both(make_file("donefile"), spools(spool_at(
        lambda s: s.spool(), after="move", done_dir="ROOT/donefile"))), "spool[0].done_dir"),
    ("backend-folder-in-spool", config(lambda s: {"backend": {"url": f"file://{s.spool()}/c"}}),
     "backend.url"),
    ("backend-folder-is-a-file", both(make_file("cloudfile"), config(
        lambda s: {"backend": {"url": f"file://{s.root}/cloudfile"}})), "backend.url"),
    ("put-socket-is-the-key", config(lambda s: {"put": {"socket": str(edge(s) / "site.key")}}),
     "put.socket"),
    ("state-dir-nul", config({"site": {"state_dir": "/var/lib/sky\0ferry"}}), "site.state_dir"),
    ("signing-key-nul", config({"keys": {"signing_key": "keys/site\0.key"}}), "keys.signing_key"),
    ("spool-path-nul", spools(spool_at(lambda s: Path("/srv/spo\0ol"))), "spool[0].path"),
    ("mqtt-ca-file-name-too-long", config({"mqtt": {
        "host": "127.0.0.1", "subscribe": [{"topic": "a/#"}],
        "tls": {"ca_file": "/etc/" + "c" * 300}}}),
     "mqtt.tls.ca_file"),
    ("tle-file-nul", config({"windows": {"mode": "tle", "tle": {
        "files": ["relay\0.tle"], "latitude": 52.5, "longitude": 13.4}}}), "windows.tle.files"),
    ("backend-url-bad-ipv6", config({"backend": {"url": "s3://[bucket/prefix"}}), "backend.url"),
    ("backend-file-url-bad-ipv6", config({"backend": {"url": "file://[::1/srv"}}),
     "backend.url"),
    ("endpoint-bad-ipv6", config({"backend": {"url": "s3://bucket/p",
                                              "endpoint": "http://[::1:9000"}}),
     "backend.endpoint"),
]


def expand(site: Site) -> None:
    """Placeholders some cases use for paths only known once the site exists."""
    text = site.config.read_text()
    text = (text.replace('"STATE"', f'"{site.state}"').replace('"SPOOL"', f'"{site.spool()}"')
            .replace('"ROOT/', f'"{site.root}/'))
    site.config.write_text(text)


PROBLEM_LINE = re.compile(r"^(?:skyferry run: error: )?(?P<file>\S+\.toml): (?P<key>[\w.\[\]-]+)"
                          r": (?P<rest>.+)$")


def verdict(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and the key paths named, one problem a line; no traceback, no other lines."""
    rc = cli.main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    keys = []
    for line in out.err.splitlines():
        m = PROBLEM_LINE.match(line)
        assert m is not None, f"not a `<file>: <key>: <problem>` line: {line!r}"
        assert ";" in m["rest"], f"no fix given: {line!r}"
        keys.append(m["key"])
    return rc, keys


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """`run` must refuse before the daemon starts; a start is recorded, not performed."""
    import agent.daemon.wiring

    started: list[Any] = []

    async def fake_run_daemon(settings: Any, config: Any = None) -> None:
        started.append(settings)

    monkeypatch.setattr(agent.daemon.wiring, "run_daemon", fake_run_daemon)
    monkeypatch.setattr("agent.obs.logs.setup_logging", lambda *a: None)
    return started


def test_corpus_is_large_and_covers_the_issue() -> None:
    assert len(CORPUS) >= 40
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("change", "key"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_check_config_and_run_refuse_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: list[Any],
        change: Change, key: str) -> None:
    site = Site(tmp_path / "site")
    assert verdict(["check-config", str(site.config)], capsys) == (0, [])
    change(site)
    expand(site)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, keys = verdict(["check-config", str(site.config)], capsys)
    assert rc == 2 and key in keys, (rc, keys)
    run_rc, run_keys = verdict(["run", "-c", str(site.config)], capsys)
    assert (run_rc, run_keys) == (rc, keys)
    assert no_daemon == [], "run started the daemon on a config check-config refuses"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_missing_spool_folder_with_create_passes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: list[Any]) -> None:
    site = Site(tmp_path / "site")
    spools(spool_at(lambda s: s.root / "later" / "spool", create=True))(site)
    assert verdict(["check-config", str(site.config)], capsys) == (0, [])
    assert not (site.root / "later").exists(), "check-config must create nothing"
    assert verdict(["run", "-c", str(site.config)], capsys) == (0, [])
    assert len(no_daemon) == 1


def test_the_example_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   no_daemon: list[Any]) -> None:
    path = example_site(tmp_path / "example")
    assert verdict(["check-config", str(path)], capsys) == (0, [])
    assert verdict(["run", "-c", str(path)], capsys) == (0, [])
    assert len(no_daemon) == 1
    # The example's own paths, unchanged, are what `check-config` would see on a fresh
    # machine without keys: refused by key path, not by a traceback.
    rc, keys = verdict(["check-config", str(EXAMPLE)], capsys)
    assert rc == 2 and "keys.signing_key" in keys


@pytest.mark.parametrize("case", ["signing-key-640", "spool-is-state-dir", "rate-400-digits",
                                  "state-dir-under-proc"])
def test_the_real_command_gives_the_same_lines(tmp_path: Path, case: str) -> None:
    """Through `python -m agent` (a fresh interpreter, real exit code and stderr)."""
    change, key = next(c[1:] for c in CORPUS if c[0] == case)
    site = Site(tmp_path / "site")
    change(site)
    expand(site)
    lines = {}
    for args in (["check-config", str(site.config)], ["run", "-c", str(site.config)]):
        r = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(
                               Path(__file__).resolve().parents[2])})
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert f"{site.config}: {key}: " in r.stderr
        lines[args[0]] = [ln.removeprefix("skyferry run: error: ")
                          for ln in r.stderr.splitlines()]
    assert lines["check-config"] == lines["run"]
    assert not site.state.exists()


def test_install_script_modes_are_the_ones_the_agent_accepts(tmp_path: Path) -> None:
    """install.sh tells operators how to install the edge keys; the agent must accept exactly
    that, and the private keys it names must not be readable by the group or others."""
    script = (Path(__file__).resolve().parents[2] / "scripts" / "install.sh").read_text()
    modes: dict[str, int] = {}
    for line in script.splitlines():
        m = re.match(r"\s*install -m (0[0-7]{3})\b.*?((?:\s+edge/\S+)+)", line)
        if m:
            for f in m[2].split():
                modes[f.removeprefix("edge/")] = int(m[1], 8)
    assert set(modes) == {"site.key", "dedup.key", "recipient.pub"}, modes
    assert modes["site.key"] & 0o077 == 0 and modes["dedup.key"] & 0o077 == 0
    assert "0640" not in script.split("cat <<MSG")[1]
    site = Site(tmp_path / "site")
    for name, mode in modes.items():
        (site.keys.edge_dir / name).chmod(mode)
    from agent.daemon.preflight import check_settings, load_checked

    assert check_settings(load_checked(site.config), os.environ) == []


def as_user(uid: int, gid: int, args: list[str]) -> tuple[int, str]:
    """`cli.main(args)` in a forked child running as uid:gid; its exit code and stderr.

    In-process, because the interpreter (under /root here) is not one the user could start;
    the modules it needs are imported by the caller first.
    """
    import contextlib
    import io

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, run the command, report, never return
        rc = 99
        err = io.StringIO()
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(args)
        except BaseException as e:  # reported to the parent as a failure, with its text
            err.write(f"Traceback: {e!r}")
        finally:
            os.write(write_end, err.getvalue().encode())
            os._exit(rc)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as another user")
def test_as_the_service_user_unreadable_keys_and_unwritable_folders_are_named(
        no_daemon: list[Any]) -> None:
    """Run as an unprivileged user (nobody), as the daemon would run: a key it cannot read and
    a state_dir it cannot create are refused by key path, by check-config and run alike."""
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="skyferry-nobody-", dir="/tmp"))
    try:
        top.chmod(0o755)
        site = Site(top / "site")
        locked = top / "root-only"  # root's folder: nobody cannot create state_dir in it
        locked.mkdir(mode=0o755)
        config(lambda s: {"site": {"state_dir": str(locked / "state")}})(site)
        for p in [site.root, *site.root.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
        os.chown(site.keys.edge_dir / "site.key", 0, 0)  # still 0600: root's, not nobody's
        # Loaded before the child drops root (the checks import them lazily).
        import agent.daemon.preflight
        import agent.daemon.wiring

        assert agent.daemon.preflight and agent.daemon.wiring

        lines = {}
        for args in (["check-config", str(site.config)], ["run", "-c", str(site.config)]):
            rc, err = as_user(nobody.pw_uid, nobody.pw_gid, args)
            assert rc == 2 and "Traceback" not in err, err
            lines[args[0]] = [ln.removeprefix("skyferry run: error: ")
                              for ln in err.splitlines()]
        assert lines["check-config"] == lines["run"]
        keys = [ln.split(": ")[1] for ln in lines["run"]]
        assert keys == ["keys.signing_key", "site.state_dir"], lines["run"]
        assert "cannot be read" in lines["run"][0] and "cannot be created" in lines["run"][1]
        assert not (locked / "state").exists()
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("verb", ["verify", "restore"])
def test_a_backend_url_with_an_unbalanced_bracket_is_one_line(
        verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = generate_keys(tmp_path / "keys", "s")
    args = [verb, "--backend", "s3://[bucket/p", "--key", str(keys.cloud_dir / "recipient.key")]
    if verb == "restore":
        args += ["--to", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "s3://[bucket/p: not a URL" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
