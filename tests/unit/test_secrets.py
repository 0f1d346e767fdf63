"""One rule for secret files, kept by every reader: key files, backend credentials, the MQTT
password (agent/config/secrets.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.backends.secrets import read_secret as backend_secret
from agent.broker.connection import read_secret as mqtt_password
from agent.config.secrets import read_secret
from agent.config.settings import SecretRef
from agent.errors import KeyFileError, PermanentBackendError, SkyferryError, SourceError
from agent.format.keys import load_dedup_key

READERS: dict[str, tuple[Callable[[Path], object], type[SkyferryError]]] = {
    "key file": (load_dedup_key, KeyFileError),
    "backend credential": (lambda p: backend_secret(SecretRef("file", str(p)), {}, "key"),
                           PermanentBackendError),
    "MQTT password": (lambda p: mqtt_password(SecretRef("file", str(p)), {}), SourceError),
}


def secret_file(tmp_path: Path, mode: int, text: str = "s3cret\n") -> Path:
    p = tmp_path / "secret"
    p.write_text(text)
    p.chmod(mode)
    return p


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o610, 0o644])
def test_every_reader_refuses_a_secret_others_can_access(tmp_path: Path, reader: str,
                                                          mode: int) -> None:
    read, error = READERS[reader]
    with pytest.raises(error, match=r"accessible by other users .*chmod 600"):
        read(secret_file(tmp_path, mode))


def test_a_private_file_is_read_whole_or_by_its_first_line(tmp_path: Path) -> None:
    p = secret_file(tmp_path, 0o600, "line one\nline two\n")
    ref = SecretRef("file", str(p))
    assert read_secret(ref, {}, "x") == "line one\nline two"
    assert read_secret(ref, {}, "x", first_line=True) == "line one"
    assert mqtt_password(ref, {}) == "line one"


def test_variables_unset_or_empty(tmp_path: Path) -> None:
    ref = SecretRef("env", "SKYFERRY_TEST_SECRET")
    with pytest.raises(KeyFileError, match="SKYFERRY_TEST_SECRET is not set"):
        read_secret(ref, {}, "x")
    with pytest.raises(KeyFileError, match="is not set"):
        read_secret(ref, {"SKYFERRY_TEST_SECRET": ""}, "x")
    assert read_secret(ref, {"SKYFERRY_TEST_SECRET": " v \n"}, "x") == "v"
    assert mqtt_password(ref, {"SKYFERRY_TEST_SECRET": ""}) == ""  # an empty password is one
    with pytest.raises(SourceError, match="MQTT password: environment variable"):
        mqtt_password(ref, {})


def test_an_empty_file_is_refused_where_a_value_is_needed(tmp_path: Path) -> None:
    p = secret_file(tmp_path, 0o600, "")
    with pytest.raises(PermanentBackendError, match="is empty"):
        backend_secret(SecretRef("file", str(p)), {}, "backend account key")
