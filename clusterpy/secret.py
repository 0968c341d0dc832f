"""The shared cluster secret: there is always one.

Every peer proves it holds the same secret before anything is deserialized, so
:func:`load_secret` never returns "no secret". Where it comes from, first match wins:

1. the ``secret`` argument (``str`` is UTF-8 encoded, used as given);
2. the ``secret_file`` argument;
3. the ``CLUSTERPY_SECRET`` environment variable (surrounding whitespace stripped);
4. the ``CLUSTERPY_SECRET_FILE`` environment variable;
5. the per-user default file, :func:`default_secret_path`, created on first use
   (unless ``create=False``) with 32 random bytes, hex encoded.

A secret file holds the secret as text; surrounding whitespace (a trailing newline) is
stripped. The file must be a regular file that neither group nor others can read or write
(like ``~/.ssh/id_*``), and at most :data:`MAX_SECRET_FILE_SIZE` bytes. The secret itself
must be at least :data:`MIN_SECRET_LENGTH` bytes. To run a cluster over several machines,
copy the same default file (mode 0600) to each of them, or point every peer at one file.
"""

from __future__ import annotations

import errno
import os
import pathlib
import secrets
import stat
import time

from .errors import ConfigurationError

__all__ = [
    "ENV_SECRET",
    "ENV_SECRET_FILE",
    "MIN_SECRET_LENGTH",
    "MAX_SECRET_FILE_SIZE",
    "default_secret_path",
    "load_secret",
]

ENV_SECRET = "CLUSTERPY_SECRET"
ENV_SECRET_FILE = "CLUSTERPY_SECRET_FILE"
MIN_SECRET_LENGTH = 16
#: A secret file larger than this is refused (it is certainly not a secret we wrote).
MAX_SECRET_FILE_SIZE = 64 * 1024
#: Random bytes in a generated secret (stored as twice as many hex digits).
_GENERATED_BYTES = 32
# How long a process that lost the creation race waits for the winner's file to appear
# (only on file systems without hard links, where creation is not a single step).
_RACE_WAIT_SECONDS = 2.0


def default_secret_path() -> pathlib.Path:
    """Return the per-user secret file path.

    ``$XDG_CONFIG_HOME/clusterpy/secret`` if ``XDG_CONFIG_HOME`` is set to an absolute
    path (the XDG spec says to ignore a relative one), else ``~/.config/clusterpy/secret``.
    """
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".config"
    return base / "clusterpy" / "secret"


def load_secret(
    secret: str | bytes | None = None,
    *,
    secret_file: str | os.PathLike[str] | None = None,
    create: bool = True,
) -> bytes:
    """Return the cluster secret as bytes, following the precedence in the module docstring.

    Args:
        secret: the secret itself; wins over everything else.
        secret_file: a file holding the secret; wins over the environment.
        create: create the per-user default file if it is needed and missing.

    Raises:
        ConfigurationError: the secret is empty or shorter than ``MIN_SECRET_LENGTH`` bytes;
            a named secret file is missing, not a regular file, too large, or readable or
            writable by group or others; or the default file is missing and ``create`` is
            false.
    """
    if secret is not None:
        return _check(_to_bytes(secret, "the secret argument"), "the secret argument")
    if secret_file is not None:
        return _read_secret_file(pathlib.Path(os.fspath(secret_file)), "secret_file")
    env_secret = os.environ.get(ENV_SECRET)
    if env_secret is not None:
        where = f"${ENV_SECRET}"
        return _check(_to_bytes(env_secret, where).strip(), where)
    env_file = os.environ.get(ENV_SECRET_FILE)
    if env_file is not None:
        if not env_file.strip():
            raise ConfigurationError(
                f"${ENV_SECRET_FILE} is set but empty; unset it or name a file"
            )
        return _read_secret_file(pathlib.Path(env_file), f"${ENV_SECRET_FILE}")
    path = default_secret_path()
    if create:
        _create_default(path)
    elif not os.path.lexists(path):
        raise ConfigurationError(
            f"no cluster secret: {path} does not exist; pass secret= or secret_file=, "
            f"set ${ENV_SECRET} or ${ENV_SECRET_FILE}, or allow creating the default file"
        )
    return _read_secret_file(path, "the default secret file")


def _to_bytes(value: str | bytes, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ConfigurationError(f"{where} must be str or bytes, not {type(value).__name__}")


def _check(value: bytes, where: str) -> bytes:
    if not value:
        raise ConfigurationError(f"the cluster secret from {where} is empty")
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigurationError(
            f"the cluster secret from {where} is {len(value)} bytes; at least "
            f"{MIN_SECRET_LENGTH} are required (e.g. `python -c \"import secrets; "
            f"print(secrets.token_hex(32))\"`)"
        )
    return value


def _read_secret_file(path: pathlib.Path, where: str) -> bytes:
    """Read, check and strip a secret file; every check is on the opened file (no TOCTOU)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigurationError(f"secret file {str(path)!r} ({where}) does not exist") from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot open secret file {str(path)!r} ({where}): {exc.strerror}"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"secret file {str(path)!r} ({where}) is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"secret file {str(path)!r} ({where}) is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
            )
        if st.st_size > MAX_SECRET_FILE_SIZE:
            raise ConfigurationError(
                f"secret file {str(path)!r} ({where}) is {st.st_size} bytes; "
                f"a secret file may hold at most {MAX_SECRET_FILE_SIZE}"
            )
        data = _read_all(fd, MAX_SECRET_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE_SIZE:
        raise ConfigurationError(f"secret file {str(path)!r} ({where}) grew while being read")
    return _check(data.strip(), f"{where} {str(path)!r}")


def _read_all(fd: int, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, limit - total)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _create_default(path: pathlib.Path) -> None:
    """Create the default secret file unless it exists; safe when processes race.

    The secret is written to a private temporary file which is then hard-linked to its
    final name: ``link()`` fails if the name exists, so the file appears complete or not
    at all and exactly one process wins; the losers read the winner's secret. Where hard
    links are unsupported, the fallback is ``O_CREAT | O_EXCL`` on the final name, and a
    loser waits briefly for the winner to finish writing.
    """
    if os.path.lexists(path):
        return
    directory = path.parent
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the directory {str(directory)!r} for the default secret: {exc.strerror}"
        ) from exc
    content = secrets.token_hex(_GENERATED_BYTES).encode("ascii") + b"\n"
    tmp = directory / f".secret.{secrets.token_hex(8)}.tmp"
    try:
        _write_new(tmp, content)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its secret
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            _create_without_link(path, content)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the default secret file {str(path)!r}: {exc.strerror}"
        ) from exc
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _write_new(path: pathlib.Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_without_link(path: pathlib.Path, content: bytes) -> None:
    try:
        _write_new(path, content)
    except FileExistsError:
        # The winner created the name and may still be writing: wait for a full secret.
        deadline = time.monotonic() + _RACE_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                if path.stat().st_size >= len(content):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.01)
