"""The protocol a :class:`~clusterpy.transport.stream.Connection` puts on its transport once
authenticated: the socket reads straight into the frame decoder's buffers, and write flow
control is tracked for ``drain()``."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ..errors import ProtocolError
from ..protocol.framing import FrameDecoder

__all__ = ["Receiver"]

# Received bodies waiting for recv() beyond this many bytes pause reading from the socket.
_QUEUED_BYTES = 4 * 1024 * 1024


class Receiver(asyncio.BufferedProtocol):
    """The transport's protocol once authenticated: the socket writes straight into the
    frame decoder's buffers (a large body lands in its own bytearray, never copied again),
    complete bodies queue here for :meth:`~clusterpy.transport.stream.Connection.recv`, and write flow control is kept
    for :meth:`~clusterpy.transport.stream.Connection.drain`.  Reading pauses while more than :data:`_QUEUED_BYTES`
    wait to be received."""

    def __init__(self, decoder: FrameDecoder, loop: asyncio.AbstractEventLoop) -> None:
        self.decoder = decoder
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.frames: deque[bytes | bytearray] = deque()
        self.queued = 0
        self.paused_reading = False
        self.eof = False
        self.lost: Exception | None = None  # the OS error that ended the connection, if any
        self.error: ProtocolError | None = None  # what the decoder refused
        self.readable: asyncio.Future[None] | None = None
        self.write_paused = False
        self.writable: asyncio.Future[None] | None = None
        #: Called when the transport drains below its low-water mark (the connection writes
        #: its queued large parts then).
        self.on_writable: Callable[[], None] | None = None
        #: Called when frames arrived, instead of waking the receiver (eager delivery).
        self.on_frames: Callable[[], None] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()

    # -- asyncio callbacks

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            bodies = self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.error = exc
            self._pause_reading()
            self._wake()
            return
        if bodies:
            self.frames.extend(bodies)
            self.queued += sum(map(len, bodies))
            if self.queued > _QUEUED_BYTES:
                self._pause_reading()
            if self.on_frames is not None:
                self.on_frames()  # the connection delivers them now, or wakes its receiver
            else:
                self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_writable is not None:
            self.on_writable()
        if not self.write_paused and self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # -- used by Connection

    def take(self) -> bytes | bytearray:
        body = self.frames.popleft()
        self.queued -= len(body)
        if self.paused_reading and self.queued <= _QUEUED_BYTES // 2 and self.error is None:
            self.paused_reading = False
            assert self.transport is not None
            self.transport.resume_reading()
        return body

    async def wait_readable(self) -> None:
        self.readable = self.loop.create_future()
        try:
            await self.readable
        finally:
            self.readable = None

    async def wait_writable(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.loop.create_future()
        await asyncio.shield(self.writable)  # several drainers may share it

    def _wake(self) -> None:
        if self.readable is not None and not self.readable.done():
            self.readable.set_result(None)

    def _pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.transport.is_closing():
            self.paused_reading = True
            self.transport.pause_reading()
