"""What a valid config points at, checked against this machine: the second half of validation.

`agent.daemon.site_config` checks the file alone (types, ranges, references between keys, and
that operator key files hold keys). This module checks what `run` needs at start: key files
(present, private, the right kind), state_dir, spool and done folders (usable, not on a kernel
file system, not overlapping each other, the store or the keys), the backend's secrets, the MQTT
password and TLS files. `check-config`, `run` and a reload all go through `load_checked`, so
`check-config` refuses everything `run` would refuse at start, with the same lines:
`<key.path>: <what is wrong> (got <value>); <fix>`.

Nothing here creates, changes or takes a lock on anything: `check-config` may run beside the
daemon, and a refused `run` leaves the machine as it found it.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from agent.config.secrets import others_can_access
from agent.config.settings import BackendSettings, KeySettings, MqttSettings, SecretRef, Settings
from agent.config.table import short
from agent.daemon.site_config import load_settings, summarize
from agent.errors import ConfigError, KeyFileError, SkyferryError
from agent.format.keys import load_dedup_key, load_recipient_public, load_signing_key

# Kernel and device file systems: nothing skyferry keeps or watches belongs there.
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
SECRET_FIX = {
    "file": "give a file only the user skyferry runs as can read (chmod 600), holding the secret",
    "env": "set the variable in the service's environment (systemd: EnvironmentFile=)",
}
KEYGEN_FIX = "create keys with `skyferry keygen --out DIR --site SITE` and point {key} at {file}"


def load_checked(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of `path`, or one ConfigError listing every problem `run` would hit."""
    settings = load_settings(path)
    problems = check_settings(settings, os.environ if environ is None else environ)
    if problems:
        raise ConfigError(problems, str(path))
    return settings


def check_settings(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """Every problem with what `settings` point at, one line each (empty: `run` can start)."""
    problems: list[str] = []
    _check_keys(settings.keys, problems)
    folders = [("site.state_dir", settings.site.state_dir, True)]
    for i, spool in enumerate(settings.spools):
        folders.append((f"spool[{i}].path", spool.path, spool.create))
        if spool.after == "move" and spool.done_dir is not None:
            folders.append((f"spool[{i}].done_dir", spool.done_dir, True))
    for key, path, may_create in folders:
        problem = _folder_problem(key, path, may_create=may_create)
        if problem is not None:
            problems.append(problem)
    problems += _overlaps(settings)
    _check_socket(settings.put.socket, problems)
    _check_backend(settings.backend, environ, problems)
    if settings.mqtt is not None:
        _check_mqtt(settings.mqtt, environ, problems)
    return problems


def check_config_main(path: Path) -> int:
    """`skyferry check-config FILE`: print OK and a summary (0), or every problem (2).

    The same checks as `run` at start: the file, and what it points at.
    """
    try:
        settings = load_checked(path)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    print(f"OK: {path}")
    print(summarize(settings))
    return 0


def print_problems(error: ConfigError, prefix: str = "") -> None:
    """One line per problem on stderr, each naming the file (check-config and run)."""
    where = f"{error.path}: " if error.path else ""
    for problem in error.problems:
        print(f"{prefix}{where}{problem}", file=sys.stderr)


# ---- key files -------------------------------------------------------------------------------

_KEYS: tuple[tuple[str, bool, Callable[[Path], object], str], ...] = (
    ("recipient_public", False, load_recipient_public, "DIR/edge/recipient.pub"),
    ("signing_key", True, load_signing_key, "DIR/edge/site.key"),
    ("dedup_key", True, load_dedup_key, "DIR/edge/dedup.key"),
)


def _check_keys(keys: KeySettings, problems: list[str]) -> None:
    for name, private, load, made in _KEYS:
        key, path = f"keys.{name}", getattr(keys, name)
        problem = _key_file_problem(key, path, private, made)
        if problem is None:
            try:
                load(path)  # what the daemon does at start: its verdict is the last word
            except KeyFileError as e:
                what = str(e).replace(str(path), "the file")
                problem = f"{key}: {what} (got {_got(path)}); point it at {made} from keygen"
        if problem is not None:
            problems.append(problem)


def _key_file_problem(key: str, path: Path, private: bool, made: str) -> str | None:
    """The clearest single problem with a key file before it is parsed, or None."""
    got = _got(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{key}: the file does not exist (got {got}); " + KEYGEN_FIX.format(key=key,
                                                                                   file=made)
    except OSError as e:
        return f"{key}: cannot be looked at: {e.strerror} (got {got}); fix the path"
    if not stat.S_ISREG(st.st_mode):
        return f"{key}: is not a regular file (got {got}); point it at {made} from keygen"
    try:
        head = path.read_bytes()[:4096]
    except OSError as e:
        return (f"{key}: cannot be read: {e.strerror} (got {got}); make it readable by the user "
                f"skyferry runs as (e.g. chown skyferry {path}; chmod 600 {path})")
    if private and b"PUBLIC KEY" in head:
        return (f"{key}: holds a public key, not the private key (got {got}); point it at "
                f"{made} (the private key from keygen)")
    if not private and b"PRIVATE KEY" in head:
        return (f"{key}: holds a private key (got {got}); the site needs only the public "
                f"recipient key {made}: the recipient's private key must never be on the site")
    if private and others_can_access(st.st_mode):
        return (f"{key}: other users can access this private key (got mode "
                f"{stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path} (owned by the user "
                "skyferry runs as)")
    return None


# ---- folders ---------------------------------------------------------------------------------


def _got(path: Path) -> str:
    """A path as the problem line shows it: whole (unlike other values), it is the point."""
    return repr(str(path))


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _pseudo_root(path: Path) -> str | None:
    real = str(_resolved(path))
    return next((r for r in PSEUDO_ROOTS if real == r or real.startswith(r + "/")), None)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a folder"


def _folder_problem(key: str, path: Path, *, may_create: bool) -> str | None:
    """Why `path` cannot serve as a folder skyferry reads and writes, or None."""
    got = _got(path)
    pseudo = _pseudo_root(path)
    if pseudo is not None:
        return (f"{key}: is under {pseudo}, a kernel file system (got {got}); "
                "give a folder on a disk")
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _missing_folder_problem(key, path, may_create)
    except OSError as e:
        return f"{key}: cannot be looked at: {e.strerror} (got {got}); fix the path"
    if not stat.S_ISDIR(st.st_mode):
        return (f"{key}: is {_kind(st.st_mode)}, not a folder (got {got}); give the path of a "
                "folder, or move what is there away")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return (f"{key}: this user cannot read and write in it (got {got}); make it "
                "writable by the user skyferry runs as (chown, or ReadWritePaths= in the unit)")
    return None


def _missing_folder_problem(key: str, path: Path, may_create: bool) -> str | None:
    got = _got(path)
    if not may_create:  # a spool without `create = true`: a typo would ingest nothing, silently
        return (f"{key}: the folder does not exist (got {got}); create it (mkdir -p {path}), "
                "fix the path, or set create = true in this [[spool]] to let skyferry create it")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return (f"{key}: does not exist and cannot be created: {parent} is not a folder this "
                f"user can write in (got {got}); create it (mkdir -p {path}) for the user "
                "skyferry runs as, or fix the path")
    return None


def _relation(a: Path, b: Path) -> str | None:
    """How folder `a` overlaps folder `b` (both resolved), or None."""
    if a == b:
        return "is the same folder as"
    if a.is_relative_to(b):
        return "is inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def _protected(settings: Settings) -> list[tuple[str, Path]]:
    """Folders a spool or done folder must keep away from: the store and the key folders."""
    out = [("site.state_dir", _resolved(settings.site.state_dir))]
    for name, _, _, _ in _KEYS:
        out.append((f"the folder of keys.{name}",
                    _resolved(getattr(settings.keys, name)).parent))
    return out


def _overlaps(settings: Settings) -> list[str]:
    problems: list[str] = []
    protected = _protected(settings)
    spools: list[tuple[str, Path]] = []
    why = ("a spool's files are ingested, then deleted or moved: skyferry would consume its "
           "own queue or keys")
    for i, spool in enumerate(settings.spools):
        key, real = f"spool[{i}].path", _resolved(spool.path)
        others = protected + spools
        for label, other in others:
            rel = _relation(real, other)
            if rel is not None:
                problems.append(f"{key}: {rel} {label} ({other}) (got {_got(spool.path)})"
                                f"; give folders that do not overlap ({why})")
                break
        spools.append((f"spool[{i}].path", real))
    for i, spool in enumerate(settings.spools):
        if spool.after == "move" and spool.done_dir is not None:
            problems += _done_overlap(i, _resolved(spool.done_dir), protected, spools)
    problems += _backend_overlap(settings.backend, protected, spools)
    return problems


def _done_overlap(i: int, done: Path, protected: list[tuple[str, Path]],
                  spools: list[tuple[str, Path]]) -> list[str]:
    key = f"spool[{i}].done_dir"
    own = spools[i][1]
    if done == own or own.is_relative_to(done):
        return [f"{key}: {_relation(done, own)} this spool's path ({own}) (got {_got(done)})"
                "; give a folder outside the spool (or leave done_dir out for <path>/done)"]
    for label, other in protected + [s for j, s in enumerate(spools) if j != i]:
        rel = _relation(done, other)
        if rel is not None:
            return [f"{key}: {rel} {label} ({other}) (got {_got(done)}); moved files "
                    "must land where nothing else reads or deletes them: give another folder"]
    return []


def _backend_overlap(backend: BackendSettings, protected: list[tuple[str, Path]],
                     spools: list[tuple[str, Path]]) -> list[str]:
    parts = urlsplit(backend.url)
    if parts.scheme.lower() != "file":
        return []
    root = _resolved(Path(unquote(parts.path)))
    for label, other in protected[:1] + spools:
        rel = _relation(root, other)
        if rel is not None:
            return [f"backend.url: the cloud folder {rel} {label} ({other}) (got "
                    f"{short(backend.url)}); give a cloud folder apart from the store and the "
                    "spools"]
    return []


def _check_socket(path: Path, problems: list[str]) -> None:
    """The daemon replaces whatever is at the socket path: it must be a socket or nothing."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return
    if not stat.S_ISSOCK(mode):
        problems.append(f"put.socket: is {_kind(mode)} that the daemon would replace with its "
                        f"socket (got {_got(path)}); give a path where nothing else is")


# ---- backend and MQTT secrets ----------------------------------------------------------------


def _check_backend(backend: BackendSettings, environ: Mapping[str, str],
                   problems: list[str]) -> None:
    from agent.backends.registry import open_backend, service_for
    from agent.backends.secrets import read_secret

    parts = urlsplit(backend.url)
    if parts.scheme.lower() == "file":
        problem = _folder_problem("backend.url", Path(unquote(parts.path)), may_create=True)
        problems += [problem] if problem else []
        return
    service = service_for(parts.scheme)
    before = len(problems)
    for name, ref in backend.service.secrets().items():
        if ref is None:
            continue
        key = f"backend.{name}_{ref.source}"
        try:
            value = read_secret(ref, environ, f"backend {name.replace('_', ' ')}")
        except SkyferryError as e:
            problems.append(_secret_problem(key, e, ref))
            continue
        if service is not None:
            problems += filter(None, [service.secret_problem(name, key, ref, value)])
    if service is not None:
        problems += service.environment_problems(backend, environ)
    if len(problems) == before:
        try:
            open_backend(backend, environ)  # what the daemon does at start (no request yet)
        except SkyferryError as e:
            problems.append(f"backend.url: {e} (got {short(backend.url)}); fix [backend]")


def _secret_problem(key: str, e: SkyferryError, ref: SecretRef) -> str:
    """The reader's own message, with a fix when it has none."""
    text = str(e)
    return f"{key}: {text}" if ";" in text else (f"{key}: {text} (got {ref.describe()}); "
                                                 f"{SECRET_FIX[ref.source]}")


def _check_mqtt(mqtt: MqttSettings, environ: Mapping[str, str], problems: list[str]) -> None:
    ref = mqtt.password
    if ref is not None:
        # The rule the MQTT source applies when it connects: set, readable, private.
        key = f"mqtt.password_{ref.source}"
        if ref.source == "env" and environ.get(ref.where) is None:
            problems.append(f"{key}: environment variable {ref.where} is not set (got "
                            f"{ref.describe()}); {SECRET_FIX['env']}")
        elif ref.source == "file":
            path = Path(ref.where)
            try:
                mode = path.stat().st_mode
                path.read_bytes()
            except OSError as e:
                problems.append(f"{key}: cannot be read: {e.strerror} (got {_got(path)}); "
                                f"{SECRET_FIX['file']}")
            else:
                if others_can_access(mode):
                    problems.append(f"{key}: other users can access the password file (got "
                                    f"mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}")
    if mqtt.tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            pem: Path | None = getattr(mqtt.tls, name)
            if pem is not None and not _readable_file(pem):
                problems.append(f"mqtt.tls.{name}: is not a readable file (got "
                                f"{_got(pem)}); give the path of the PEM file")


def _readable_file(path: Path) -> bool:
    try:
        return path.is_file() and os.access(path, os.R_OK)
    except (OSError, ValueError):  # a name too long, a NUL: not a usable file either
        return False
