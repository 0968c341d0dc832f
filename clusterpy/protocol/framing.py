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
    "DIRECT_BODY",
    "SCRATCH_SIZE",
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
#: Bodies at least this long are received in place, into a buffer of their exact size.
DIRECT_BODY = 64 * 1024
#: Size of the scratch buffer :meth:`FrameDecoder.get_buffer` offers otherwise.
SCRATCH_SIZE = 256 * 1024


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

    Two ways to drive it: :meth:`feed` takes chunks the caller read; :meth:`get_buffer` and
    :meth:`buffer_updated` (the shape of :class:`asyncio.BufferedProtocol`) let the caller
    read straight into the decoder's memory.

    Performance: whole frames inside a chunk are sliced straight from it (one copy each).
    A body of at least :data:`DIRECT_BODY` bytes that continues past the chunk gets a
    ``bytearray`` of its exact size at once; :meth:`get_buffer` then hands out the rest of
    that bytearray, so the socket writes the body in place and it is returned without any
    further copy (as that ``bytearray``). Smaller partial frames grow a buffer by amortised
    appends.
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
        # A large body received in place, and how much of it has arrived.
        self._body: bytearray | None = None
        self._filled = 0
        self._scratch: memoryview | None = None
        self._into_body = False

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
        return self._filled if self._body is not None else len(self._buf)

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
        return self._want - self.buffered

    def get_buffer(self) -> memoryview:
        """Return the memory the next bytes of the stream should be read into.

        The rest of a large body being received in place, else a scratch buffer of
        :data:`SCRATCH_SIZE` bytes.  Pass the count actually read to :meth:`buffer_updated`
        before asking again.

        Raises:
            FrameTooLargeError: the decoder failed earlier.
        """
        if self._error is not None:
            raise self._error
        if self._body is not None:
            self._into_body = True
            return memoryview(self._body)[self._filled :]
        self._into_body = False
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH_SIZE))
        return self._scratch

    def buffer_updated(self, nbytes: int) -> list[bytes | bytearray]:
        """``nbytes`` were read into the last :meth:`get_buffer`; return the bodies completed.

        Raises:
            FrameTooLargeError: as :meth:`feed`.
        """
        if not self._into_body:
            assert self._scratch is not None, "get_buffer() first"
            return self.feed(self._scratch[:nbytes])
        self._into_body = False
        assert self._body is not None
        self._filled += nbytes
        if self._filled < len(self._body):
            return []
        body, self._body, self._filled, self._want = self._body, None, 0, None
        return [body]

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray]:
        """Consume ``data`` and return the frame bodies it completes.

        Raises:
            FrameTooLargeError: a header announces more than :attr:`max_frame` bytes, now or
                in an earlier call.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._want is None and not buf:
            # Fast path: the chunk is exactly one small frame (a reply read at once, the usual
            # case on a quiet connection or pipe): the same body the loop below would cut.
            end = len(data)
            if end >= HEADER_SIZE:
                (length,) = _HEADER.unpack_from(data, 0)
                if length + HEADER_SIZE == end and length < DIRECT_BODY and length <= self._max_frame:
                    return [bytes(data[HEADER_SIZE:])]
        frames: list[bytes | bytearray] = []
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
                if self._body is not None:  # a large body received in place, fed by chunks here
                    take = min(want - self._filled, end - pos)
                    self._body[self._filled : self._filled + take] = view[pos : pos + take]
                    self._filled += take
                    pos += take
                    if self._filled < want:
                        break
                    frames.append(self._body)
                    self._body, self._filled = None, 0
                elif not buf and end - pos >= want:
                    # Fast path: the whole body is inside this chunk. A large one is a
                    # bytearray, like those received in place: the same body always decodes
                    # the same way (its out-of-band buffers writable).
                    body = view[pos : pos + want]
                    frames.append(bytes(body) if want < DIRECT_BODY else bytearray(body))
                    pos += want
                elif not buf and want >= DIRECT_BODY:
                    # A large body starts here: give it its own buffer of the exact size.
                    self._body = bytearray(want)
                    self._filled = end - pos
                    self._body[: self._filled] = view[pos:end]
                    pos = end
                    break
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
        self._body, self._filled = None, 0
        self._want = None
        self._error = FrameTooLargeError(
            f"peer announced a frame of {length} bytes; the limit here is {self._max_frame}"
        )
        raise self._error
