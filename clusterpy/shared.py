"""SharedJobCluster: JobCluster's API, with the nodes shared through clusterpy-scheduler.

The scheduler speaks the node protocol to its clients, so a SharedJobCluster is a JobCluster
with one link — to the scheduler — that it treats as one large node; the scheduler places the
jobs on the real nodes, fairly across its clients. Switching a script between the two is one line.
"""

from __future__ import annotations

from typing import Any

from .client import JobCluster
from .errors import ConfigurationError, SchedulerLostError
from .identity import DEFAULT_SCHEDULER_PORT

__all__ = ["SharedJobCluster"]


class SharedJobCluster(JobCluster):
    """Run ``computation`` on nodes shared with other clients through ``clusterpy-scheduler``.

    Args:
        computation, depends, setup, cleanup, callback, secret, ...: as :class:`JobCluster`.
        scheduler_host: the scheduler's address (``"host"`` or ``"host:port"``).
        scheduler_port: its port when ``scheduler_host`` has none (default 9702).

    Jobs the scheduler held when it was lost end ``Abandoned`` with :class:`SchedulerLostError`.
    Node loss, reentrant resubmission and timeouts are handled by the scheduler.
    """

    _peer_roles = frozenset({"scheduler"})
    _lost_error = SchedulerLostError

    def __init__(self, computation: Any, scheduler_host: str = "127.0.0.1", depends: Any = (), *,
                 scheduler_port: int = DEFAULT_SCHEDULER_PORT, **options: Any) -> None:
        for name in ("nodes", "local", "discover", "relays"):
            if name in options:
                raise TypeError(f"SharedJobCluster does not take {name!r}: the scheduler chooses the nodes")
        for name in ("verify", "replicas"):
            if options.get(name):
                raise ConfigurationError(
                    f"SharedJobCluster does not support {name}=: checking results needs the client to place "
                    "jobs on distinct nodes itself; use JobCluster with the nodes for it")
        # The scheduler queues and places jobs itself: send it work at once (its handshake
        # advertises a window of jobs it accepts) rather than holding a prefetch queue here.
        options.setdefault("prefetch", 0)
        super().__init__(computation, nodes=[scheduler_host], depends=depends, port=scheduler_port,
                         local=False, discover=False, **options)
