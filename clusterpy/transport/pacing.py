"""Writing large buffers to an asyncio transport a piece at a time, as it drains.

A transport copies whatever the socket or pipe does not take at once into its own buffer
(asyncio's selector and pipe transports do, up to Python 3.11): written whole, an 8 MB
payload would mostly be copied once more. :class:`PacedWriter` keeps the buffers where they
are and hands them over in pieces of :data:`PIECE` bytes while the transport is below its
high-water mark, so at most one piece is copied. Used by the network connection
(:mod:`.connection`) and by the node's worker pipes (:mod:`clusterpy._poolworker`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["PIECE", "PacedWriter"]

#: Large buffers are handed to the transport in pieces of this size.
PIECE = 256 * 1024


class PacedWriter:
    """Writes buffers to ``transport`` in order, large ones in pieces while ``paused()`` is
    false. The owner calls :meth:`pump` when the transport drains (``resume_writing``).

    Buffers queued here must not change until written (they are not copied)."""

    __slots__ = ("transport", "_paused", "_unsent")

    def __init__(self, transport: asyncio.WriteTransport, paused: Callable[[], bool]) -> None:
        self.transport = transport
        self._paused = paused
        self._unsent: deque[memoryview] = deque()

    @property
    def pending(self) -> bool:
        """True while some bytes wait to be handed to the transport."""
        return bool(self._unsent)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` now if it is small and nothing waits, else queue it behind what waits."""
        if not self._unsent and len(data) <= PIECE:
            self.transport.write(data)
            return
        self._unsent.append(memoryview(data).cast("B"))
        self.pump()

    def pump(self) -> None:
        """Hand queued bytes to the transport, a piece at a time, until it is paused."""
        unsent = self._unsent
        if self.transport.is_closing():
            unsent.clear()
            return
        write = self.transport.write
        while unsent and not self._paused():
            view = unsent[0]
            if len(view) <= PIECE:
                unsent.popleft()
                write(view)
            else:
                unsent[0] = view[PIECE:]
                write(view[:PIECE])

    def write_all(self) -> None:
        """Hand everything queued to the transport now (it buffers it): before closing it."""
        if not self.transport.is_closing():
            while self._unsent:
                self.transport.write(self._unsent.popleft())
        self._unsent.clear()
