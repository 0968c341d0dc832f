"""Client side of dependencies: turn ``depends=[...]`` into files and objects to ship.

:func:`collect` accepts, in any mix:

* a path (``str`` or ``os.PathLike``) naming a **file**: shipped under its basename;
* a path naming a **directory**: every file under it, named relative to the directory's
  parent (``"data/sub/x.csv"``); ``__pycache__`` directories, sockets, FIFOs and devices
  are skipped, and so are symlinks that resolve outside the directory or dangle. Symlinks
  that stay inside are shipped as the file or directory they point to (a directory symlink
  that points back at one of its own ancestors is skipped, so loops end);
* a **module**: a plain module's source file (``foo.py``; ``pkg.mod`` becomes
  ``pkg/mod.py``) or, for a package, its whole directory tree (``mypkg/...``), so that a
  module that exists only on the client imports on the node, where the computation
  directory is on ``sys.path``. Builtin, frozen-without-source, extension, sourceless and
  namespace modules raise :class:`~clusterpy.errors.DependencyError`;
* a **function or class**: kept in :attr:`Dependencies.objects`, to be pickled by value
  with the computation.

Every shipped name is checked with :func:`clusterpy.filestore.validate_name`, the rule the
node applies, so an unshippable name fails here and not on a node. The same name twice with
the same content is shipped once; with different content it is an error.

File hashes are memoized per process by (path, device, inode, size, mtime); a file modified
less than a second ago is not memoized, because a second change within the same timestamp
tick would not be seen (git's "racy clean" problem).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import inspect
import os
import stat
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import DependencyError
from .filestore import validate_name

__all__ = ["Dependencies", "FileEntry", "collect", "file_entry", "iter_chunks"]

_HASH_CHUNK = 1 << 20
_MEMO_MAX = 4096
_RACY_SECONDS = 1.0
_ACCEPTED = (
    "a path (str or os.PathLike) to a file or directory, a module with a Python source "
    "file or package directory, a function, or a class"
)


@dataclass(frozen=True)
class FileEntry:
    """One file to ship."""

    name: str
    """Relative POSIX path inside the computation directory, e.g. ``"mypkg/__init__.py"``."""
    path: str
    """Absolute path on the client."""
    size: int
    sha256: str
    """Lowercase hex SHA-256 of the content."""
    mode: int
    """Permission bits (``stat.S_IMODE``); the node keeps only the executable bit."""


@dataclass(frozen=True)
class Dependencies:
    """What :func:`collect` found: files in first-seen order, and objects to pickle."""

    files: tuple[FileEntry, ...]
    objects: tuple[object, ...]

    @property
    def total_size(self) -> int:
        """Bytes in all files."""
        return sum(f.size for f in self.files)


def collect(
    depends: Iterable[object], *, program: str | os.PathLike[str] | None = None
) -> Dependencies:
    """Resolve ``depends`` (and ``program``) into files and objects; see the module docstring.

    Args:
        depends: paths, modules, functions and classes.
        program: a program file the computation runs; shipped under its basename.

    Raises:
        DependencyError: an item of an unsupported kind (the message names it and what is
            accepted), a missing path, a module without a shippable source, an unsafe
            name, or two different files under the same name.
    """
    if isinstance(depends, (str, bytes, os.PathLike)):
        # A lone path would otherwise be iterated character by character.
        raise DependencyError(f"depends must be a list of dependencies, not a single {depends!r}")
    files: dict[str, FileEntry] = {}
    objects: dict[int, object] = {}

    def add(entry: FileEntry) -> None:
        old = files.get(entry.name)
        if old is None:
            files[entry.name] = entry
        elif old.sha256 != entry.sha256:
            raise DependencyError(
                f"two different files would be shipped as {entry.name!r}: "
                f"{old.path!r} and {entry.path!r}"
            )

    if program is not None:
        path = _fspath(program)
        if not os.path.isfile(path):
            raise DependencyError(f"program {path!r} does not exist or is not a file")
        add(file_entry(path))
    for item in depends:
        if isinstance(item, (str, os.PathLike)):
            for entry in _path_entries(_fspath(item)):
                add(entry)
        elif isinstance(item, types.ModuleType):
            for entry in _module_entries(item):
                add(entry)
        elif inspect.isfunction(item) or isinstance(item, type):
            objects.setdefault(id(item), item)
        else:
            raise DependencyError(
                f"cannot ship {item!r} (type {type(item).__qualname__}); "
                f"depends accepts {_ACCEPTED}"
            )
    return Dependencies(files=tuple(files.values()), objects=tuple(objects.values()))


def file_entry(path: str | os.PathLike[str], name: str | None = None) -> FileEntry:
    """Describe one regular file (symlinks are followed), hashing it unless memoized.

    Args:
        path: the file.
        name: its name on the node; defaults to the basename.

    Raises:
        DependencyError: the path is missing or not a regular file, the name is unsafe, or
            the file changed while it was hashed.
    """
    abspath = os.path.abspath(_fspath(path))
    name = validate_name(os.path.basename(abspath) if name is None else name)
    try:
        fd = os.open(abspath, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DependencyError(f"dependency {abspath!r} does not exist") from None
    except OSError as exc:
        raise DependencyError(f"cannot read dependency {abspath!r}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DependencyError(f"dependency {abspath!r} is not a regular file")
        key = (abspath, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = _memo_get(key)
        if digest is None:
            digest = _hash_fd(fd, st.st_size, abspath)
            if time.time_ns() - st.st_mtime_ns > _RACY_SECONDS * 1e9:
                _memo_put(key, digest)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(st.st_mode)
    return FileEntry(name=name, path=abspath, size=st.st_size, sha256=digest, mode=mode)


def iter_chunks(entry: FileEntry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Yield the file's content in chunks of at most ``chunk_size`` bytes.

    Never yields more than ``entry.size`` bytes in total.

    Raises:
        DependencyError: (while iterating) the file is gone, or its size or content no
            longer matches ``entry``; the receiver must then discard what it got.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    try:
        f = open(entry.path, "rb", buffering=0)
    except OSError as exc:
        raise DependencyError(f"cannot read dependency {entry.path!r}: {exc.strerror}") from exc
    with f:
        h = hashlib.sha256()
        remaining = entry.size
        while remaining:
            chunk = f.read(min(chunk_size, remaining))
            if not chunk:
                raise DependencyError(f"dependency {entry.path!r} shrank after it was hashed")
            h.update(chunk)
            remaining -= len(chunk)
            yield chunk
        if f.read(1):
            raise DependencyError(f"dependency {entry.path!r} grew after it was hashed")
    if h.hexdigest() != entry.sha256:
        raise DependencyError(f"dependency {entry.path!r} changed after it was hashed")


# --- paths -------------------------------------------------------------------------------


def _fspath(path: str | os.PathLike[str]) -> str:
    return os.fsdecode(os.fspath(path))


def _path_entries(path: str) -> list[FileEntry]:
    abspath = os.path.abspath(path)
    if os.path.isfile(abspath):
        return [file_entry(abspath)]
    if os.path.isdir(abspath):
        top = os.path.basename(abspath)
        if not top:
            raise DependencyError(f"cannot ship the root directory {path!r}")
        return _dir_entries(abspath, top)
    if os.path.lexists(abspath):
        raise DependencyError(f"dependency {path!r} is neither a regular file nor a directory")
    raise DependencyError(f"dependency {path!r} does not exist")


def _dir_entries(directory: str, prefix: str) -> list[FileEntry]:
    """All files under ``directory``, named ``prefix/relative/path``, in sorted order."""
    root = os.path.realpath(directory)
    out: list[FileEntry] = []

    def inside(real: str) -> bool:
        return real == root or real.startswith(root + os.sep)

    def walk(dirpath: str, name: str, chain: tuple[str, ...]) -> None:
        with os.scandir(dirpath) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            child = f"{name}/{e.name}"
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if not inside(real):
                    continue  # points outside the directory (or dangles into it): skip
                if os.path.isdir(real):
                    if e.name != "__pycache__" and real not in chain:
                        walk(e.path, child, chain + (real,))
                elif os.path.isfile(real):
                    out.append(file_entry(e.path, child))
            elif e.is_dir(follow_symlinks=False):
                if e.name != "__pycache__":
                    walk(e.path, child, chain + (os.path.realpath(e.path),))
            elif e.is_file(follow_symlinks=False):
                out.append(file_entry(e.path, child))

    try:
        walk(directory, prefix, (root,))
    except OSError as exc:
        raise DependencyError(f"cannot read dependency directory {directory!r}: {exc}") from exc
    return out


# --- modules -----------------------------------------------------------------------------


def _module_entries(module: types.ModuleType) -> list[FileEntry]:
    modname = module.__name__
    filename = getattr(module, "__file__", None)
    is_package = hasattr(module, "__path__")
    if not filename:
        kind = "a namespace package" if is_package else "a builtin module or has no file"
        raise DependencyError(
            f"cannot ship module {modname!r}: it is {kind}; ship its files by path"
        )
    filename = os.path.abspath(filename)
    if filename.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        raise DependencyError(
            f"cannot ship module {modname!r}: it is an extension module ({filename!r}); "
            "install it on the nodes instead"
        )
    if not filename.endswith(tuple(importlib.machinery.SOURCE_SUFFIXES)):
        raise DependencyError(f"cannot ship module {modname!r}: {filename!r} is not Python source")
    if not os.path.isfile(filename):
        raise DependencyError(f"cannot ship module {modname!r}: its source {filename!r} is missing")
    # Name by the import path so `import pkg.mod` works on the node; a top-level module
    # (including __main__) is named by its file.
    if is_package:
        return _dir_entries(os.path.dirname(filename), modname.replace(".", "/"))
    if "." in modname:
        return [file_entry(filename, modname.replace(".", "/") + ".py")]
    return [file_entry(filename)]


# --- hashing -----------------------------------------------------------------------------

_memo: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()
_memo_lock = threading.Lock()


def _memo_get(key: tuple[str, int, int, int, int]) -> str | None:
    with _memo_lock:
        digest = _memo.get(key)
        if digest is not None:
            _memo.move_to_end(key)
        return digest


def _memo_put(key: tuple[str, int, int, int, int], digest: str) -> None:
    with _memo_lock:
        _memo[key] = digest
        while len(_memo) > _MEMO_MAX:
            _memo.popitem(last=False)


def _hash_fd(fd: int, size: int, path: str) -> str:
    h = hashlib.sha256()
    total = 0
    while True:
        chunk = os.read(fd, _HASH_CHUNK)
        if not chunk:
            break
        h.update(chunk)
        total += len(chunk)
    if total != size:
        raise DependencyError(f"dependency {path!r} changed while it was being hashed")
    return h.hexdigest()
