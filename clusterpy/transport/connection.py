"""An authenticated connection once its handshake is done: sealed, framed payloads both ways.

Sends are corked per loop turn (one write for a turn's frames), large parts are handed to the
transport in pieces as it drains, and received frames are opened in order: returned by
:meth:`Connection.recv`, or handed to a handler in the read callback
(:meth:`Connection.deliver_eagerly`). Made by :func:`clusterpy.transport.stream.connect` and
:func:`~clusterpy.transport.stream.accept`, which run the handshake.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from ..errors import ClusterError, ConnectionClosedError, ProtocolError
from ..protocol.framing import FrameDecoder, frame_header
from ..protocol.outofband import payload_size
from ..protocol.session import OVERHEAD, SessionCipher
from .pacing import PacedWriter
from .receiver import Receiver

__all__ = ["Connection"]

_log = logging.getLogger("clusterpy.transport")

# Frames queued by send() go out together at the end of the loop turn (one system call for
# the results of a whole batch of jobs), or at once past this many bytes: big frames gain
# nothing from waiting.
_CORK_BYTES = 64 * 1024
# How long closing may wait for the peer to take our last bytes (e.g. a refusal).
CLOSE_TIMEOUT = 2.0


def format_addr(addr: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) of a socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class Connection:
    """An authenticated connection: sealed, framed payloads in both directions.

    Use :meth:`send` (+ :meth:`drain` for back-pressure) and :meth:`recv` from one receiving
    task; close with :meth:`aclose` or ``async with``.  Created by :func:`connect` and
    :func:`accept` only.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cipher: SessionCipher,
        decoder: FrameDecoder,
        *,
        peer_role: str,
        peer_info: dict[str, str],
        peername: Any,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        # Only kept alive: a StreamWriter closes its transport when it is garbage collected.
        self._handshake_streams = (reader, writer)
        self._cipher = cipher
        self._decoder = decoder
        self._closed = False  # closed by us
        self._error: ClusterError | None = None  # what broke it, if something did
        self._receiving = False
        self._waiting = False  # recv() is parked, waiting for frames
        # Eager delivery (deliver_eagerly): the handler, payloads it left to recv(), its error.
        self._eager: Callable[[bytes | bytearray], bool] | None = None
        self._opened: deque[bytes | bytearray] = deque()
        self._eager_error: ClusterError | None = None
        self._corked: list[bytes | bytearray | memoryview] = []
        self._corked_bytes = 0
        self._flush_scheduled = False
        self._flush_handle: asyncio.Handle | None = None
        self._before_flush: list[Callable[[], None]] = []
        # While _deliver hands a read's payloads to the handler, the sends they cause are
        # written when it is done (no loop iteration of their own): see _deliver.
        self._delivering = False
        self._protocol = Receiver(decoder, self._loop)
        # Large parts go to the transport in pieces as it drains (see transport.pacing).
        self._writer = PacedWriter(self._transport, lambda: self._protocol.write_paused)
        self._protocol.on_writable = self._writer.pump
        self._take_over(reader)
        #: The peer's authenticated role label.
        self.peer_role = peer_role
        #: The peer's authenticated info (versions etc.).
        self.peer_info = peer_info
        #: The peer's address as the socket reports it.
        self.peername: Any = peername
        self._label = f"{peer_role} {format_addr(peername)}"

    def _take_over(self, reader: asyncio.StreamReader) -> None:
        """Move the transport from the handshake's StreamReader to our own protocol, with
        whatever the reader had already buffered (bytes sent right after the handshake), its
        EOF and its write flow-control state."""
        proto = self._protocol
        proto.transport = self._transport
        old = self._transport.get_protocol()
        # StreamReaderProtocol keeps these privately; a paused writer must stay paused.
        proto.write_paused = bool(getattr(old, "_paused", False))
        self._transport.set_protocol(proto)
        leftover = bytes(reader._buffer)  # noqa: SLF001 - no public way to take them over
        reader._buffer.clear()  # noqa: SLF001
        if leftover:
            try:
                proto.frames.extend(self._decoder.feed(leftover))
            except ProtocolError as exc:
                proto.error = exc
            proto.queued = sum(len(b) for b in proto.frames)
        if reader.at_eof() or reader.exception() is not None:
            proto.eof = True
            proto.lost = reader.exception()
        if self._transport.is_closing():
            proto.eof = True
        # The StreamReader may have paused reading for its own buffer limit.
        if not self._transport.is_reading() and not self._transport.is_closing():
            self._transport.resume_reading()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self._label} {state}>"

    @property
    def tls(self) -> dict[str, str] | None:
        """``{"version", "cipher", "peer"}`` (peer: the certificate's common name, "" if none)
        when the connection runs over TLS, else None."""
        ssl_object = self._transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cert = ssl_object.getpeercert() or {}
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        cipher = ssl_object.cipher()
        return {"version": ssl_object.version() or "", "cipher": cipher[0] if cipher else "",
                "peer": names[0] if names else ""}

    @property
    def closed(self) -> bool:
        """True once closed locally or broken by an error; send/recv then raise."""
        return self._closed or self._error is not None

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosedError(f"connection to {self._label} was closed locally")
        if self._error is not None:
            raise ConnectionClosedError(
                f"connection to {self._label} is broken: {self._error}"
            ) from self._error

    def _broken(self, error: ClusterError) -> ClusterError:
        """Record the first error, drop the transport, and return ``error`` for raising."""
        if self._error is None and not self._closed:
            self._error = error
            self._transport.close()
        return error

    def send(self, payload: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview], *,
             now: bool = False) -> None:
        """Seal and queue ``payload`` (no await; call :meth:`drain` for back-pressure): one
        buffer, or the list of buffers that together are the payload (as
        :func:`~clusterpy.protocol.codec.encode_parts` makes; they are not joined).

        Frames queued in one turn of the event loop are written together at its end (or at
        once when they add up to 64 KiB, or on close()); ``payload`` must not be mutated
        until then. Frames sent while handling the payloads of one read (eager delivery)
        are written once they are all handled. ``now``: write this frame, and those queued
        before it, at once (as :meth:`flush`).

        Raises:
            ConnectionClosedError: the connection is closed or broken.
            ValueError: the sealed payload would exceed the frame cap.
        """
        self._check_open()
        if self._transport.is_closing():
            raise self._broken(ConnectionClosedError(f"{self._label} closed the connection"))
        if type(payload) is list and len(payload) == 1:  # a small message as encode_parts makes it
            payload = payload[0]
        size = payload_size(payload) + OVERHEAD
        if size > self._decoder.max_frame:
            raise ValueError(
                f"payload of {size - OVERHEAD} bytes exceeds the frame cap of "
                f"{self._decoder.max_frame} bytes"
            )
        sealed = self._cipher.seal_parts(payload)  # first: if it raises, nothing half-queued
        self._corked.append(frame_header(size))
        self._corked.extend(sealed)
        self._corked_bytes += size
        if now or self._corked_bytes >= _CORK_BYTES:
            self.flush()
        else:
            self._schedule_flush()

    def before_flush(self, produce: Callable[[], None]) -> None:
        """Call ``produce`` (once) just before the queued frames are next written, so messages
        it sends, batched by the caller over the loop turn, ride in the same write."""
        self._check_open()
        self._before_flush.append(produce)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if not self._delivering:  # else _deliver flushes when it is done
                self._flush_handle = self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now instead of at the end of this loop turn: for a caller that
        knows its batch is complete and waits for the answer (a round trip's latency)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush()

    def _flush(self) -> None:
        """Hand the queued frames to the transport: small parts joined into one write, large
        ones (a big payload) written as they are, so they are not copied into a join."""
        self._flush_handle = None  # running now (or cancelled by flush(), or left to find nothing)
        # The hooks' sends join this flush: the flag stays set while they run, so they do not
        # schedule another (empty) one, a loop iteration per batch.
        self._flush_scheduled = True
        while self._before_flush:
            hooks, self._before_flush = self._before_flush, []
            for produce in hooks:
                produce()
        self._flush_scheduled = False
        if not self._corked:
            return
        parts, corked_bytes = self._corked, self._corked_bytes
        self._corked, self._corked_bytes = [], 0
        if self._error is not None or self._transport.is_closing():
            return
        write = self._writer.write
        if corked_bytes < _CORK_BYTES:  # the common case: small frames only, one write
            write(b"".join(parts))
            return
        small: list[bytes | bytearray | memoryview] = []
        for part in parts:
            if len(part) < _CORK_BYTES:
                small.append(part)
                continue
            if small:
                write(small[0] if len(small) == 1 else b"".join(small))
                small = []
            write(part)
        if small:
            write(small[0] if len(small) == 1 else b"".join(small))

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark.

        Raises:
            ConnectionClosedError: the connection is closed, broken or reset.
        """
        self._check_open()
        # Corked frames (under 64 KiB in all) are not flushed here: they go out at the end
        # of the loop turn with whatever else is sent in it.
        proto = self._protocol
        while (proto.write_paused or self._writer.pending) and not proto.closed.done():
            await proto.wait_writable()
            self._check_open()
        if proto.closed.done():
            detail = f": {proto.lost}" if proto.lost is not None else ""
            raise self._broken(ConnectionClosedError(f"connection to {self._label} failed{detail}"
                                                     if detail else f"{self._label} closed the connection"))

    @property
    def writable(self) -> bool:
        """True unless sent data waits for the peer to read (:meth:`drain` would wait)."""
        return not self._protocol.write_paused and not self._writer.pending

    def deliver_eagerly(self, handler: Callable[[bytes | bytearray], bool]) -> None:
        """Hand payloads to ``handler`` as they are read, in the transport's read callback,
        while the task receiving on this connection waits in :meth:`recv` with nothing queued:
        no wake-up of that task, no loop turn per message.

        ``handler(payload)`` returns True once it handled the payload, False to leave it to
        :meth:`recv` (a message whose handling must await); the payloads after it then go to
        :meth:`recv` too, in order, until the task waits again. A :class:`ClusterError` it raises
        (a ProtocolError for a malformed message) breaks the connection, and :meth:`recv`
        raises it; another exception is a bug: logged, and the connection is broken."""
        self._eager = handler
        self._protocol.on_frames = self._deliver

    def _deliver(self) -> None:
        proto = self._protocol
        handler = self._eager
        if (handler is None or not self._waiting or self._opened or self._eager_error is not None
                or self._closed or self._error is not None):
            proto._wake()
            return
        # What the handler sends is written once this read's payloads are all handled: the
        # answers to a read leave in one write, without a loop iteration of their own.
        self._delivering = True
        frames = proto.frames
        try:
            while frames and not self._opened:
                body = proto.take()
                try:
                    payload = self._cipher.open(body)
                    if not handler(payload):
                        self._opened.append(payload)
                except ClusterError as exc:
                    self._eager_error = self._broken(exc)
                    break
                except Exception as exc:
                    _log.exception("handling a message from %s failed", self._label)
                    self._eager_error = self._broken(ProtocolError(f"handling a message failed: {exc!r}"))
                    break
                if self._closed or self._error is not None:
                    break
        finally:
            self._delivering = False
            if self._flush_scheduled and self._flush_handle is None:
                self._flush()
        if proto.frames or self._opened or self._eager_error is not None:
            proto._wake()

    async def recv(self) -> bytes | bytearray:
        """Return the next authenticated payload (a large one as a ``bytearray``).

        Raises:
            ConnectionClosedError: EOF, reset, or the connection is closed.
            ProtocolError: (a subclass) an oversized frame, bad MAC or out-of-sequence frame;
                the connection is closed.
            RuntimeError: another task is already awaiting recv().
        """
        if self._receiving:
            raise RuntimeError("recv() is already being awaited by another task")
        self._check_open()
        self._receiving = True
        proto = self._protocol
        try:
            while not proto.frames and not self._opened:
                if self._eager_error is not None:
                    raise self._eager_error
                if proto.error is not None:
                    raise self._broken(proto.error)
                if proto.eof:
                    self._check_open()  # a local close() while we waited ends here
                    if proto.lost is not None:
                        raise self._broken(ConnectionClosedError(
                            f"connection to {self._label} failed: {proto.lost}"))
                    partial = " in the middle of a frame" if self._decoder.buffered else ""
                    raise self._broken(
                        ConnectionClosedError(f"{self._label} closed the connection{partial}")
                    )
                self._waiting = True
                try:
                    await proto.wait_readable()
                finally:
                    self._waiting = False
                if self._eager_error is not None:
                    raise self._eager_error
                self._check_open()
            if self._opened:
                return self._opened.popleft()
            body = proto.take()
            try:
                return self._cipher.open(body)
            except ProtocolError as exc:
                raise self._broken(exc) from None
        finally:
            self._receiving = False

    def close(self) -> None:
        """Start closing (queued bytes are still flushed). Idempotent."""
        if not self._closed:
            self._flush()
            self._writer.write_all()  # the transport buffers them and sends them before closing
            self._closed = True
            self._transport.close()
            self._protocol._wake()

    async def aclose(self) -> None:
        """Close and wait (briefly) until the transport is gone. Idempotent; never raises."""
        self.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self._protocol.closed)
        except TimeoutError:
            self._transport.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --- handshake driving ----------------------------------------------------------------------
