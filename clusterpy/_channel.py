"""The node <-> worker pipe channel: framing on both sides, and the worker's blocking reader.

Used by :mod:`clusterpy.pool` (asyncio, in the node) and :mod:`clusterpy.worker` (synchronous,
in each worker process); it never imports asyncio, so the worker stays light.

A frame is a 4-byte big-endian length and a pickle (protocol 5) of a tuple of builtins::

    | size (4 bytes) | pickle.dumps(message) (size bytes) |

Costs this module is shaped by (measured on Linux, CPython 3.11):

- Each frame leaves in **one** write (header and body together): two writes wake the reader
  twice, the first time for 4 bytes.
- ``pickle.dumps`` of a message holding a 1 MB ``bytes`` costs ~400 us (its output buffer
  grows by reallocation, fresh pages each time); a :class:`pickle.Pickler` writing into an
  :class:`io.BytesIO` costs ~50 us. Messages announced as large take that path, with room
  for the header at the front, so no second copy is made to prepend it.
- The reader reads a large frame straight into a buffer of its final size.
- :func:`enlarge_pipe` raises a pipe's capacity (64 KiB by default) so a 1 MB payload
  crosses in one or two writes instead of sixteen.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

__all__ = ["encode_frame", "FrameDecoder", "ChannelReader", "write_all", "enlarge_pipe", "pipe_size_for",
           "MAX_FRAME", "PIPE_SIZE"]

#: Largest frame the 4-byte length prefix can describe.
MAX_FRAME = 0xFFFFFFFF
#: Capacity asked for each channel pipe (Linux's default limit for unprivileged users).
PIPE_SIZE = 1 << 20

_HEADER_LEN = 4
#: Messages announced at least this large are pickled into a BytesIO (see the module docstring).
_LARGE = 64 * 1024
#: Scratch read size of the worker's reader: large enough for any small frame, small enough
#: to stay off mmap.
_READ_CHUNK = 64 * 1024


def encode_frame(message: tuple[object, ...], size_hint: int = 0) -> bytes | memoryview:
    """Return the whole frame (header and body) for ``message``, ready for one write.

    ``size_hint``: roughly how many bytes the message holds (its largest ``bytes``); above
    64 KiB the faster path for large messages is taken. Raises ValueError if the body is
    over :data:`MAX_FRAME`.
    """
    if size_hint < _LARGE:
        body = pickle.dumps(message, protocol=5)
        size = len(body)
        if size > MAX_FRAME:  # pragma: no cover -- only a large message can be, and it is hinted
            raise ValueError(f"frame of {size} bytes exceeds the channel's {MAX_FRAME}-byte limit")
        return size.to_bytes(_HEADER_LEN, "big") + body
    buf = io.BytesIO()
    buf.write(bytes(_HEADER_LEN))
    pickle.Pickler(buf, protocol=5).dump(message)
    frame = buf.getbuffer()
    size = len(frame) - _HEADER_LEN
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the channel's {MAX_FRAME}-byte limit")
    frame[:_HEADER_LEN] = size.to_bytes(_HEADER_LEN, "big")
    return frame


class FrameDecoder:
    """Sans-IO decoder: feed it bytes as they arrive, get back the complete frame bodies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the bodies of the frames it completed, in order."""
        buf = self._buf
        if buf:
            buf += data
            data = buf  # type: ignore[assignment]
        frames: list[bytes] = []
        pos, total = 0, len(data)
        with memoryview(data) as view:
            while total - pos >= _HEADER_LEN:
                end = pos + _HEADER_LEN + int.from_bytes(view[pos:pos + _HEADER_LEN], "big")
                if end > total:
                    break
                frames.append(bytes(view[pos + _HEADER_LEN:end]))
                pos = end
            if data is not buf and pos < total:  # nothing was buffered: keep only the rest
                buf += view[pos:]
        if data is buf and pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buf)


class ChannelReader:
    """The worker's blocking reader of frames from ``fd``: one read per small frame; a large
    frame is read straight into a buffer of its size."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()
        self._scratch = memoryview(bytearray(_READ_CHUNK))

    def receive(self) -> Any:
        """Return the next message (unpickled), or None at end of file (also mid-frame)."""
        pending = self._pending
        while len(pending) < _HEADER_LEN:
            if not self._fill():
                return None
        size = int.from_bytes(pending[:_HEADER_LEN], "big")
        end = _HEADER_LEN + size
        if len(pending) < end and size <= _READ_CHUNK:
            while len(pending) < end:
                if not self._fill():
                    return None
        if len(pending) >= end:
            with memoryview(pending) as view:
                message = pickle.loads(view[_HEADER_LEN:end])
            del pending[:end]
            return message
        frame = bytearray(size)
        have = len(pending) - _HEADER_LEN
        frame[:have] = pending[_HEADER_LEN:]
        pending.clear()
        with memoryview(frame) as view:
            while have < size:
                n = os.readv(self.fd, [view[have:]])
                if not n:
                    return None
                have += n
        return pickle.loads(frame)

    def _fill(self) -> bool:
        n = os.readv(self.fd, [self._scratch])
        if n:
            self._pending += self._scratch[:n]
        return n > 0


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to the blocking ``fd`` (one write unless a signal interrupts it)."""
    n = os.write(fd, data)
    if n < len(data):
        with memoryview(data) as view:
            while n < len(view):
                n += os.write(fd, view[n:])


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
