"""Node side of dependencies: a content-addressed cache and per-computation directories.

Everything a peer sends here is hostile until checked: names go through
:func:`validate_name`, hashes must be 64 lowercase hex digits, sizes are bounded by
``max_file_size`` and ``quota``, content is verified against its SHA-256 before it enters
the cache, and :meth:`FileStore.place` never follows a symlink below the computation
directory. Layout under ``root`` (the node's dest path)::

    root/
      .cache/objects/ab/ab12...ef   verified content, named by SHA-256, mode 0644
      .cache/tmp/                   transfers in progress (emptied when a FileStore opens)
      <comp_id>/                    one directory per computation, mode 0700
        data.csv                    hard link to the cache object (or a copy)
        mypkg/__init__.py

Cache objects are hard-linked into computation directories when the placed mode is 0644
(the object's own mode) and copied otherwise (executables) or when linking fails. A job
that writes to a hard-linked input changes the shared inode; to catch that, every object
carries a fixed mtime (:data:`CACHE_MTIME_NS`) and its recorded size and mode, and an
object that no longer matches is dropped instead of reused. Pass ``hardlink=False`` to
always copy, so jobs can never affect each other through their inputs.

Name rule: "." and empty components are dropped (``"a/./b"`` and ``"a//b"`` become
``"a/b"``, ``"./x"`` becomes ``"x"``); anything else unusual is refused, see
:func:`validate_name`.

One FileStore per root: usage accounting lives in memory. File I/O here is blocking; the
asyncio shell runs it in a thread (the methods are thread-safe).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import re
import secrets
import shutil
import stat
import tempfile
import threading
import unicodedata
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol

from .errors import ConfigurationError, DependencyError

__all__ = [
    "CACHE_DIR",
    "CACHE_MTIME_NS",
    "MAX_COMPONENT_LENGTH",
    "MAX_DEPTH",
    "MAX_NAME_LENGTH",
    "FileStore",
    "IncomingFile",
    "validate_name",
    "validate_comp_id",
]

MAX_NAME_LENGTH = 4096
"""Longest accepted name, in UTF-8 bytes (Linux PATH_MAX)."""
MAX_COMPONENT_LENGTH = 255
"""Longest accepted path component, in UTF-8 bytes (Linux NAME_MAX)."""
MAX_DEPTH = 32
"""Most path components in one name."""
CACHE_DIR = ".cache"
CACHE_MTIME_NS = 946_684_800 * 10**9
"""mtime of every cache object (2000-01-01T00:00Z; after 1980 so zip tools accept it)."""

_OBJECT_MODE = 0o644
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_COMP_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_DRIVE_RE = re.compile(r"[A-Za-z]:")
_TMP_PREFIX = ".clusterpy-tmp-"
_COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# remove_computation relies on this (true on Linux, where rmtree works through fds).
if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover
    raise ImportError("clusterpy.filestore needs a symlink-safe shutil.rmtree (Linux)")


def validate_name(name: str) -> str:
    """Return ``name`` as a normalized relative POSIX path, or refuse it.

    "." and empty components are dropped. Refused, with :class:`DependencyError` naming
    the name and the reason: non-``str``; empty or only "." / "/" components; absolute;
    any ".." component (even one that would stay inside); backslashes; control characters
    (NUL included); lone surrogates (not UTF-8); a Windows drive prefix (``"C:..."``);
    more than :data:`MAX_NAME_LENGTH` bytes, a component over :data:`MAX_COMPONENT_LENGTH`
    bytes, or more than :data:`MAX_DEPTH` components.
    """
    if not isinstance(name, str):
        raise DependencyError(f"unsafe file name {name!r}: not a str")

    def bad(reason: str) -> DependencyError:
        shown = name if len(name) <= 300 else name[:300] + "..."
        return DependencyError(f"unsafe file name {shown!r}: {reason}")

    if not name:
        raise bad("empty")
    if len(name) > MAX_NAME_LENGTH:  # cheap first: a str is never longer than its UTF-8
        raise bad(f"longer than {MAX_NAME_LENGTH} bytes")
    try:
        encoded_len = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad("not valid UTF-8") from None
    if encoded_len > MAX_NAME_LENGTH:
        raise bad(f"longer than {MAX_NAME_LENGTH} bytes")
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            raise bad(f"contains the control character {ch!r}")
    if "\\" in name:
        raise bad("contains a backslash")
    if name.startswith("/"):
        raise bad("absolute path")
    if _DRIVE_RE.match(name):
        raise bad("Windows drive prefix")
    raw = name.split("/")
    if ".." in raw:
        raise bad("contains a '..' component")
    parts = [p for p in raw if p not in ("", ".")]
    if not parts:
        raise bad("names no file")
    if len(parts) > MAX_DEPTH:
        raise bad(f"more than {MAX_DEPTH} levels")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_COMPONENT_LENGTH:
            raise bad(f"a component is longer than {MAX_COMPONENT_LENGTH} bytes")
    return "/".join(parts)


def validate_comp_id(comp_id: str) -> str:
    """Return ``comp_id`` if it is a safe directory name, else raise DependencyError.

    Safe: 1 to 128 of ``[A-Za-z0-9_.-]``, and not ".", ".." or ".cache".
    """
    if not _is_comp_id(comp_id):
        raise DependencyError(
            f"unsafe computation id {comp_id!r}: need 1-128 of [A-Za-z0-9_.-], "
            f"not '.', '..' or {CACHE_DIR!r}"
        )
    return comp_id


def _is_comp_id(comp_id: object) -> bool:
    return (
        isinstance(comp_id, str)
        and _COMP_ID_RE.fullmatch(comp_id) is not None
        and comp_id not in (".", "..", CACHE_DIR)
    )


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise DependencyError(f"invalid sha256 {sha256!r}: need 64 lowercase hex digits")
    return sha256


class _Described(Protocol):
    """A file as a deployment describes it (``protocol.messages.FileMeta``)."""

    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...


class FileStore:
    """The content-addressed cache and computation directories under one ``root``.

    Args:
        root: the node's dest path; created if missing.
        max_file_size: largest file :meth:`begin` accepts, in bytes.
        quota: most bytes the cache may hold, counting transfers in progress.
        hardlink: place cache objects by hard link where possible (else always copy).

    Raises:
        ConfigurationError: a limit is not a positive int, or the cache directories are
            unusable (e.g. a symlink where a directory should be).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_file_size: int = 1 << 30,
        quota: int = 10 << 30,
        hardlink: bool = True,
    ) -> None:
        for label, value in (("max_file_size", max_file_size), ("quota", quota)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"{label} must be a positive int, not {value!r}")
        self.root = pathlib.Path(os.path.abspath(os.fspath(root)))
        self.max_file_size = max_file_size
        self.quota = quota
        self.hardlink = hardlink
        self._objects = self.root / CACHE_DIR / "objects"
        self._tmp = self.root / CACHE_DIR / "tmp"
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # sha256 -> size of each valid cache object
        self._used = 0  # sum of _sizes
        self._reserved = 0  # bytes announced by unfinished IncomingFiles
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in (self.root / CACHE_DIR, self._objects, self._tmp):
                try:
                    d.mkdir(mode=0o700)
                except FileExistsError:
                    pass
                if not stat.S_ISDIR(os.lstat(d).st_mode):
                    raise ConfigurationError(f"{str(d)!r} must be a directory, not a link or file")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot use {str(self.root)!r} as the file store: {exc}"
            ) from exc
        self._scan()

    # --- cache ---------------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        """Return whether a valid object with this hash is cached (a modified one is dropped).

        Raises:
            DependencyError: ``sha256`` is not 64 lowercase hex digits.
        """
        _check_sha(sha256)
        try:
            st = os.lstat(self._object_path(sha256))
        except FileNotFoundError:
            with self._lock:
                self._forget(sha256)
            return False
        if self._valid(sha256, st):
            return True
        self._discard(sha256)
        return False

    def path_of(self, sha256: str) -> pathlib.Path | None:
        """The cached object's path, for reading (a scheduler forwards it to nodes); None if absent."""
        return self._object_path(sha256) if self.has(sha256) else None

    def begin_missing(self, files: Iterable[_Described]) -> dict[str, IncomingFile]:
        """Start receiving each of ``files`` (a deployment's: hash and size) that is not
        cached, once per hash, in hash order: what to ask the sender for.

        Raises:
            DependencyError: as :meth:`begin`; the transfers begun before it are aborted
                (their quota released, their temporary files removed).
        """
        files = list(files)
        sizes = {f.sha256: f.size for f in files}
        incoming: dict[str, IncomingFile] = {}
        try:
            for sha in sorted({f.sha256 for f in files if not self.has(f.sha256)}):
                incoming[sha] = self.begin(sha, sizes[sha])
        except BaseException:
            for started in incoming.values():
                started.abort()
            raise
        return incoming

    def begin(self, sha256: str, size: int) -> IncomingFile:
        """Start receiving a file; its ``size`` bytes count against the quota until it ends.

        Raises:
            DependencyError: bad hash, negative size, ``size > max_file_size``, or the
                transfer would take the cache over its quota.
        """
        _check_sha(sha256)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DependencyError(f"invalid size {size!r} for {sha256}")
        if size > self.max_file_size:
            raise DependencyError(
                f"file {sha256} is {size} bytes; this node accepts at most {self.max_file_size}"
            )
        with self._lock:
            if self._used + self._reserved + size > self.quota:
                raise DependencyError(
                    f"file {sha256} ({size} bytes) would exceed this node's cache quota of "
                    f"{self.quota} bytes ({self._used + self._reserved} in use)"
                )
            self._reserved += size
        try:
            fd, tmp = tempfile.mkstemp(prefix=sha256[:16] + ".", dir=self._tmp)
        except BaseException:
            self._release(size)
            raise
        return IncomingFile(self, sha256, size, fd, tmp)

    def usage(self) -> int:
        """Bytes held by cache objects plus bytes reserved by transfers in progress."""
        with self._lock:
            return self._used + self._reserved

    def prune(self) -> int:
        """Drop cache objects not placed in any computation directory (link count 1).

        Copies do not hold a link, so an object placed only by copy is dropped too. Do not
        run this between a peer's :meth:`has` check and the matching :meth:`place`.
        Returns the bytes freed.
        """
        freed = 0
        with self._lock:
            shas = list(self._sizes)
        for sha in shas:
            try:
                st = os.lstat(self._object_path(sha))
            except FileNotFoundError:
                with self._lock:
                    self._forget(sha)
                continue
            if st.st_nlink == 1 or not self._valid(sha, st):
                freed += self._discard(sha)
        return freed

    # --- computations --------------------------------------------------------------------

    def create_computation_dir(self, comp_id: str) -> pathlib.Path:
        """Create (or reuse) ``root/comp_id``, mode 0700, and return its path.

        Raises:
            DependencyError: ``comp_id`` is unsafe (see :func:`validate_comp_id`), or the
                path exists and is not a directory (a symlink, say).
        """
        path = self.root / validate_comp_id(comp_id)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise DependencyError(f"{str(path)!r} exists and is not a directory") from None
        return path

    def place(self, comp_dir: pathlib.Path, name: str, sha256: str, mode: int) -> pathlib.Path:
        """Put the cached object ``sha256`` at ``comp_dir/name`` and return that path.

        Subdirectories are created (0755) as needed. No symlink below ``comp_dir`` is
        followed: each directory is opened relative to its parent with ``O_NOFOLLOW``, and
        an existing symlink (or directory) at the final name is refused. An existing
        regular file there is replaced atomically. The file gets mode 0755 if ``mode`` has
        any executable bit, else 0644.

        Args:
            comp_dir: a directory returned by :meth:`create_computation_dir`.

        Raises:
            DependencyError: unsafe name, bad hash or mode, the object is not cached (or was
                modified since), or the path runs into a symlink or non-directory.
            ValueError: ``comp_dir`` is not a computation directory of this store.
        """
        rel = validate_name(name)
        _check_sha(sha256)
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise DependencyError(f"cannot place {rel!r}: invalid mode {mode!r}")
        comp_dir = pathlib.Path(os.path.abspath(comp_dir))
        if comp_dir.parent != self.root or not _is_comp_id(comp_dir.name):
            raise ValueError(
                f"{str(comp_dir)!r} is not a computation directory under {str(self.root)!r}"
            )
        perm = 0o755 if mode & 0o111 else 0o644
        parts = rel.split("/")
        obj = self._object_path(sha256)
        try:
            src = os.open(obj, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise DependencyError(f"cannot place {rel!r}: {sha256} is not in the cache") from exc
        dfd = -1
        try:
            st = os.fstat(src)
            if not self._valid(sha256, st):
                with self._lock:
                    known = sha256 in self._sizes
                self._discard(sha256)
                why = "was modified since it was cached" if known else "is not in the cache"
                raise DependencyError(f"cannot place {rel!r}: {sha256} {why}; send it again")
            dfd = os.open(comp_dir, _DIR_FLAGS)
            for i, part in enumerate(parts[:-1]):
                try:
                    os.mkdir(part, 0o755, dir_fd=dfd)
                except FileExistsError:
                    pass
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=dfd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        raise DependencyError(
                            f"cannot place {rel!r}: {where!r} is a symlink or not a directory"
                        ) from None
                    raise
                os.close(dfd)
                dfd = sub
            last = parts[-1]
            try:
                existing = os.stat(last, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(existing.st_mode):
                    raise DependencyError(
                        f"cannot place {rel!r}: it exists and is a "
                        f"{'symlink' if stat.S_ISLNK(existing.st_mode) else 'non-file'}"
                    )
            self._put(src, obj, dfd, last, perm, rel)
        finally:
            os.close(src)
            if dfd >= 0:
                os.close(dfd)
        return comp_dir.joinpath(*parts)

    def remove_computation(self, comp_id: str) -> None:
        """Delete ``root/comp_id`` and all in it; symlinks inside are removed, never followed.

        A missing directory is not an error; if ``root/comp_id`` is itself a symlink, only
        the link is removed. Directories a job made read-only are made writable first.

        Raises:
            DependencyError: ``comp_id`` is unsafe.
            OSError: the tree could not be removed.
        """
        path = self.root / validate_comp_id(comp_id)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return
        try:
            shutil.rmtree(path)  # fd-based on Linux: does not follow symlinks
        except OSError:
            _make_dirs_writable(path)
            shutil.rmtree(path)

    # --- internals -----------------------------------------------------------------------

    def _object_path(self, sha256: str) -> pathlib.Path:
        return self._objects / sha256[:2] / sha256

    def _valid(self, sha256: str, st: os.stat_result) -> bool:
        with self._lock:
            size = self._sizes.get(sha256)
        return (
            size is not None
            and stat.S_ISREG(st.st_mode)
            and st.st_size == size
            and st.st_mtime_ns == CACHE_MTIME_NS
            and stat.S_IMODE(st.st_mode) == _OBJECT_MODE
        )

    def _forget(self, sha256: str) -> int:
        # Caller holds the lock.
        size = self._sizes.pop(sha256, 0)
        self._used -= size
        return size

    def _discard(self, sha256: str) -> int:
        with self._lock:
            size = self._forget(sha256)
        try:
            os.unlink(self._object_path(sha256))
        except FileNotFoundError:
            pass
        return size

    def _release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def _commit(self, incoming: IncomingFile) -> pathlib.Path:
        """Move a verified temp file into the cache (replacing an identical object is harmless)."""
        dest = self._object_path(incoming.sha256)
        dest.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(incoming._tmp, dest)
        with self._lock:
            self._reserved -= incoming.size
            if incoming.sha256 not in self._sizes:
                self._sizes[incoming.sha256] = incoming.size
                self._used += incoming.size
        return dest

    def _scan(self) -> None:
        """Empty tmp/, keep valid objects, drop anything else found under objects/."""
        for entry in os.scandir(self._tmp):
            _remove_entry(entry)
        for fan in os.scandir(self._objects):
            if not (fan.is_dir(follow_symlinks=False) and re.fullmatch(r"[0-9a-f]{2}", fan.name)):
                _remove_entry(fan)
                continue
            for entry in os.scandir(fan.path):
                st = entry.stat(follow_symlinks=False)
                if (
                    _SHA_RE.fullmatch(entry.name)
                    and entry.name.startswith(fan.name)
                    and stat.S_ISREG(st.st_mode)
                    and st.st_mtime_ns == CACHE_MTIME_NS
                    and stat.S_IMODE(st.st_mode) == _OBJECT_MODE
                ):
                    self._sizes[entry.name] = st.st_size
                    self._used += st.st_size
                else:
                    _remove_entry(entry)

    def _put(self, src: int, obj: pathlib.Path, dfd: int, last: str, perm: int, rel: str) -> None:
        """Create ``last`` in ``dfd`` as a link to or copy of the object, via a temp name."""
        tmp = _TMP_PREFIX + secrets.token_hex(8)
        try:
            linked = False
            if self.hardlink and perm == _OBJECT_MODE:
                try:
                    os.link(obj, tmp, dst_dir_fd=dfd, follow_symlinks=False)
                    linked = True
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                        raise
            if not linked:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                out = os.open(tmp, flags, perm, dir_fd=dfd)
                try:
                    _copy_fd(src, out)
                    os.fchmod(out, perm)  # the umask may have narrowed it
                finally:
                    os.close(out)
            try:
                os.rename(tmp, last, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as exc:
                raise DependencyError(f"cannot place {rel!r}: {exc.strerror}") from exc
        finally:
            # Normally gone after the rename; but rename() between two links to the same
            # inode (placing an object where it already is) succeeds without doing anything.
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass


class IncomingFile:
    """A file being received into the cache; from :meth:`FileStore.begin`.

    Call :meth:`write` with the chunks, then :meth:`finish`; or :meth:`abort`. As a context
    manager it aborts on exit unless finished. Any failure removes the temp file and
    releases the quota reservation.
    """

    def __init__(self, store: FileStore, sha256: str, size: int, fd: int, tmp: str) -> None:
        self.sha256 = sha256
        self.size = size
        self._store = store
        self._fd = fd
        self._tmp = tmp
        self._written = 0
        self._hash = hashlib.sha256()
        self._state = "open"

    @property
    def written(self) -> int:
        """Bytes received so far."""
        return self._written

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``.

        Raises:
            DependencyError: the transfer already ended, or the chunk is not bytes-like or
                would take it past ``size`` bytes (the transfer is then aborted).
        """
        self._check_open()
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            self.abort()
            kind = type(chunk).__name__
            raise DependencyError(f"file {self.sha256}: a chunk must be bytes, not {kind}")
        data = memoryview(chunk).cast("B")
        if self._written + data.nbytes > self.size:
            self.abort()
            raise DependencyError(
                f"file {self.sha256}: received more than the announced {self.size} bytes"
            )
        try:
            view = data
            while view:
                view = view[os.write(self._fd, view) :]
        except BaseException:
            self.abort()
            raise
        self._hash.update(data)
        self._written += data.nbytes

    def finish(self) -> pathlib.Path:
        """Verify size and hash, then move the file into the cache; return the object path.

        Raises:
            DependencyError: the transfer already ended, or the size or hash does not match
                (the transfer is then aborted: nothing is left behind).
        """
        self._check_open()
        if self._written != self.size:
            self.abort()
            raise DependencyError(
                f"file {self.sha256}: received {self._written} of the announced {self.size} bytes"
            )
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            self.abort()
            raise DependencyError(f"file {self.sha256}: content hashes to {digest}; rejected")
        try:
            os.fchmod(self._fd, _OBJECT_MODE)
            os.utime(self._fd, ns=(CACHE_MTIME_NS, CACHE_MTIME_NS))
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            path = self._store._commit(self)
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        return path

    def abort(self) -> None:
        """Drop the transfer (idempotent; a no-op once finished)."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        self._store._release(self.size)

    def _check_open(self) -> None:
        if self._state != "open":
            raise DependencyError(f"file {self.sha256}: the transfer is already {self._state}")

    def __enter__(self) -> IncomingFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def _copy_fd(src: int, dst: int) -> None:
    """Copy all of ``src`` (from offset 0) to ``dst``; copy_file_range reflinks where it can."""
    offset = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, _COPY_CHUNK << 4, offset_src=offset)
            if n == 0:
                return
            offset += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(src, offset, os.SEEK_SET)
    while chunk := os.read(src, _COPY_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def _remove_entry(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)


def _make_dirs_writable(top: pathlib.Path) -> None:
    """chmod u+rwx every real directory under ``top`` (checked with lstat; links are skipped)."""

    def fix(path: str) -> None:
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
        except OSError:
            pass

    fix(str(top))
    for dirpath, dirnames, _ in os.walk(top, followlinks=False):
        for d in dirnames:
            fix(os.path.join(dirpath, d))
