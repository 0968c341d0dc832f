"""Per-frame authentication after the handshake (sans-IO).

Every frame body after the handshake is::

    +-------------+-------------------+--------------------------------------+
    | seq (>Q, 8) | payload           | HMAC-SHA256(key, seq + payload) (32) |
    +-------------+-------------------+--------------------------------------+

Each direction has its own key (from :mod:`clusterpy.protocol.handshake`) and its own sequence
counter starting at 0.  The receiver checks the MAC first (in constant time) and only then
the sequence number, so a replayed, reordered, dropped, reflected or foreign frame is an
:class:`~clusterpy.errors.AuthenticationError` and nothing unauthenticated is ever parsed.

Payloads are authenticated, not encrypted: use TLS when confidentiality matters.
"""

from __future__ import annotations

import hmac
import struct

from ..errors import AuthenticationError

__all__ = ["SEQ_SIZE", "MAC_SIZE", "OVERHEAD", "SessionCipher"]

_SEQ = struct.Struct(">Q")

#: Bytes of sequence number in front of the payload.
SEQ_SIZE = _SEQ.size
#: Bytes of MAC behind the payload.
MAC_SIZE = 32
#: Total bytes a sealed body adds to its payload.
OVERHEAD = SEQ_SIZE + MAC_SIZE
_SEQ_LIMIT = 2**64


class SessionCipher:
    """Seals outgoing payloads and opens incoming bodies for one connection.

    Not thread-safe; one instance per connection, used by one sender and one receiver.
    """

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        """Create a cipher from the two directional keys the handshake produced.

        Raises:
            ValueError: a key is shorter than 16 bytes.
        """
        if len(send_key) < 16 or len(recv_key) < 16:
            raise ValueError("session keys must be at least 16 bytes long")
        # A keyed HMAC object copied per frame: copy() is cheaper than re-keying, and
        # update() lets us MAC a large payload in place instead of concatenating seq + payload.
        self._send_mac = hmac.new(send_key, digestmod="sha256")
        self._recv_mac = hmac.new(recv_key, digestmod="sha256")
        self._send_seq = 0
        self._recv_seq = 0

    @property
    def sent(self) -> int:
        """Number of payloads sealed so far (the next outgoing sequence number)."""
        return self._send_seq

    @property
    def received(self) -> int:
        """Number of bodies opened so far (the next expected sequence number)."""
        return self._recv_seq

    def seal_parts(self, payload: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
        """Seal ``payload`` and return the body as parts to be written in order.

        The payload itself is one of the parts (not copied), so it must not be mutated until
        written.  ``sum(len(p) for p in parts) == len(payload) + OVERHEAD``.

        Raises:
            OverflowError: 2**64 payloads were already sealed on this session.
        """
        seq = self._send_seq
        if seq >= _SEQ_LIMIT:
            raise OverflowError("session sequence numbers exhausted; reconnect")
        header = _SEQ.pack(seq)
        mac = self._send_mac.copy()
        mac.update(header)
        mac.update(payload)
        self._send_seq = seq + 1
        return [header, payload, mac.digest()]

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Return the sealed body for ``payload`` (see :meth:`seal_parts`).

        Raises:
            OverflowError: 2**64 payloads were already sealed on this session.
        """
        return b"".join(self.seal_parts(payload))

    def open(self, body: bytes) -> bytes:
        """Verify ``body`` and return its payload.

        The MAC is checked first with :func:`hmac.compare_digest`; only an authentic body's
        sequence number is compared with the expected one.  A failed check leaves the
        expected sequence number unchanged (the caller should drop the connection anyway).

        Raises:
            AuthenticationError: the body is too short, its MAC is wrong (tampered, foreign
                or reflected frame), or its sequence number is not the next one (replayed,
                reordered or dropped frame).
        """
        size = len(body)
        if size < OVERHEAD:
            raise AuthenticationError(
                f"frame of {size} bytes is too short to carry a sequence number and a MAC"
            )
        with memoryview(body) as view:
            mac = self._recv_mac.copy()
            mac.update(view[: size - MAC_SIZE])
            if not hmac.compare_digest(mac.digest(), view[size - MAC_SIZE :]):
                raise AuthenticationError(
                    "frame failed its MAC check: tampered, corrupted or from another session"
                )
        (seq,) = _SEQ.unpack_from(body, 0)
        if seq != self._recv_seq:
            raise AuthenticationError(
                f"frame has sequence number {seq}, expected {self._recv_seq}: "
                "replayed, reordered or dropped frame"
            )
        self._recv_seq = seq + 1
        return body[SEQ_SIZE : size - MAC_SIZE]
