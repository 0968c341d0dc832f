"""Admission of unauthenticated connections (sans-IO): a bounded set, oldest out first.

A peer that has not authenticated yet costs a socket, a task and (with TLS) a handshake, so
their number is capped. At the cap, the *oldest* pending connection is dropped to make room
rather than the new one refused: an attacker holding connections open without finishing the
handshake (slowloris, half-open sockets) then cannot lock legitimate clients out, because a
legitimate handshake completes in milliseconds; to crowd it out the attacker would have to
open ``limit`` new connections within that time, and every one of them costs it a connection.
The handshake timeout still ends each pending connection on its own.

No I/O, no clock: callers pass ``now`` and act on the returned victims.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

__all__ = ["Admission"]

K = TypeVar("K", bound=Hashable)


class Admission(Generic[K]):
    """At most ``limit`` pending connections, keyed by anything hashable.

    Invariant: ``len(self) <= limit`` after every call.
    """

    def __init__(self, limit: int, *, report_interval: float = 1.0) -> None:
        """Raises: ValueError: ``limit < 1``."""
        if limit < 1:
            raise ValueError(f"the limit on pending handshakes must be at least 1, not {limit}")
        self.limit = limit
        self._pending: OrderedDict[K, float] = OrderedDict()  # key -> admitted at, oldest first
        self._report_interval = report_interval
        self._last_report: float | None = None
        self._unreported = 0
        #: Connections dropped to make room, in total.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending

    def admit(self, key: K, now: float) -> tuple[K, float] | None:
        """Admit ``key``; return ``(victim, its age)`` the caller must drop, or None.

        Raises:
            ValueError: ``key`` is already pending.
        """
        if key in self._pending:
            raise ValueError(f"{key!r} is already pending")
        victim = None
        if len(self._pending) >= self.limit:
            old, since = self._pending.popitem(last=False)
            victim = (old, now - since)
            self.evicted += 1
            self._unreported += 1
        self._pending[key] = now
        return victim

    def finished(self, key: K) -> None:
        """``key`` authenticated, failed or was dropped; unknown keys are ignored."""
        self._pending.pop(key, None)

    def report_due(self, now: float) -> int:
        """How many evictions to report now (0: stay quiet); at most one report per interval,
        so a flood of connections cannot flood the log too."""
        if not self._unreported:
            return 0
        if self._last_report is not None and now - self._last_report < self._report_interval:
            return 0
        count, self._unreported, self._last_report = self._unreported, 0, now
        return count
