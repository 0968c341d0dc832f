"""clusterpy-netrelay: carry discovery requests into a network that broadcasts cannot reach.

Run it on a host of the remote network; clients name it in ``JobCluster(relays=[...])``::

    client (network A)                 relay (network B)                node (network B)
      request, unicast  ------------->  verify MAC, freshness, nonce,
      (names the client's                rate limit; then the *same
       reply address)                    bytes* to B's broadcast address --> verify, then reply
      <------------------------------------------------------------------- unicast to the
                                                                            client's address
      then TCP to the node's address, as for any discovered node

Design choice: nodes reply to the client directly, at the reply address carried inside the
authenticated request, rather than through the relay. The relay keeps no per-request state
and never sends anything to an address taken from a packet: it only broadcasts, unchanged,
requests it has verified (so it cannot be used to reflect or amplify traffic: one datagram
in, at most one datagram of the same size out per relayed network, at most ``--rate`` per
second). The cost: nodes must be able to reach the client over UDP, as the client must reach
them over TCP; behind NAT, name the nodes explicitly (``nodes=["host:port"]``) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
import time

from .discovery import DEFAULT_RELAY_PORT, DEFAULT_WINDOW, DiscoveryKey, RelayCore
from .config import OptionParser, log_level, non_negative_int, positive_float, positive_int, run_daemon
from .errors import ConfigurationError
from .identity import DEFAULT_NODE_PORT
from .transport.udp import ENV_INTERFACES, Interface, interfaces_spec, ipv4_interfaces, open_udp_socket, select_interfaces

__all__ = ["NetRelay", "main"]

log = logging.getLogger("clusterpy.netrelay")


class NetRelay:
    """The relay daemon's shell: one UDP socket, a :class:`~clusterpy.discovery.RelayCore`.

    Args:
        networks: interfaces (names, addresses, CIDR) to relay into; None: every non-loopback
            interface with a broadcast address (``$CLUSTERPY_DISCOVERY_INTERFACES`` if set).
        node_port: the nodes' UDP discovery port the broadcasts go to.
    """

    def __init__(self, secret: bytes, *, host: str = "0.0.0.0", port: int = DEFAULT_RELAY_PORT,
                 node_port: int = DEFAULT_NODE_PORT, networks: str | list[str] | None = None,
                 rate: float = 20.0, burst: int = 40, window: float = DEFAULT_WINDOW, cluster_name: str = "") -> None:
        if rate <= 0 or burst < 1:
            raise ConfigurationError("--rate must be positive and --burst at least 1")
        try:
            key = DiscoveryKey.derive(secret, cluster_name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.core = RelayCore(key, rate=rate, burst=burst, window=window)
        self.host = host
        self.port = port
        self.node_port = node_port
        self.networks = networks
        self.targets: list[Interface] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Bind and start relaying.

        Raises:
            ConfigurationError: no network to relay into.
            OSError: the address cannot be bound.
        """
        spec = interfaces_spec(self.networks)
        chosen = select_interfaces(spec) if spec is not None else [
            i for i in ipv4_interfaces() if not ipaddress.IPv4Address(i.address).is_loopback]
        self.targets = [i for i in chosen if i.broadcast]
        if not self.targets:
            raise ConfigurationError(f"no network with a broadcast address to relay into (networks: {self.networks!r})")
        loop = asyncio.get_running_loop()
        relay = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                try:
                    relay._on_datagram(data, (addr[0], addr[1]))
                except Exception:  # never let one datagram stop the relay
                    log.exception("error relaying a datagram from %s", addr)

            def error_received(self, exc: Exception) -> None:
                log.debug("relay socket: %s", exc)

        self._transport, _ = await loop.create_datagram_endpoint(Protocol, sock=open_udp_socket(self.host, self.port))
        self.port = self._transport.get_extra_info("sockname")[1]
        log.info("clusterpy-netrelay on UDP %s:%d relaying into %s (node port %d)", self.host, self.port,
                 ", ".join(f"{i.name} {i.broadcast}" for i in self.targets), self.node_port)

    def _on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        out = self.core.on_datagram(data, source, time.time())
        if out is None or self._transport is None:
            return
        src = ipaddress.IPv4Address(source[0])
        for iface in self.targets:
            if src in iface.network:
                continue  # the client can broadcast on its own network
            assert iface.broadcast is not None
            self._transport.sendto(out, (iface.broadcast, self.node_port))
        log.debug("relayed a request from %s", source)

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._closed.set()

    async def serve_forever(self) -> None:
        await self._closed.wait()


def build_parser() -> OptionParser:
    """The clusterpy-netrelay command line; every option also from CLUSTERPY_<NAME> or --config ([netrelay])."""
    opts = OptionParser(
        "clusterpy-netrelay", "netrelay",
        "Relay authenticated clusterpy discovery requests from clients on other networks "
        "into this host's networks (nodes then answer the clients directly).",
        epilog="The secret comes from --secret-file, CLUSTERPY_SECRET, CLUSTERPY_SECRET_FILE, or the\n"
               "per-user file ~/.config/clusterpy/secret, in that order: the nodes' secret.",
    )
    opts.add("--host", default="0.0.0.0", env="CLUSTERPY_RELAY_HOST", help="address to receive clients' requests on")
    opts.add("--port", type=non_negative_int, default=DEFAULT_RELAY_PORT, env="CLUSTERPY_RELAY_PORT", help="UDP port")
    opts.add("--node-port", type=non_negative_int, default=DEFAULT_NODE_PORT, help="the nodes' UDP discovery port")
    opts.add("--networks", metavar="LIST",
             help=f"comma-separated interfaces (names, addresses, CIDR) to relay into "
                  f"(default ${ENV_INTERFACES}, else every non-loopback interface)")
    opts.add("--secret-file", metavar="FILE", env=False, help="file holding the cluster secret")
    opts.add("--cluster-name", default="", help="the cluster name used by clients and nodes, if any")
    opts.add("--rate", type=positive_float, default=20.0, help="requests relayed per second at most")
    opts.add("--burst", type=positive_int, default=40, help="requests relayed in a burst at most")
    opts.add("--log-level", type=log_level, default="INFO", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    opts.add("--log-file", metavar="FILE", help="append log messages to this file instead of stderr")
    return opts


async def _serve(args: argparse.Namespace, secret: bytes) -> None:
    relay = NetRelay(secret, host=args.host, port=args.port, node_port=args.node_port, networks=args.networks,
                     rate=args.rate, burst=args.burst, cluster_name=args.cluster_name)
    await relay.start()
    print(f"clusterpy-netrelay listening on {relay.host}:{relay.port} relaying into "
          f"{','.join(i.broadcast or '' for i in relay.targets)}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(relay.aclose()))
    await relay.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """The clusterpy-netrelay console script: 0 after a clean stop, 1 if it could not run, 2 for a
    bad command line."""
    return run_daemon(build_parser(), argv, _serve)


if __name__ == "__main__":
    sys.exit(main())
