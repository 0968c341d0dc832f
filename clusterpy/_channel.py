"""The node <-> worker pipe channel: framing on both sides, and the worker's blocking reader.

Used by :mod:`clusterpy.pool` (asyncio, in the node) and :mod:`clusterpy.worker` (synchronous,
in each worker process); it never imports asyncio, so the worker stays light.

A frame is a 4-byte big-endian length and a payload in the form of
:mod:`clusterpy.protocol.outofband`: a pickle (protocol 5) of a tuple of builtins, its large
``bytes`` (items of it or of tuples in it, or values of a dict in it) carried out of band::

    | size (4 bytes) | pickle | or | size (4 bytes) | 0x01, lengths | pickle | buffer ... |

Costs this module is shaped by (measured on Linux, CPython 3.11):

- Each frame leaves in **one** write (``writev`` of its parts): two writes wake the reader
  twice, the first time for 4 bytes.
- A large ``bytes`` (a job's arguments, its result) is never copied into or out of the
  pickle: it is written from where it is, and read into a buffer of the frame's final size
  that the unpickled message then points into (read-only ``memoryview`` s).
- :func:`enlarge_pipe` raises a pipe's capacity (64 KiB by default) so a 1 MB payload
  crosses in one or two writes instead of sixteen.
"""

from __future__ import annotations

import os
import pickle
import select
from collections import deque
from typing import Any

from .protocol import outofband
from .protocol.framing import HEADER_SIZE, MAX_LENGTH, frame_header
from .protocol.framing import FrameDecoder as _StreamDecoder
from .protocol.outofband import Part

__all__ = ["encode_frame", "loads", "FrameDecoder", "ChannelReader", "write_all", "enlarge_pipe", "pipe_size_for",
           "MAX_FRAME", "PIPE_SIZE"]

#: Largest frame the 4-byte length prefix can describe.
MAX_FRAME = MAX_LENGTH
#: Capacity asked for each channel pipe (Linux's default limit for unprivileged users).
PIPE_SIZE = 1 << 20

#: Scratch read size of the worker's reader: large enough for any small frame, small enough
#: to stay off mmap.
_READ_CHUNK = 64 * 1024


def encode_frame(message: tuple[object, ...], size_hint: int = 0) -> list[Part]:
    """Return the frame (header and payload) for ``message`` as parts for one ``writev``.

    ``size_hint``: roughly how many bytes the message holds (its largest ``bytes``); from
    :data:`~clusterpy.protocol.outofband.MIN_SIZE` up its large ``bytes`` travel out of band
    (the parts then include them: they must not change until written). Raises ValueError if
    the payload is over :data:`MAX_FRAME`.
    """
    if size_hint < outofband.MIN_SIZE:
        try:
            body = pickle.dumps(message, protocol=5)
        except TypeError:  # a view inside (hinted too small): it can travel only out of band
            body = None
        if body is not None:
            return [frame_header(len(body)) + body]
    wrapped = tuple({k: outofband.wrap(v) for k, v in item.items()} if type(item) is dict else outofband.wrap(item)
                    for item in message)
    parts = outofband.dumps(wrapped)
    parts[0] = frame_header(outofband.payload_size(parts)) + parts[0]
    return parts


def loads(payload: bytes | bytearray | memoryview, unpickler: type[pickle.Unpickler] = pickle.Unpickler) -> Any:
    """Unpickle a frame's payload (either form) with ``unpickler``.

    Raises:
        ValueError, pickle.UnpicklingError: a malformed payload.
    """
    return outofband.load(unpickler, payload)


class FrameDecoder(_StreamDecoder):
    """Sans-IO decoder of the frames a worker sends: feed it bytes as they arrive, get back
    the complete payloads (a large one in a ``bytearray`` of its exact size, filled once)."""

    def __init__(self) -> None:
        super().__init__(MAX_FRAME)

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return self.buffered


class ChannelReader:
    """The worker's blocking reader of frames from ``fd``: one read per small frame; a large
    frame is read straight into a buffer of its size."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()
        self._scratch = memoryview(bytearray(_READ_CHUNK))
        self._ready: deque[Any] = deque()  # messages decoded ahead by take_skip()
        self._poll: select.poll | None = None

    def receive(self) -> Any:
        """Return the next message (unpickled), or None at end of file (also mid-frame)."""
        if self._ready:
            return self._ready.popleft()
        pending = self._pending
        if not pending:
            # The usual case: the pool sends a command and waits for the reply, so the read
            # holds exactly one small frame. An in-band pickle (the pool's large buffers go
            # out of band) makes objects of its own, never views of what it is read from,
            # so it is unpickled straight from the scratch buffer, without copying it.
            n = os.readv(self.fd, [self._scratch])
            if not n:
                return None
            scratch = self._scratch
            if n > HEADER_SIZE and n == HEADER_SIZE + int.from_bytes(scratch[:HEADER_SIZE], "big") \
                    and scratch[HEADER_SIZE] != outofband.MARK:
                return pickle.loads(scratch[HEADER_SIZE:n])
            pending += scratch[:n]
        while len(pending) < HEADER_SIZE:
            if not self._fill():
                return None
        size = int.from_bytes(pending[:HEADER_SIZE], "big")
        end = HEADER_SIZE + size
        if len(pending) < end and size <= _READ_CHUNK:
            while len(pending) < end:
                if not self._fill():
                    return None
        if len(pending) >= end:
            message = loads(pending[HEADER_SIZE:end])  # a copy: what it decodes to may point into it
            del pending[:end]
            return message
        frame = bytearray(size)
        have = len(pending) - HEADER_SIZE
        frame[:have] = pending[HEADER_SIZE:]
        pending.clear()
        with memoryview(frame) as view:
            while have < size:
                n = os.readv(self.fd, [view[have:]])
                if not n:
                    return None
                have += n
        return loads(frame)

    def _fill(self) -> bool:
        n = os.readv(self.fd, [self._scratch])
        if n:
            self._pending += self._scratch[:n]
        return n > 0

    def take_skip(self, job_id: str) -> bool:
        """Whether the pool has asked, by a ``("skip", job_id)`` frame already written, that a
        job sent ahead not be run. Reads what the pipe holds without waiting for more; the
        other complete messages it finds come from :meth:`receive` next, in order."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        if self._poll.poll(0) and not self._fill():
            return False  # end of file: receive() says so next
        pending, found = self._pending, False
        while len(pending) >= HEADER_SIZE:
            end = HEADER_SIZE + int.from_bytes(pending[:HEADER_SIZE], "big")
            if len(pending) < end:
                break  # a frame still arriving (a large one): receive() reads the rest
            message = loads(pending[HEADER_SIZE:end])
            del pending[:end]
            if not found and type(message) is tuple and message == ("skip", job_id):
                found = True
            else:
                self._ready.append(message)
        return found


def write_all(fd: int, data: bytes | memoryview | list[Part]) -> None:
    """Write all of ``data`` (a buffer, or the parts :func:`encode_frame` made) to the blocking
    ``fd``: one ``writev`` unless the pipe fills or a signal interrupts it."""
    parts = [data] if not isinstance(data, list) else data
    n = os.writev(fd, parts)
    if len(parts) == 1 and type(parts[0]) is bytes and n == len(parts[0]):
        return  # the usual small frame, all written
    total = outofband.payload_size(parts)
    while n < total:
        views = [memoryview(p).cast("B") for p in parts]
        done = n
        while views and len(views[0]) <= done:
            done -= len(views.pop(0))
        views[0] = views[0][done:]
        n += os.writev(fd, views)


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Ask for a pipe capacity of ``size`` bytes (best effort, Linux); return the capacity it
    has now (0 if unknown)."""
    import fcntl

    set_size, get_size = getattr(fcntl, "F_SETPIPE_SZ", None), getattr(fcntl, "F_GETPIPE_SZ", None)
    if set_size is None or get_size is None:
        return 0
    try:
        return fcntl.fcntl(fd, set_size, size)
    except OSError:  # over the system's or the user's limit, or not a pipe: keep what it has
        try:
            return fcntl.fcntl(fd, get_size)
        except OSError:
            return 0


def pipe_size_for(cpus: int) -> int:
    """The capacity to ask for each of the two pipes of each of ``cpus`` workers: 1 MiB, less
    if a pool's pipes would take over a quarter of the user's pipe budget (an unprivileged
    user's pipes may hold ``fs.pipe-user-pages-soft`` pages in all, 64 MiB by default; past
    it, every new pipe of theirs gets only two pages)."""
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            budget = int(f.read()) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return PIPE_SIZE
    if budget <= 0:  # no limit
        return PIPE_SIZE
    size = PIPE_SIZE
    while size > 64 * 1024 and 2 * cpus * size > budget // 4:
        size //= 2
    return size
