"""Inside a running job: send provisional results and files back to the client.

::

    job (worker process)                 node                        client
    ---------------------------------    -------------------------   ------------------------------
    provisional_result(v)  --frame-->    WorkerPool on_message  -->  JobProgress -> job.status is
                                         (opaque bytes)              ProvisionalResult, callback(job)
    send_file(path)        --frames-->   size checked again     -->  JobFile chunks -> written to
      (chunks of 1 MiB)                                              files_dir/<job id>/<name>
    return value           --"done"->    JobDone                -->  the final result

Everything a job sends travels on its worker's private channel in order, and the node forwards
it on the client's connection in the same order: provisional results and files always arrive
before the job's final result. Both calls block only while the data is copied into the
channel; they raise :class:`RuntimeError` outside a clusterpy job.

This module is imported by workers: it stays light (no asyncio, nothing from the client).
It also holds the worker's side of ``only_if`` (the :data:`DROPPED` marker), of
``return_files`` (a private working directory per job) and the ``corrupt-results`` fault
injection used to test verification.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from typing import Any, Callable, Iterator

from .errors import FileTooLargeError

__all__ = ["provisional_result", "send_file", "DROPPED", "DEFAULT_MAX_SEND_FILE", "FILE_CHUNK"]

#: Default largest file a job may send back (a node's ``--max-send-file``).
DEFAULT_MAX_SEND_FILE = 64 * 1024 * 1024
#: Bytes per channel frame and per JobFile message.
FILE_CHUNK = 1 << 20
#: Most files ``return_files`` brings back from one job.
MAX_RETURNED_FILES = 1000
#: Directory (under the computation's) holding the private directories of return_files jobs.
JOBS_DIR = ".clusterpy-jobs"


class _Dropped:
    """The result of a job (or map item) that ``only_if`` rejected on the node."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "clusterpy.progress.DROPPED"

    def __reduce__(self) -> str:
        return "DROPPED"  # pickles as a reference to this module's singleton


#: Stands for a result dropped on the node by ``only_if`` (the client shows ``None``).
DROPPED = _Dropped()


def _channel() -> tuple[Any, str]:
    worker = sys.modules.get("clusterpy.worker")
    job_id = getattr(worker, "current_job_id", None)
    if worker is None or job_id is None or getattr(worker, "job_send", None) is None:
        raise RuntimeError("clusterpy.provisional_result and clusterpy.send_file work only inside a running clusterpy job")
    return worker, job_id


def provisional_result(value: Any) -> None:
    """Send ``value`` to the client now, as an intermediate result of the running job.

    The client sets the job's status to ``ProvisionalResult`` and its ``result`` to ``value``
    and calls the cluster's ``callback(job)``; the job goes on. Values arrive in the order
    they were sent, all before the job's final result.

    Raises:
        RuntimeError: not called inside a clusterpy job.
        pickle.PicklingError: ``value`` cannot be pickled (cloudpickle).
    """
    worker, job_id = _channel()
    import cloudpickle

    worker.job_send(("progress", job_id, cloudpickle.dumps(value)))


def send_file(path: str | os.PathLike[str], name: str | None = None) -> str:
    """Send a file the job made to the client; returns the name it arrives under.

    The client writes it to ``<files_dir>/<job id>/<name>``. ``name`` defaults to ``path``
    relative to the job's working directory when it is inside it, else its base name. The
    call returns once the file was read (the job may then delete it).

    Raises:
        RuntimeError: not called inside a clusterpy job.
        FileTooLargeError: the file is over the node's limit (``clusterpy-node --max-send-file``).
        DependencyError: ``name`` is not a safe relative path.
        OSError: the file cannot be read, or is not a regular file.
    """
    worker, job_id = _channel()
    from .filestore import validate_name

    path = os.fspath(path)
    if name is None:
        full = os.path.abspath(path)
        here = os.path.join(os.getcwd(), "")
        name = full[len(here):] if full.startswith(here) else os.path.basename(full)
    name = validate_name(name)
    limit = int(worker.job_options.get("max_file", DEFAULT_MAX_SEND_FILE))
    _send(worker.job_send, job_id, path, name, limit, raise_errors=True)
    return name


def _send(send: Callable[[tuple[object, ...]], None], job_id: str, path: str, name: str, limit: int, *,
          raise_errors: bool) -> None:
    """Stream one file into the channel; a failure is raised (``raise_errors``) or reported
    to the client in the file's last chunk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if raise_errors:
            raise
        send(("file", job_id, name, b"", True, f"cannot read it: {exc.strerror or exc}"))
        return
    try:
        st = os.fstat(fd)
        problem: Exception | None = None
        if not stat.S_ISREG(st.st_mode):
            problem = OSError(f"{path} is not a regular file")
        elif st.st_size > limit:
            problem = FileTooLargeError(
                f"file {name!r} is {st.st_size} bytes, over this node's limit of {limit} bytes for files sent "
                "back to the client (clusterpy-node --max-send-file)")
        if problem is not None:
            if raise_errors:
                raise problem
            send(("file", job_id, name, b"", True, str(problem)))
            return
        sent = 0
        while True:
            data = os.read(fd, FILE_CHUNK)
            sent += len(data)
            if sent > limit:  # it grew while being sent
                error = f"file {name!r} grew past this node's limit of {limit} bytes while it was sent"
                send(("file", job_id, name, b"", True, error))
                if raise_errors:
                    raise FileTooLargeError(error)
                return
            last = len(data) < FILE_CHUNK and (not data or os.fstat(fd).st_size <= sent)
            send(("file", job_id, name, data, last, None))
            if last:
                return
    finally:
        os.close(fd)


# ---------------------------------------------------------------- worker side


def private_dir(workdir: str, job_key: str) -> str:
    """Make a job's private working directory for ``return_files``: empty but for symbolic
    links to the computation directory's entries, so relative paths to its files still work."""
    base = os.path.join(workdir, JOBS_DIR)
    os.makedirs(base, mode=0o700, exist_ok=True)
    path = os.path.join(base, job_key.replace("/", "-"))
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path, 0o700)
    for entry in os.scandir(workdir):
        if entry.name != JOBS_DIR:
            os.symlink(os.path.join("..", "..", entry.name), os.path.join(path, entry.name))
    return path


def _made_files(top: str) -> Iterator[tuple[str, str]]:
    """(path, name) of the regular files under ``top``; symbolic links are not followed."""
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for filename in sorted(files):
            path = os.path.join(root, filename)
            if stat.S_ISREG(os.lstat(path).st_mode):
                yield path, os.path.relpath(path, top)


def return_made_files(send: Callable[[tuple[object, ...]], None], job_id: str, top: str, limit: int) -> None:
    """Send every file the job made in its private directory (``return_files``), then remove it."""
    try:
        for count, (path, name) in enumerate(_made_files(top)):
            if count == MAX_RETURNED_FILES:
                send(("file", job_id, name, b"", True, f"more than {MAX_RETURNED_FILES} files: the rest were not sent"))
                break
            _send(send, job_id, path, name, limit, raise_errors=False)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def keep_only_if(value: Any, only_if: Callable[[Any], Any], *, items: bool) -> Any:
    """``value``, or :data:`DROPPED` if ``only_if(value)`` is false; per item for a map chunk."""
    if items and isinstance(value, list):
        return [v if only_if(v) else DROPPED for v in value]
    return value if only_if(value) else DROPPED


def corrupt(value: Any) -> Any:
    """A wrong but plausible version of ``value`` (``clusterpy-node --inject-faults
    corrupt-results``, a testing aid for verify and voting)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float, complex)):
        return value + 1
    if isinstance(value, str):
        return value[::-1] + "?"
    if isinstance(value, bytes):
        return value[::-1] + b"?"
    if isinstance(value, list):
        return [corrupt(v) for v in value]
    if isinstance(value, tuple):
        return tuple(corrupt(v) for v in value)
    if isinstance(value, dict):
        return {k: corrupt(v) for k, v in value.items()}
    if value is None:
        return 0
    return None
