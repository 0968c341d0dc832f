"""Client side of ``clusterpy.send_file``: write the files jobs send back, safely.

A file arrives as :class:`~clusterpy.protocol.messages.JobFile` pieces from a node we do not
fully trust, so: its name goes through :func:`clusterpy.filestore.validate_name`; every
directory below ``root`` is opened with ``O_NOFOLLOW`` relative to its parent's descriptor (a
symbolic link planted there is refused, never followed); the data goes to a private temporary
file that is renamed over ``root/<job dir>/<name>`` only once complete; and the size is capped
(``max_size``). File I/O here is blocking and runs in the client's event loop: the pieces are
at most 1 MiB each.
"""

from __future__ import annotations

import logging
import os
import secrets

from .errors import ClusterError, FileTooLargeError
from .filestore import _is_comp_id, validate_name

__all__ = ["FileReceiver", "job_dir_name"]

log = logging.getLogger("clusterpy.jobfiles")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Files being received at once (each holds two descriptors); more are refused.
MAX_OPEN = 256


def job_dir_name(job_id: object, key: str) -> str:
    """The directory of a job's files: its id when that is a safe directory name, else its key."""
    text = str(job_id)
    return text if _is_comp_id(text) and not text.startswith(".") else f"job-{key}"


class _Transfer:
    __slots__ = ("dir_fd", "fd", "tmp", "final", "path", "size")

    def __init__(self, dir_fd: int, fd: int, tmp: str, final: str, path: str) -> None:
        self.dir_fd, self.fd, self.tmp, self.final, self.path = dir_fd, fd, tmp, final, path
        self.size = 0


class FileReceiver:
    """Receives files under ``root`` (created on first use, mode 0700).

    Transfers are keyed by the caller (e.g. ``(replica id, attempt, name)``); a key's pieces
    must come in order, which the connection guarantees.
    """

    def __init__(self, root: str | os.PathLike[str], max_size: int) -> None:
        self.root = os.fspath(root)
        self.max_size = max_size
        self._open: dict[tuple[str, int, str], _Transfer] = {}
        self._refused: set[tuple[str, int, str]] = set()  # failed transfers whose pieces still come

    def piece(self, key: tuple[str, int, str], job_dir: str, data: bytes, last: bool,
              error: str | None) -> str | None:
        """Take one piece; returns the file's path once the last piece is in place.

        Raises:
            ClusterError: the transfer failed (``error`` from the node), the name is unsafe,
                the file is over ``max_size`` (FileTooLargeError) or cannot be written; what was
                received of it is removed, and its later pieces are ignored.
        """
        transfer = self._open.get(key)
        if error is not None:
            self._abort(key)
            raise ClusterError(f"file {key[2]!r} was not sent: {error}")
        if transfer is None:
            if key in self._refused:
                if last:
                    self._refused.discard(key)
                return None
            try:
                transfer = self._begin(key, job_dir)
            except ClusterError:
                self._refuse(key, last)
                raise
            except OSError as exc:
                self._refuse(key, last)
                raise ClusterError(f"cannot write file {key[2]!r} under {self.root}: {exc}") from exc
        try:
            if transfer.size + len(data) > self.max_size:
                raise FileTooLargeError(f"file {key[2]!r} is over this client's limit of {self.max_size} bytes "
                                        "(JobCluster(max_file_size=...)); it was discarded")
            view = memoryview(data)
            while view:
                view = view[os.write(transfer.fd, view):]
            transfer.size += len(data)
            if not last:
                return None
            os.close(transfer.fd)
            transfer.fd = -1
            os.replace(transfer.tmp, transfer.final, src_dir_fd=transfer.dir_fd, dst_dir_fd=transfer.dir_fd)
            del self._open[key]
            os.close(transfer.dir_fd)
            return transfer.path
        except (ClusterError, OSError) as exc:
            self._abort(key)
            self._refuse(key, last)
            if isinstance(exc, ClusterError):
                raise
            raise ClusterError(f"cannot write file {key[2]!r} under {self.root}: {exc}") from exc

    def _refuse(self, key: tuple[str, int, str], last: bool) -> None:
        if not last:
            self._refused.add(key)

    def _begin(self, key: tuple[str, int, str], job_dir: str) -> _Transfer:
        if len(self._open) >= MAX_OPEN:
            raise ClusterError(f"file {key[2]!r} refused: {MAX_OPEN} files are being received already")
        name = validate_name(key[2])
        if not _is_comp_id(job_dir):
            raise ClusterError(f"unsafe job directory name {job_dir!r}")
        *parents, base = [job_dir, *name.split("/")]
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parents:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)  # a symlink here: ELOOP, refused
                os.close(fd)
                fd = child
            tmp = f".{base[:200]}.part-{secrets.token_hex(6)}"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        transfer = _Transfer(fd, out, tmp, base, os.path.join(self.root, job_dir, *name.split("/")))
        self._open[key] = transfer
        return transfer

    def _abort(self, key: tuple[str, int, str]) -> None:
        transfer = self._open.pop(key, None)
        if transfer is None:
            return
        if transfer.fd >= 0:
            os.close(transfer.fd)
        try:
            os.unlink(transfer.tmp, dir_fd=transfer.dir_fd)
        except OSError:
            pass
        os.close(transfer.dir_fd)

    def abort_job(self, replica_id: str) -> None:
        """Discard the unfinished transfers of one job's run (it ended or was lost)."""
        if not self._open and not self._refused:  # the common case, once per job: nothing to scan
            return
        for key in [k for k in self._open if k[0] == replica_id]:
            self._abort(key)
        for key in [k for k in self._refused if k[0] == replica_id]:
            self._refused.discard(key)

    def close(self) -> None:
        for key in list(self._open):
            self._abort(key)
