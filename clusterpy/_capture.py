"""A worker's output files: the worker's side (:class:`Output`) and the node's (the pool's
capture directory, collecting the output of a worker that died, removing the files of one
that exited).

Each worker has two files in the pool's capture directory, ``<pid>.out`` and ``<pid>.err``,
named after its pid so that the pool can find them when the worker dies mid-job. They hold
the output of the worker's current (or last) call only.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

try:
    # The C-level getsignal returns the handler Python stored (an int for SIG_DFL/SIG_IGN);
    # signal.getsignal converts it to an Enum member, which costs 25 times as much, every job.
    from _signal import getsignal as _getsignal  # type: ignore[import-not-found]
except ImportError:  # not CPython
    _getsignal = signal.getsignal

__all__ = ["Output", "OUTPUT_CAP", "read_capped", "read_capped_fd", "collect_output", "remove_output",
           "output_base", "make_capture_dir"]

#: Bytes of stdout (and separately of stderr) kept per job; the middle of longer output is cut.
OUTPUT_CAP = 16 * 1024 * 1024
#: Reads of this size or less are one system call and stay off mmap.
_READ_CHUNK = 64 * 1024
#: os.waitid (Linux and most Unixes; not macOS): finds children without reaping them.
_waitid = getattr(os, "waitid", None)
_SIGCHLD, _SIG_IGN = int(signal.SIGCHLD), int(signal.SIG_IGN)


def make_capture_dir() -> str:
    """Make a pool's capture directory (named after this process), first removing those of
    pools whose node process died without cleaning up (SIGKILL)."""
    import tempfile  # here: the node's side (the worker imports this module too)

    _remove_stale_capture_dirs(tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=f"clusterpy-pool-{os.getpid()}-")


def _remove_stale_capture_dirs(tmp: str) -> None:
    """Remove the capture directories in ``tmp`` left by pools whose node process died without
    cleaning up (SIGKILL): they are named after that process's pid and owned by us."""
    import shutil

    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 4 or parts[:2] != ["clusterpy", "pool"] or not parts[2].isdigit():
            continue
        path = os.path.join(tmp, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(parts[2]), 0)  # that node still runs: its directory is in use
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue


def output_base(capture_dir: str, pid: int) -> str:
    """The path of worker ``pid``'s output files, without the ``.out``/``.err`` suffix."""
    return os.path.join(capture_dir, str(pid))


class Output:
    """Fds 1 and 2 (and so sys.stdout/sys.stderr) of the worker during a call: two capture
    files ``<base>.out``/``.err``, kept open and reused from call to call.

    Use ``with output as capture:`` around a call, then ``capture.read()`` (or ``discard()``)
    and ``capture.children_cpu``: the CPU of the children reaped during the call. Between
    calls fds 1 and 2 are /dev/null. Entering points them at the files, emptied first if the
    last call wrote to them: two ``dup2`` in the usual case; leaving is two more ``dup2``, one
    ``waitid`` and one ``getrusage``, and reading one ``pread`` per file. (A fresh pair of files
    per call, created, opened again to read and unlinked, costs 20 system calls, two of them
    directory changes, and most of a trivial job's time in the worker.)

    The guarantee the fresh-file-per-job design gave is kept: a process a call started that
    outlives it keeps the open file it inherited, so if one may still exist, the next call
    makes **new** files (the process keeps writing into the old, unlinked one) instead of
    emptying the shared ones. Such a process is a descendant of this worker that was started
    while fds 1 and 2 were the files (one started between calls gets /dev/null); so leaving a
    call, once they are /dev/null again, one may exist only if

    - the worker has a child (running or a zombie: ``waitid(WNOHANG|WNOWAIT)`` finds one), or
    - a child was reaped since the files were last made or checked: its orphans (a shell's
      ``cmd &``, a daemon's double fork) were reparented to init and leave no other trace, so
      any change in ``getrusage(RUSAGE_CHILDREN)`` counts (a process that ran at all has
      page faults), or
    - SIGCHLD is ignored (children are then reaped by the kernel and leave no usage).

    The same ``getrusage`` gives the call's ``children_cpu``: the usage it is compared with
    was read when the last call left (or when files were made), and the children's usage
    changes only when one is reaped. A child reaped between calls either existed when the last
    call left (it was found then: the next call makes new files, with a new reading), or was
    started between calls: by the worker (a computation's cleanup: :meth:`recount` after it),
    or by a thread a job left running, whose own CPU counts for whatever call runs meanwhile,
    and so does that of the children it starts and reaps between calls, for the next call.

    A job that runs ``subprocess.run`` (every program job) thus makes the next call use fresh
    files, and a job that leaves a child running makes every call do so while it lives.
    Limit: a process started by other means than this worker's descendants (passing the fd
    over a socket, ``clone(CLONE_PARENT)``) or a SIGCHLD disposition set behind Python's back
    is not seen.
    """

    def __init__(self, base: str, devnull: int) -> None:
        self.paths = (base + ".out", base + ".err")
        self.devnull = devnull
        self.fds = [-1, -1]
        self.written = [False, False]  # the file may hold bytes since it was last emptied
        #: CPU seconds of the child processes reaped during the last call (set as it ends).
        self.children_cpu = 0.0
        # Whether a process may hold the files (found as the last call ended): make new ones.
        self._shared = True
        # getrusage(RUSAGE_CHILDREN) when the files were last made or checked: every field of
        # it stays the same until a child is reaped.
        self._children_usage: resource.struct_rusage | None = None
        #: How many times fresh files were made (diagnostics and tests).
        self.replaced = 0

    def __enter__(self) -> Output:
        _flush_std()  # what the worker printed between calls belongs to no call
        if self._shared:
            self._replace()
        else:
            for i, fd in enumerate(self.fds):
                if self.written[i]:
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)  # the offset fds 1 and 2 share with it
                    self.written[i] = False
        os.dup2(self.fds[0], 1)
        os.dup2(self.fds[1], 2)
        self.saved = (sys.stdout, sys.stderr)
        return self

    def __exit__(self, *exc_info: object) -> None:
        saved = self.saved
        if sys.stdout is not saved[0] or sys.stderr is not saved[1]:
            _flush_std()  # the streams the call put in place...
            sys.stdout, sys.stderr = saved
        _flush_std()  # ... and the worker's own, which the call may have written to too
        os.dup2(self.devnull, 1)
        os.dup2(self.devnull, 2)
        # Only now: a process started from here on gets /dev/null, not the files.
        self._check_children()

    def recount(self) -> None:
        """Children reaped outside a call (by a computation's cleanup) held /dev/null and
        count for no call: the next call's ``children_cpu`` counts from now."""
        self._children_usage = resource.getrusage(resource.RUSAGE_CHILDREN)

    def read(self) -> tuple[bytes, bytes]:
        """The call's output (capped: see read_capped); call after the ``with`` block."""
        out_fd, err_fd = self.fds
        # read_capped_fd's first read, inline (this runs once per job): it is called only
        # for output of 64 KiB or more.
        out, err = os.pread(out_fd, _READ_CHUNK, 0), os.pread(err_fd, _READ_CHUNK, 0)
        if len(out) >= _READ_CHUNK:
            out = read_capped_fd(out_fd)
        if len(err) >= _READ_CHUNK:
            err = read_capped_fd(err_fd)
        self.written = [bool(out), bool(err)]
        return out, err

    def discard(self) -> None:
        """Drop the call's output unread."""
        self.written = [True, True]

    def close(self) -> None:
        """Close and remove the files (the worker is exiting)."""
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                os.close(fd)
                self.fds[i] = -1
                _unlink(self.paths[i])

    def _check_children(self) -> None:
        """Set ``children_cpu`` and whether a process may hold the files (see the class)."""
        # waitid first: a child reaped after it is then counted in the usage read below.
        shared = False
        if _waitid is None or _getsignal(_SIGCHLD) == _SIG_IGN:
            shared = True
        else:
            try:
                _waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                shared = True  # a child exists, running (None) or a zombie
            except ChildProcessError:
                pass
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = self._children_usage
        if usage == start:  # compared as tuples of all the fields: none reaped (the usual case)
            self.children_cpu = 0.0
        else:
            self.children_cpu = 0.0 if start is None else \
                (usage.ru_utime + usage.ru_stime) - (start.ru_utime + start.ru_stime)
            self._children_usage = usage
            shared = True
        self._shared = shared

    def _replace(self) -> None:
        # The usage the next call's children are counted from (one reaped since the last call
        # left is not this call's).
        self.recount()
        for i, path in enumerate(self.paths):
            _unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            if self.fds[i] >= 0:
                os.close(self.fds[i])
            self.fds[i] = fd
        self.written = [False, False]
        self.replaced += 1


def read_capped(path: str, cap: int = OUTPUT_CAP) -> bytes:
    """Return the contents of ``path`` (``b""`` if missing), keeping its head and tail if over ``cap``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return read_capped_fd(fd, cap)
    finally:
        os.close(fd)


def read_capped_fd(fd: int, cap: int = OUTPUT_CAP) -> bytes:
    """Like :func:`read_capped`, from an open file (read from its start, its offset untouched).

    One system call when the file holds less than 64 KiB (the usual case)."""
    head = os.pread(fd, _READ_CHUNK, 0)
    if len(head) < _READ_CHUNK and len(head) <= cap:
        return head
    size = os.fstat(fd).st_size
    if size <= cap:
        return _pread_all(fd, size, 0)
    half = cap // 2
    marker = (
        f"\n[clusterpy: {size - 2 * half} bytes of output cut; "
        f"the first and last {half} of {size} bytes are kept]\n"
    ).encode()
    return _pread_all(fd, half, 0) + marker + _pread_all(fd, half, size - half)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def collect_output(base: str) -> tuple[bytes, bytes]:
    """Read (capped) and delete the output files of a worker that died."""
    output = []
    for path in (base + ".out", base + ".err"):
        try:
            output.append(read_capped(path))
        except OSError:  # the directory is gone when the pool is closing
            output.append(b"")
    remove_output(base)
    return output[0], output[1]


def remove_output(base: str) -> None:
    """Delete the output files of a worker that exited (a worker keeps them from job to job)."""
    for path in (base + ".out", base + ".err"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- a job may have closed or replaced the stream
            pass
