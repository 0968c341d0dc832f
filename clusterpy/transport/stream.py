"""asyncio TCP/TLS adapter for the clusterpy wire protocol: a thin shell.

Data flow::

    connect()/accept()                      Connection.send(payload)
        |  ClientHandshake/ServerHandshake      |  SessionCipher.seal_parts -> frame_header
        |  (exact-size reads: never past a      v
        |   frame boundary, cap 4 KiB)      StreamWriter.writelines
        v
    Connection.recv()  <- SessionCipher.open <- receiver.Receiver (BufferedProtocol: the socket reads
                          straight into FrameDecoder.get_buffer(); a large body into its own
                          bytearray, opened and decoded in place)

Every decision (framing, caps, MACs, sequence numbers, refusals) is made by the sans-IO objects
in :mod:`clusterpy.protocol`; this module only moves bytes, owns the clock (handshake
deadline) and the randomness (nonces), and maps OS errors to
:class:`~clusterpy.errors.ConnectionClosedError`.  A connection that saw a protocol error is
closed at once: failure is total, and every later call raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from ..errors import (
    AuthenticationError,
    ClusterError,
    ConnectionClosedError,
    ProtocolError,
    VersionMismatchError,
)
from ..protocol.framing import (
    DEFAULT_MAX_FRAME,
    PREAUTH_MAX_FRAME,
    FrameDecoder,
    encode_frame,
    frame_header,
)
from ..protocol.handshake import NONCE_SIZE, ClientHandshake, ServerHandshake
from ..protocol.session import OVERHEAD, SessionCipher, payload_size
from ..tls import classify_ssl_error, describe_ssl_error
from .receiver import Receiver

__all__ = ["READ_SIZE", "Connection", "connect", "accept"]

_log = logging.getLogger("clusterpy.transport")

#: Bytes asked of the StreamReader per read once authenticated.
READ_SIZE = 256 * 1024
# Frames queued by send() go out together at the end of the loop turn (one system call for
# the results of a whole batch of jobs), or at once past this many bytes: big frames gain
# nothing from waiting.
_CORK_BYTES = 64 * 1024
# Large parts are handed to the transport in pieces of this size (see Connection._pump).
_PIECE = 256 * 1024
# How long closing may wait for the peer to take our last bytes (e.g. a refusal).
_CLOSE_TIMEOUT = 2.0
_Handshake = ClientHandshake | ServerHandshake


def _format_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    # Small request/reply messages must not wait for Nagle's algorithm.
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close, letting queued bytes go out for a short while; never raises."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


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
        # Bytes of large parts not handed to the transport yet (see _pump), in order.
        self._unsent: deque[memoryview] = deque()
        self._flush_scheduled = False
        self._flush_handle: asyncio.Handle | None = None
        self._before_flush: list[Callable[[], None]] = []
        self._protocol = Receiver(decoder, self._loop)
        self._protocol.on_writable = self._pump
        self._take_over(reader)
        #: The peer's authenticated role label.
        self.peer_role = peer_role
        #: The peer's authenticated info (versions etc.).
        self.peer_info = peer_info
        #: The peer's address as the socket reports it.
        self.peername: Any = peername
        self._label = f"{peer_role} {_format_addr(peername)}"

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

    def send(self, payload: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]) -> None:
        """Seal and queue ``payload`` (no await; call :meth:`drain` for back-pressure): one
        buffer, or the list of buffers that together are the payload (as
        :func:`~clusterpy.protocol.codec.encode_parts` makes; they are not joined).

        Frames queued in one turn of the event loop are written together at its end (or at
        once when they add up to 64 KiB, or on close()); ``payload`` must not be mutated
        until then.

        Raises:
            ConnectionClosedError: the connection is closed or broken.
            ValueError: the sealed payload would exceed the frame cap.
        """
        self._check_open()
        if self._transport.is_closing():
            raise self._broken(ConnectionClosedError(f"{self._label} closed the connection"))
        size = payload_size(payload) + OVERHEAD
        if size > self._decoder.max_frame:
            raise ValueError(
                f"payload of {size - OVERHEAD} bytes exceeds the frame cap of "
                f"{self._decoder.max_frame} bytes"
            )
        self._schedule_flush()
        self._corked.append(frame_header(size))
        self._corked.extend(self._cipher.seal_parts(payload))
        self._corked_bytes += size
        if self._corked_bytes >= _CORK_BYTES:
            self._flush()

    def before_flush(self, produce: Callable[[], None]) -> None:
        """Call ``produce`` (once) just before the queued frames are next written, so messages
        it sends, batched by the caller over the loop turn, ride in the same write."""
        self._check_open()
        self._before_flush.append(produce)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flush_handle = self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now instead of at the end of this loop turn: for a caller that
        knows its batch is complete and waits for the answer (a round trip's latency)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def _flush(self) -> None:
        """Hand the queued frames to the transport: small parts joined into one write, large
        ones (a big payload) written as they are, so they are not copied into a join."""
        # The hooks' sends join this flush: the flag stays set while they run, so they do not
        # schedule another (empty) one, a loop iteration per batch.
        while self._before_flush:
            hooks, self._before_flush = self._before_flush, []
            for produce in hooks:
                produce()
        self._flush_scheduled = False
        self._flush_handle = None
        if not self._corked:
            return
        parts, self._corked, self._corked_bytes = self._corked, [], 0
        if self._error is not None or self._transport.is_closing():
            return
        unsent = self._unsent
        small: list[bytes | bytearray | memoryview] = []
        for part in parts:
            if len(part) < _CORK_BYTES:
                small.append(part)
                continue
            if small:
                self._write_small(small)
                small = []
            unsent.append(memoryview(part).cast("B"))
        if small:
            self._write_small(small)
        if unsent:
            self._pump()

    def _write_small(self, parts: list[bytes | bytearray | memoryview]) -> None:
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._unsent:  # behind large parts still queued: keep the order
            self._unsent.append(memoryview(joined).cast("B"))
        else:
            self._transport.write(joined)

    def _pump(self) -> None:
        """Hand large parts to the transport a piece at a time, while it is below its
        high-water mark (and again each time it drains: ``resume_writing``).

        A transport copies whatever the socket does not take at once into its own buffer
        (asyncio's selector transport does, up to Python 3.11): written whole, an 8 MB payload
        would mostly be copied once more. Written in pieces, at most one piece is."""
        unsent, proto = self._unsent, self._protocol
        if self._error is not None or self._transport.is_closing():
            unsent.clear()
            return
        write = self._transport.write
        while unsent and not proto.write_paused:
            view = unsent[0]
            if len(view) <= _PIECE:
                unsent.popleft()
                write(view)
            else:
                unsent[0] = view[_PIECE:]
                write(view[:_PIECE])

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark.

        Raises:
            ConnectionClosedError: the connection is closed, broken or reset.
        """
        self._check_open()
        # Corked frames (under 64 KiB in all) are not flushed here: they go out at the end
        # of the loop turn with whatever else is sent in it.
        proto = self._protocol
        while (proto.write_paused or self._unsent) and not proto.closed.done():
            await proto.wait_writable()
            self._check_open()
        if proto.closed.done():
            detail = f": {proto.lost}" if proto.lost is not None else ""
            raise self._broken(ConnectionClosedError(f"connection to {self._label} failed{detail}"
                                                     if detail else f"{self._label} closed the connection"))

    @property
    def writable(self) -> bool:
        """True unless sent data waits for the peer to read (:meth:`drain` would wait)."""
        return not self._protocol.write_paused and not self._unsent

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
        while proto.frames and not self._opened:
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
            if not self._transport.is_closing():
                while self._unsent:  # the transport buffers them and sends them before closing
                    self._transport.write(self._unsent.popleft())
            self._closed = True
            self._transport.close()
            self._protocol._wake()

    async def aclose(self) -> None:
        """Close and wait (briefly) until the transport is gone. Idempotent; never raises."""
        self.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
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


async def _read_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> bytes:
    # Read exactly what the decoder still needs so bytes sent right after the handshake's last
    # message (already under the post-auth cap) stay in the StreamReader for the Connection.
    while True:
        need = decoder.needed
        data = await reader.read(need) if need else b""
        if need and not data:
            raise EOFError
        frames = decoder.feed(data)
        if frames:
            return frames[0]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: _Handshake,
    decoder: FrameDecoder,
) -> None:
    if isinstance(hs, ClientHandshake):
        writer.write(encode_frame(hs.start()))
    while not hs.done:
        await writer.drain()
        reply = hs.receive(await _read_frame(reader, decoder))
        if reply is not None:
            writer.write(encode_frame(reply))
    await writer.drain()


def _abort(hs: _Handshake, error: Exception) -> bytes | None:
    # The deadline can fire just as the last message completed the handshake.
    return None if hs.done else hs.abort(error)


def _peer_label(hs: _Handshake, expected: frozenset[str] | None, default: str) -> str:
    if hs.peer_authenticated:
        return hs.peer_role
    if expected is not None and len(expected) == 1:
        return next(iter(expected))
    return default


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hs: _Handshake,
    *,
    deadline: float,
    timeout: float,
    expected: frozenset[str] | None,
    max_frame: int,
    tls: _ssl.SSLContext | None = None,
    tls_on: bool = False,
) -> Connection:
    """Run ``hs`` to completion; on failure send its refusal, close, and raise.

    ``tls``: upgrade the (paused, unread) server stream to TLS first, under the same deadline.
    ``tls_on``: the stream already runs TLS (client side), for error hints.
    """
    server = isinstance(hs, ServerHandshake)
    peername = writer.get_extra_info("peername")
    addr = _format_addr(peername)
    decoder = FrameDecoder(PREAUTH_MAX_FRAME)
    refusal: bytes | None = None
    error: ClusterError
    try:
        try:
            async with asyncio.timeout_at(deadline):
                if tls is not None:
                    # Afterwards the StreamReader still pauses the TCP transport for flow
                    # control (asyncio does not give it the TLS one): that bounds it the same.
                    await writer.start_tls(tls)
                    tls_on = True
                await _exchange(reader, writer, hs, decoder)
        except _ssl.SSLError as exc:  # before OSError, its base class
            _abort(hs, ConnectionClosedError(str(exc)))
            error = _tls_error(exc, f"TLS with {addr} failed")
            if isinstance(error, ConnectionClosedError) and tls_on and not server:
                error = ConnectionClosedError(f"{addr} closed the connection during the handshake: "
                                              f"{_REJECTED_CERT_HINT}")
            error.__cause__ = exc
        except ProtocolError as exc:  # from the handshake or the decoder
            refusal = hs.refusal if hs.failed else _abort(hs, exc)
            who = _peer_label(hs, expected, "client" if server else "server")
            if hs.refusal_reason is not None:
                msg = f"{who} {addr} refused the connection: {hs.refusal_reason}"
            else:
                msg = f"handshake with {who} {addr} failed: {exc}"
            error = type(exc)(msg)
            error.__cause__ = exc
        except TimeoutError as exc:
            msg = f"handshake timed out after {timeout:g} s"
            refusal = _abort(hs, ConnectionClosedError(msg))
            error = ConnectionClosedError(f"handshake with {addr} failed: {msg}")
            error.__cause__ = exc
        except (EOFError, OSError) as exc:  # EOF, reset, broken pipe
            _abort(hs, ConnectionClosedError(str(exc)))
            detail = f": {exc}" if str(exc) else ""
            if tls_on and not server and not hs.peer_authenticated:
                # TLS 1.3 servers check our certificate after our side of the TLS handshake
                # ended: a rejected certificate shows up here, as a bare EOF.
                detail += f" ({_REJECTED_CERT_HINT})"
            error = ConnectionClosedError(f"{addr} closed the connection during the handshake"
                                          f"{detail}")
            error.__cause__ = exc
        else:
            decoder.max_frame = max_frame
            _set_nodelay(writer)
            return Connection(
                reader, writer, SessionCipher(hs.send_key, hs.recv_key), decoder,
                peer_role=hs.peer_role, peer_info=hs.peer_info, peername=peername,
            )
    except BaseException:
        # Cancellation or a bug: never leak the socket.
        writer.transport.abort()
        raise
    if server:
        level = logging.INFO if isinstance(error, ConnectionClosedError) and refusal is None \
            else logging.WARNING
        _log.log(level, "refused connection from %s: %s", addr, error)
    if tls is not None and not tls_on:
        # The TLS upgrade failed: no refusal in plain text to a TLS peer, and the transport now
        # belongs to the dead TLS layer (a graceful close would wait for nothing): drop it.
        writer.transport.abort()
        raise error
    if refusal is not None and not writer.transport.is_closing():
        writer.write(encode_frame(refusal))
    await _close_writer(writer)
    raise error


_REJECTED_CERT_HINT = "did it reject our TLS certificate? Its log says why"


def _tls_error(exc: _ssl.SSLError, prefix: str) -> ClusterError:
    """Map a TLS failure to the error a caller can act on.

    Certificate problems are AuthenticationError (permanent, like a wrong secret), TLS
    against plain TCP is VersionMismatchError (another protocol: permanent too), an EOF is
    ConnectionClosedError, anything else ProtocolError.
    """
    kind = classify_ssl_error(exc)
    if kind == "eof":
        return ConnectionClosedError(f"{prefix}: the peer closed the connection")
    cls = {"certificate": AuthenticationError, "mismatch": VersionMismatchError}.get(kind, ProtocolError)
    return cls(f"{prefix}: {describe_ssl_error(exc)}")


async def connect(
    host: str,
    port: int,
    *,
    secret: bytes,
    role: str,
    info: Mapping[str, str],
    expected_peer_roles: frozenset[str] | set[str] | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    handshake_timeout: float = 10.0,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Connection:
    """Connect to ``host:port``, authenticate both ways, and return the connection.

    ``handshake_timeout`` bounds connecting plus the whole handshake (TLS included).
    ``ssl``: a context from :func:`clusterpy.tls.client_context` runs the clusterpy handshake
    inside TLS, which checks the server's certificate against the cluster CA and ``host``.

    Raises:
        ConnectionClosedError: cannot connect, the peer hung up, or the deadline passed.
        AuthenticationError: wrong secret or unaccepted role (either side), or a TLS
            certificate was rejected.
        VersionMismatchError: protocol, Python or cloudpickle versions differ, or one side
            speaks TLS and the other does not.
        ProtocolError: the server broke the protocol.
        ValueError: an argument is invalid.
    """
    expected = None if expected_peer_roles is None else frozenset(expected_peer_roles)
    hs = ClientHandshake(secret, role=role, info=dict(info), nonce=os.urandom(NONCE_SIZE),
                         expected_peer_roles=expected)
    FrameDecoder(max_frame)  # validate max_frame before touching the network
    deadline = asyncio.get_running_loop().time() + handshake_timeout
    addr = _format_addr((host, port))
    try:
        async with asyncio.timeout_at(deadline):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl, limit=READ_SIZE)
    except TimeoutError as exc:
        raise ConnectionClosedError(
            f"connecting to {addr} timed out after {handshake_timeout:g} s") from exc
    except _ssl.SSLError as exc:  # before OSError, its base class
        raise _tls_error(exc, f"cannot connect to {addr}") from exc
    except OSError as exc:
        raise ConnectionClosedError(f"cannot connect to {addr}: {exc}") from exc
    return await _handshake(reader, writer, hs, deadline=deadline, timeout=handshake_timeout,
                            expected=expected, max_frame=max_frame, tls_on=bool(ssl))


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    secret: bytes,
    role: str,
    info: Mapping[str, str],
    expected_peer_roles: frozenset[str] | set[str] | None = None,
    handshake_timeout: float = 10.0,
    max_frame: int = DEFAULT_MAX_FRAME,
    ssl: _ssl.SSLContext | None = None,
) -> Connection:
    """Authenticate a freshly accepted stream (inside an ``asyncio.start_server`` callback).

    On failure the refusal (if any) is sent, the writer is closed, the failure is logged on
    ``clusterpy.transport`` (WARNING for refusals), and the error is raised.

    ``ssl`` (from :func:`clusterpy.tls.server_context`): the stream is upgraded to TLS first,
    under the same ``handshake_timeout``, so a slow TLS handshake counts against the deadline
    and TLS failures are logged here like any refusal. The server must be started *without*
    ``ssl=`` and its (synchronous) connection callback must call
    ``writer.transport.pause_reading()`` before anything awaits: asyncio calls that callback
    before it first reads the socket, so no byte of the ClientHello can land in the plain
    StreamReader (a task started later could be too late).

    Raises:
        as :func:`connect` (ConnectionClosedError also for a handshake timeout).
        ValueError: an argument is invalid, or ``ssl`` is given but the transport is reading.
    """
    expected = None if expected_peer_roles is None else frozenset(expected_peer_roles)
    try:
        hs = ServerHandshake(secret, role=role, info=dict(info), nonce=os.urandom(NONCE_SIZE),
                             expected_peer_roles=expected)
        FrameDecoder(max_frame)
        transport = writer.transport
        if ssl is not None and isinstance(transport, asyncio.ReadTransport) and transport.is_reading():
            raise ValueError("accept(ssl=...) needs a transport paused before its first read; "
                             "call writer.transport.pause_reading() in the connection callback")
    except ValueError:
        writer.transport.abort()
        raise
    deadline = asyncio.get_running_loop().time() + handshake_timeout
    return await _handshake(reader, writer, hs, deadline=deadline, timeout=handshake_timeout,
                            expected=expected, max_frame=max_frame, tls=ssl)
