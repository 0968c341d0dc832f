"""load_secret: precedence, the generated default file, and refusals."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from clusterpy.errors import ConfigurationError
from clusterpy.secret import default_secret_path, load_secret

GOOD = "0123456789abcdef-good-secret"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A private HOME and XDG_CONFIG_HOME; no CLUSTERPY_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CLUSTERPY_SECRET", raising=False)
    monkeypatch.delenv("CLUSTERPY_SECRET_FILE", raising=False)
    return home


def write_secret(path, content, mode=0o600):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.chmod(path, mode)
    return path


def test_default_path_follows_xdg_then_home(tmp_path, monkeypatch, home):
    assert default_secret_path() == tmp_path / "xdg" / "clusterpy" / "secret"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_secret_path() == home / ".config" / "clusterpy" / "secret"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # ignored, as the XDG spec says
    assert default_secret_path() == home / ".config" / "clusterpy" / "secret"


def test_precedence(tmp_path, monkeypatch):
    arg_file = write_secret(tmp_path / "arg", "from-secret-file-argument")
    env_file = write_secret(tmp_path / "env", "from-secret-file-environment")
    monkeypatch.setenv("CLUSTERPY_SECRET", "from-secret-environment")
    monkeypatch.setenv("CLUSTERPY_SECRET_FILE", str(env_file))

    assert load_secret(GOOD, secret_file=arg_file) == GOOD.encode()
    assert load_secret(GOOD.encode()) == GOOD.encode()
    assert load_secret(secret_file=arg_file) == b"from-secret-file-argument"
    assert load_secret() == b"from-secret-environment"
    monkeypatch.delenv("CLUSTERPY_SECRET")
    assert load_secret() == b"from-secret-file-environment"
    monkeypatch.delenv("CLUSTERPY_SECRET_FILE")
    generated = load_secret()
    assert generated not in (b"from-secret-file-environment", b"from-secret-environment")
    assert default_secret_path().read_bytes().strip() == generated


def test_env_secret_is_stripped(monkeypatch):
    monkeypatch.setenv("CLUSTERPY_SECRET", f"  {GOOD}\n")
    assert load_secret() == GOOD.encode()


def test_default_file_is_created_private_and_stable():
    path = default_secret_path()
    assert not path.exists()
    first = load_secret()
    assert len(first) == 64 and all(c in b"0123456789abcdef" for c in first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_secret() == first
    assert load_secret(create=False) == first
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp files left


def test_default_file_with_restrictive_umask():
    old = os.umask(0o777)
    try:
        secret = load_secret()
    finally:
        os.umask(old)
    assert load_secret() == secret


def test_racing_creators_agree():
    results: list[bytes] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        try:
            results.append(load_secret())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8 and len(set(results)) == 1


def test_no_create_and_missing_default_refused():
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_secret(create=False)
    assert not default_secret_path().exists()


def test_secret_file_whitespace_stripped(tmp_path):
    path = write_secret(tmp_path / "s", f"\n  {GOOD}  \n\n")
    assert load_secret(secret_file=path) == GOOD.encode()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_group_or_world_accessible_file_refused(tmp_path, mode):
    path = write_secret(tmp_path / "s", GOOD, mode)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {path}"):
        load_secret(secret_file=path)


def test_group_readable_default_file_refused():
    load_secret()
    os.chmod(default_secret_path(), 0o640)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_secret()


def test_short_secret_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigurationError, match="at least 16"):
        load_secret("x" * 15)
    assert load_secret("x" * 16) == b"x" * 16
    path = write_secret(tmp_path / "s", "short\n")
    with pytest.raises(ConfigurationError, match="at least 16"):
        load_secret(secret_file=path)
    monkeypatch.setenv("CLUSTERPY_SECRET", "short")
    with pytest.raises(ConfigurationError, match="at least 16"):
        load_secret()


def test_empty_secret_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigurationError, match="empty"):
        load_secret("")
    path = write_secret(tmp_path / "s", " \n")
    with pytest.raises(ConfigurationError, match="empty"):
        load_secret(secret_file=path)
    monkeypatch.setenv("CLUSTERPY_SECRET", "")
    with pytest.raises(ConfigurationError, match="empty"):
        load_secret()


def test_missing_named_file_names_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "secret"
    with pytest.raises(ConfigurationError, match=str(missing)):
        load_secret(secret_file=missing)
    monkeypatch.setenv("CLUSTERPY_SECRET_FILE", str(missing))
    with pytest.raises(ConfigurationError, match=str(missing)):
        load_secret()
    assert not default_secret_path().exists()  # no silent fallback to the default


def test_directory_and_oversized_file_refused(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load_secret(secret_file=d)
    big = write_secret(tmp_path / "big", b"a" * (1 << 17))
    with pytest.raises(ConfigurationError, match="at most"):
        load_secret(secret_file=big)
