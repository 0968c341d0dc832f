"""Ask nodes how they are doing: the client side of ``StatusRequest`` / ``StatusReply``.

Each query is a short authenticated session (the same handshake as a JobCluster's) that sends
one :class:`~clusterpy.protocol.messages.StatusRequest` and waits for the reply; no
computation is deployed. ``clusterpy status`` prints the results; a monitor can reuse
:func:`query_nodes`.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from .errors import ClusterError, ProtocolError
from .identity import local_info
from .protocol import codec
from .protocol import messages as m
from .transport.stream import connect

__all__ = ["NodeStatus", "query_node", "query_nodes", "discover_nodes"]


@dataclass(frozen=True)
class NodeStatus:
    """One node's answer, or why there was none (``reply`` is None, ``error`` says why)."""

    address: str
    reply: m.StatusReply | None
    error: str | None = None
    rtt: float | None = None  # seconds from request to reply

    @property
    def reachable(self) -> bool:
        return self.reply is not None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record: ``address``, ``reachable``, ``error``, ``rtt`` and the reply's fields."""
        record: dict[str, Any] = {"address": self.address, "reachable": self.reachable,
                                  "error": self.error, "rtt": self.rtt}
        if self.reply is not None:
            fields = asdict(self.reply)
            fields.pop("sent")
            fields["load"] = list(fields["load"])
            record.update(fields)
        return record


async def query_node(host: str, port: int, *, secret: bytes, timeout: float = 5.0,
                     ssl: _ssl.SSLContext | None = None) -> NodeStatus:
    """Connect to one node, authenticate, ask for its status; never raises for the node's faults.

    Args:
        timeout: bound on connecting, the handshake and the reply together, in seconds.
        ssl: a client TLS context, for nodes that require TLS.
    """
    address = f"{host}:{port}"
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            conn = await connect(host, port, secret=secret, role="client", info=local_info(), ssl=ssl,
                                 expected_peer_roles=frozenset({"node"}), handshake_timeout=timeout)
            try:
                sent = time.time()
                conn.send(codec.encode(m.StatusRequest(sent)))
                await conn.drain()
                while True:  # a node may say other things first (a ping); skip them
                    msg = codec.decode(await conn.recv())
                    if isinstance(msg, m.StatusReply) and msg.sent == sent:
                        return NodeStatus(address, msg, None, time.monotonic() - start)
                    if isinstance(msg, m.Ping):
                        conn.send(codec.encode(m.Pong(msg.sent)))
                    elif not isinstance(msg, m.Pong):
                        raise ProtocolError(f"expected StatusReply, got {type(msg).__name__}")
            finally:
                await conn.aclose()
    except TimeoutError:
        return NodeStatus(address, None, f"no answer within {timeout:g}s")
    except (ClusterError, OSError) as exc:
        return NodeStatus(address, None, str(exc) or type(exc).__name__)


async def query_nodes(addresses: Iterable[tuple[str, int]], *, secret: bytes, timeout: float = 5.0,
                      ssl: _ssl.SSLContext | None = None) -> list[NodeStatus]:
    """Query every node at once; the results are in the order of ``addresses``."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(query_node(h, p, secret=secret, timeout=timeout, ssl=ssl)) for h, p in addresses]
    return [task.result() for task in tasks]


async def discover_nodes(secret: bytes, *, port: int, wait: float = 1.0, patterns: Sequence[str] = (),
                         relays: Iterable[tuple[str, int]] = (), interfaces: str | None = None,
                         cluster_name: str = "") -> list[tuple[str, int]]:
    """Nodes that answer UDP discovery (and ``relays``) within ``wait`` seconds, in the order found.

    Broadcasts on ``interfaces`` (default ``$CLUSTERPY_DISCOVERY_INTERFACES``, else every
    interface); ``patterns`` (``"10.0.*"``) keep only matching nodes.

    Raises:
        OSError: no discovery socket could be opened.
    """
    from .transport.udp import DiscoveryClient  # only when discovering: it brings netifaces

    found: dict[tuple[str, int], None] = {}
    client = DiscoveryClient(secret, on_found=lambda f: found.setdefault((f.host, f.port)), port=port,
                             interfaces=interfaces, interval=0, relays=relays, patterns=patterns,
                             cluster_name=cluster_name)
    await client.start()
    try:
        await asyncio.sleep(wait)
    finally:
        await client.aclose()
    return list(found)
