"""Length-prefixed framing: the lowest layer of the clusterpy wire protocol (sans-IO).

A frame is a 4-byte big-endian unsigned length followed by that many bytes of body::

    +----------------+---------------------------+
    | length (>I, 4) | body (length bytes)       |
    +----------------+---------------------------+

:func:`encode_frame` builds one frame; :class:`FrameDecoder` turns an arbitrary chunking of a
byte stream back into frame bodies.  The decoder enforces a size cap *before* buffering a body,
so a peer cannot make us allocate memory by announcing a huge frame: before authentication the
cap is :data:`PREAUTH_MAX_FRAME`, afterwards the connection raises it (usually to
:data:`DEFAULT_MAX_FRAME`).

This module does no I/O and imports nothing beyond the standard library's ``struct``.
"""

from __future__ import annotations

import struct

from ..errors import FrameTooLargeError

__all__ = [
    "HEADER_SIZE",
    "MAX_LENGTH",
    "PREAUTH_MAX_FRAME",
    "DEFAULT_MAX_FRAME",
    "encode_frame",
    "frame_header",
    "FrameDecoder",
]

_HEADER = struct.Struct(">I")

#: Size of the length prefix in bytes.
HEADER_SIZE = _HEADER.size
#: Largest body length a 4-byte prefix can express.
MAX_LENGTH = 2**32 - 1
#: Cap on every frame before the peer is authenticated (handshake messages are small JSON).
PREAUTH_MAX_FRAME = 4096
#: Cap on frames after authentication, unless the caller chooses another.
DEFAULT_MAX_FRAME = 256 * 1024 * 1024


def frame_header(length: int) -> bytes:
    """Return the 4-byte length prefix for a body of ``length`` bytes.

    Useful with ``writelines([frame_header(n), *parts])`` to avoid joining a large body.

    Raises:
        ValueError: ``length`` is negative or does not fit in 32 bits.
    """
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"frame body of {length} bytes cannot be framed (limit {MAX_LENGTH})")
    return _HEADER.pack(length)


def encode_frame(body: bytes) -> bytes:
    """Return ``body`` as one frame (length prefix + body).

    Raises:
        ValueError: ``len(body) >= 2**32``.
    """
    return frame_header(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get complete frame bodies back.

    Contract:
      * :meth:`feed` accepts any chunking of the stream and returns the bodies completed by
        this chunk, in order (possibly none).
      * A header announcing more than :attr:`max_frame` bytes raises
        :class:`~clusterpy.errors.FrameTooLargeError` at once; the body is never buffered.
        The decoder holds at most ``max_frame`` bytes of an unfinished frame (plus up to
        3 header bytes) between calls.
      * After any error the decoder is failed: every later :meth:`feed` raises the same
        error.  Bodies completed earlier in the failing chunk are discarded with it.
      * :attr:`max_frame` may be changed between calls (raised after authentication); the
        new cap applies to headers read from then on.

    Performance: whole frames inside a chunk are sliced straight from it (one copy each);
    only a trailing partial frame is kept, in a ``bytearray`` that grows by amortised
    appends, so a 1 MiB frame arriving in 64 KiB pieces costs linear time.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        """Create a decoder with the given cap.

        Raises:
            ValueError: ``max_frame`` is negative or over :data:`MAX_LENGTH`.
        """
        self._max_frame = self._check_cap(max_frame)
        # Bytes of the unfinished frame: header bytes while ``_want is None``, else body bytes.
        self._buf = bytearray()
        # Body length of the frame being read, or None while its header is incomplete.
        self._want: int | None = None
        self._error: FrameTooLargeError | None = None

    @staticmethod
    def _check_cap(value: int) -> int:
        if not 0 <= value <= MAX_LENGTH:
            raise ValueError(f"max_frame must be between 0 and {MAX_LENGTH}, not {value}")
        return value

    @property
    def max_frame(self) -> int:
        """The largest body length accepted in a header read from now on."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = self._check_cap(value)

    @property
    def failed(self) -> bool:
        """True once the decoder has rejected the stream."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held by the decoder (header or body)."""
        return len(self._buf)

    @property
    def needed(self) -> int:
        """Bytes that are certainly still missing before the next frame completes.

        While the header is incomplete this is the rest of the header; afterwards it is the
        rest of the body (0 for an empty body still to be emitted by ``feed(b"")``).  A reader
        that never reads more than ``needed`` bytes never reads past a frame boundary, which
        lets the handshake leave post-handshake bytes in the transport's buffer.
        """
        if self._want is None:
            return HEADER_SIZE - len(self._buf)
        return self._want - len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data`` and return the frame bodies it completes.

        Raises:
            FrameTooLargeError: a header announces more than :attr:`max_frame` bytes, now or
                in an earlier call.
        """
        if self._error is not None:
            raise self._error
        frames: list[bytes] = []
        buf = self._buf
        with memoryview(data) as view:
            pos = 0
            end = len(view)
            while True:
                if self._want is None:
                    if not buf and end - pos >= HEADER_SIZE:
                        (length,) = _HEADER.unpack_from(view, pos)
                        pos += HEADER_SIZE
                    else:
                        take = min(HEADER_SIZE - len(buf), end - pos)
                        buf += view[pos : pos + take]
                        pos += take
                        if len(buf) < HEADER_SIZE:
                            break
                        (length,) = _HEADER.unpack(buf)
                        buf.clear()
                    if length > self._max_frame:
                        self._fail(length)
                    self._want = length
                want = self._want
                if not buf and end - pos >= want:
                    # Fast path: the whole body is inside this chunk.
                    frames.append(bytes(view[pos : pos + want]))
                    pos += want
                else:
                    take = min(want - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < want:
                        break
                    frames.append(bytes(buf))
                    buf.clear()
                self._want = None
        return frames

    def _fail(self, length: int) -> None:
        # Drop whatever is buffered: a failed stream is never resumed.
        self._buf = bytearray()
        self._want = None
        self._error = FrameTooLargeError(
            f"peer announced a frame of {length} bytes; the limit here is {self._max_frame}"
        )
        raise self._error
