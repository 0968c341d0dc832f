"""asyncio TCP/TLS adapter for the clusterpy wire protocol: a thin shell. This module dials and
accepts (the handshake); the authenticated :class:`~.connection.Connection` it returns is in
:mod:`.connection`.

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
from collections.abc import Mapping

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
)
from ..protocol.handshake import NONCE_SIZE, ClientHandshake, ServerHandshake
from ..protocol.session import SessionCipher
from ..tls import classify_ssl_error, describe_ssl_error
from .connection import CLOSE_TIMEOUT, Connection, format_addr

__all__ = ["READ_SIZE", "Connection", "connect", "accept"]

_log = logging.getLogger("clusterpy.transport")

#: Bytes asked of the StreamReader per read once authenticated.
READ_SIZE = 256 * 1024
_Handshake = ClientHandshake | ServerHandshake


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
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


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
    addr = format_addr(peername)
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
    addr = format_addr((host, port))
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
