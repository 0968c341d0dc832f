"""UDP discovery: the asyncio shells around :mod:`clusterpy.discovery`, and interfaces.

::

    node (DiscoveryResponder)                        client (DiscoveryClient)
    -------------------------                        ------------------------
    socket on (host, port)  <-- broadcast request -- request socket (0.0.0.0:ephemeral)
    [+ socket on the broadcast address of host]         sends to each selected interface's
    NodeResponder decides --- unicast reply -------->   broadcast address:port, and unicast
    announce on start and every announce_interval        to each relay (with its reply address)
        to the broadcast address of each interface   announcement listeners on
        it listens on -------- broadcast announce -->   (broadcast address, port) per interface
                                                     ClientDiscovery decides -> on_found(Found)

Where broadcasts go is always a choice of *interfaces*: a node bound to 127.0.0.1 announces
only on loopback; bound to 0.0.0.0, on every interface (or those named by
``discovery_interfaces`` / ``$CLUSTERPY_DISCOVERY_INTERFACES``). A client broadcasts on the
interfaces its ``discovery_interfaces`` select (default: every IPv4 interface).

Every socket is opened with SO_REUSEADDR so that several nodes and clients on one host can
all listen on the discovery port: the kernel delivers a broadcast to each of them (a unicast
datagram reaches one socket only, which is why replies go to the client's own ephemeral port).
Nothing received can make these shells raise: the cores drop and log bad datagrams, and a
bug in a handler is logged, not propagated into the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import netifaces

from ..errors import ConfigurationError
from ..discovery import ClientDiscovery, DiscoveryKey, Found, NodeResponder

__all__ = [
    "ENV_INTERFACES",
    "Interface",
    "ipv4_interfaces",
    "interface_from_entry",
    "interfaces_spec",
    "select_interfaces",
    "local_address_toward",
    "open_udp_socket",
    "DiscoveryResponder",
    "DiscoveryClient",
    "add_discovery_arguments",
    "discovery_options",
]

log = logging.getLogger("clusterpy.transport.udp")

#: Comma-separated interface names (wildcards allowed), addresses or CIDR networks that
#: limit where clusterpy broadcasts when the program does not say; "none" disables.
ENV_INTERFACES = "CLUSTERPY_DISCOVERY_INTERFACES"

_Handler = Callable[[bytes, tuple[str, int]], None]


@dataclass(frozen=True)
class Interface:
    """One IPv4 address of a network interface; ``broadcast`` is None on point-to-point links."""

    name: str
    address: str
    netmask: str
    broadcast: str | None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.address}/{self.netmask}", strict=False)


def ipv4_interfaces() -> list[Interface]:
    """Every IPv4 address of every interface (netifaces), with its broadcast address.

    Loopback has no broadcast flag, but Linux delivers datagrams sent to 127.255.255.255 to
    every socket listening on loopback, so the broadcast address is computed from the
    netmask when the interface does not report one.
    """
    found = []
    for name in netifaces.interfaces():
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            iface = interface_from_entry(name, entry)
            if iface is not None:
                found.append(iface)
    return found


def interface_from_entry(name: str, entry: dict[str, str]) -> Interface | None:
    """One netifaces AF_INET entry as an :class:`Interface` (None if unusable).

    netifaces reports the interface's own address as its broadcast address when none is
    configured (``ip addr add 10.0.0.2/24`` without ``brd +``); a reported broadcast address
    that is not in the network, or is the address itself, is replaced by the computed one.
    """
    addr, mask = entry.get("addr"), entry.get("netmask")
    if not addr or not mask:
        return None
    try:
        net = ipaddress.IPv4Network(f"{addr}/{mask}", strict=False)
        bcast: str | None = entry.get("broadcast")
        if bcast and (bcast == addr or ipaddress.IPv4Address(bcast) not in net):
            bcast = None
    except ValueError:
        return None
    point_to_point = "peer" in entry and entry["peer"] != addr
    if not bcast and net.prefixlen < 31 and not point_to_point:
        bcast = str(net.broadcast_address)
    return Interface(name, addr, mask, bcast or None)


def interfaces_spec(value: str | Iterable[str] | None) -> list[str] | None:
    """Normalize a ``discovery_interfaces`` value; None falls back to the environment.

    Returns None for "every interface", else the list of selectors (empty: none).
    """
    if value is None:
        value = os.environ.get(ENV_INTERFACES)
        if value is None:
            return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    if any(v in ("*", "all") for v in items):
        return None
    return [v for v in items if v != "none"]


def _selects(selector: str, iface: Interface) -> bool:
    if fnmatch.fnmatchcase(iface.name, selector) or selector == iface.address:
        return True
    try:
        return ipaddress.IPv4Address(iface.address) in ipaddress.IPv4Network(selector, strict=False)
    except ValueError:
        return False


def select_interfaces(spec: Sequence[str] | None, interfaces: Sequence[Interface] | None = None) -> list[Interface]:
    """The interfaces that ``spec`` (from :func:`interfaces_spec`) selects.

    A selector is an interface name (shell wildcards allowed: ``"eth*"``), one of the
    interface's addresses, or a network in CIDR notation containing it.
    """
    interfaces = ipv4_interfaces() if interfaces is None else list(interfaces)
    if spec is None:
        return interfaces
    return [i for i in interfaces if any(_selects(s, i) for s in spec)]


def local_address_toward(host: str) -> str | None:
    """The local IPv4 address the kernel would use to reach ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return str(s.getsockname()[0])
        except OSError:
            return None


def open_udp_socket(host: str, port: int, *, broadcast: bool = True) -> socket.socket:
    """A non-blocking IPv4 UDP socket bound to ``(host, port)`` with SO_REUSEADDR.

    Raises:
        OSError: the address cannot be bound.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, handler: _Handler, what: str) -> None:
        self.handler = handler
        self.what = what

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.handler(data, (addr[0], addr[1]))
        except Exception:  # a bug here must not stop the socket; attackers only reach DEBUG paths
            log.exception("%s: error handling a datagram from %s", self.what, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: %s", self.what, exc)  # e.g. ICMP port unreachable after a reply


async def _endpoint(sock: socket.socket, handler: _Handler, what: str) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(handler, what), sock=sock)
    return transport


async def _resolve_ipv4(host: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM), 2.0)
    except (OSError, asyncio.TimeoutError) as exc:
        log.debug("cannot resolve %s: %s", host, exc)
        return None
    return str(infos[0][4][0]) if infos else None


# -------------------------------------------------------------------- node


def add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    """The discovery options of clusterpy-node (turned into NodeServer arguments by
    :func:`discovery_options`)."""
    g = parser.add_argument_group("discovery (UDP)")
    g.add_argument("--no-discovery", action="store_true",
                   help="do not answer discovery requests nor announce this node")
    g.add_argument("--discovery-port", type=int, default=None,
                   help="UDP port for discovery (default: the TCP port, or 9700 with --port 0)")
    g.add_argument("--advertise", "--ext-host", dest="advertise", default=None, metavar="ADDRESS",
                   help="address clients should connect to, announced instead of ours (NAT, port forwarding)")
    g.add_argument("--announce-interval", type=float, default=60.0, metavar="SECONDS",
                   help="re-announce this node every SECONDS (default 60; 0: only at start)")
    g.add_argument("--discovery-interfaces", default=None, metavar="LIST",
                   help=f"comma-separated interfaces (names, addresses, CIDR) to announce on when listening "
                   f"on 0.0.0.0 (default ${ENV_INTERFACES}, else every interface; 'none' for none)")
    g.add_argument("--cluster-name", default="",
                   help="only clients using the same secret and this name discover this node")


def discovery_options(args: argparse.Namespace) -> dict[str, Any]:
    """NodeServer keyword arguments from :func:`add_discovery_arguments`' options."""
    return {"discovery": not args.no_discovery, "discovery_port": args.discovery_port,
            "advertise": args.advertise, "announce_interval": args.announce_interval,
            "discovery_interfaces": args.discovery_interfaces, "cluster_name": args.cluster_name}



class DiscoveryResponder:
    """A node's discovery: answer verified requests, announce on the interfaces it listens on.

    Never fails the node: if the discovery port cannot be bound, discovery is off (logged).
    """

    def __init__(self, secret: bytes, *, host: str, port: int, tcp_port: int, cpus: int, node_id: str,
                 advertise: str | None = None, announce_interval: float = 60.0,
                 interfaces: str | Iterable[str] | None = None, cluster_name: str = "") -> None:
        self.secret = secret
        self.host = host
        self.port = port
        self.tcp_port = tcp_port
        self.cpus = cpus
        self.node_id = node_id
        self.advertise = advertise
        self.announce_interval = announce_interval
        self.interfaces = interfaces
        self.cluster_name = cluster_name
        self.core: NodeResponder | None = None
        self._main: asyncio.DatagramTransport | None = None
        self._transports: list[asyncio.DatagramTransport] = []
        self._targets: list[tuple[str, str]] = []  # (broadcast address, our address there)
        self._bound: str | None = None  # specific address we listen on, None for 0.0.0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self._main is not None

    async def start(self) -> None:
        advertise = await _resolve_ipv4(self.advertise) if self.advertise else None
        if self.advertise and advertise is None:
            log.warning("discovery off: cannot resolve the advertised address %r to IPv4", self.advertise)
            return
        wildcard = self.host in ("", "0.0.0.0")
        bound = None if wildcard else await _resolve_ipv4(self.host)
        if not wildcard and bound is None:
            log.info("discovery off: %r is not an IPv4 address (IPv6 discovery is not supported)", self.host)
            return
        try:
            key = DiscoveryKey.derive(self.secret, self.cluster_name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.core = NodeResponder(key, tcp_port=self.tcp_port, cpus=self.cpus,
                                  incarnation=bytes.fromhex(self.node_id), advertise=advertise)
        selected = select_interfaces(interfaces_spec(self.interfaces))
        listened = selected if wildcard else [i for i in selected if i.address == bound]
        self._bound = bound
        self._targets = [(i.broadcast, i.address) for i in listened if i.broadcast]
        try:
            self._main = await _endpoint(open_udp_socket(bound or "0.0.0.0", self.port), self._on_datagram, "node discovery")
            self._transports.append(self._main)
            if not wildcard:  # a socket bound to one address does not receive broadcasts
                for bcast, _ in self._targets:
                    self._transports.append(await _endpoint(
                        open_udp_socket(bcast, self.port, broadcast=False), self._on_datagram, "node discovery"))
        except OSError as exc:
            log.warning("discovery off: cannot listen on UDP %s:%d: %s", self.host, self.port, exc)
            await self.aclose()
            return
        log.info("discovery on UDP %s:%d, announcing on %s", bound or "0.0.0.0", self.port,
                 ", ".join(b for b, _ in self._targets) or "no interface")
        self._task = asyncio.ensure_future(self._announce_loop())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await _stop(task, self._transports)
        self._main = None

    async def _announce_loop(self) -> None:
        while True:
            self.announce()
            if self.announce_interval <= 0:
                return
            await asyncio.sleep(self.announce_interval)

    def announce(self) -> None:
        """Broadcast one announcement on each interface this node listens on."""
        if self._main is None or self.core is None:
            return
        for bcast, address in self._targets:
            self._main.sendto(self.core.announce(address, time.time(), os.urandom(16)), (bcast, self.port))

    def _on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        if self.core is None or self._main is None:
            return
        dest = self.core.on_datagram(data, source, time.time())
        if dest is None:
            return
        address = self._bound or local_address_toward(dest[0])
        if address is None:
            log.debug("no route to %s for a discovery reply", dest[0])
            return
        self._main.sendto(self.core.reply(address, time.time(), os.urandom(16)), dest)


# -------------------------------------------------------------------- client


class DiscoveryClient:
    """A client's discovery: broadcast requests, ask relays, hear announcements.

    ``on_found`` is called in the event loop for each new node (see
    :class:`~clusterpy.discovery.ClientDiscovery` for what counts as new).
    """

    def __init__(self, secret: bytes, *, on_found: Callable[[Found], None], port: int,
                 interfaces: str | Iterable[str] | None = None, interval: float = 30.0,
                 relays: Iterable[tuple[str, int]] = (), patterns: Sequence[str] = (),
                 explicit: Iterable[tuple[str, int]] = (), cluster_name: str = "") -> None:
        self.secret = secret
        self.on_found = on_found
        self.port = port
        self.interfaces = interfaces
        self.interval = interval
        self.relays = list(relays)
        self.patterns = list(patterns)
        self.explicit = list(explicit)
        self.cluster_name = cluster_name
        self.core: ClientDiscovery | None = None
        self.broadcasts: list[str] = []
        self.request_port = 0
        self._request: asyncio.DatagramTransport | None = None
        self._transports: list[asyncio.DatagramTransport] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the sockets and start asking.

        Raises:
            ConfigurationError: a bad cluster name, or not even the request socket opens.
        """
        try:
            key = DiscoveryKey.derive(self.secret, self.cluster_name)
            sock = open_udp_socket("0.0.0.0", 0)
        except (ValueError, OSError) as exc:
            raise ConfigurationError(f"cannot start discovery: {exc}") from exc
        self.core = ClientDiscovery(key, client_id=os.urandom(16), patterns=self.patterns)
        ifaces = [i for i in select_interfaces(interfaces_spec(self.interfaces)) if i.broadcast]
        self.broadcasts = sorted({i.broadcast for i in ifaces if i.broadcast})
        self._request = await _endpoint(sock, self._on_datagram, "client discovery")
        self._transports.append(self._request)
        self.request_port = self._request.get_extra_info("sockname")[1]
        for bcast in self.broadcasts:
            try:  # announcements arrive on the discovery port
                self._transports.append(await _endpoint(
                    open_udp_socket(bcast, self.port, broadcast=False), self._on_datagram, "client discovery"))
            except OSError as exc:
                log.warning("cannot listen for node announcements on %s:%d: %s", bcast, self.port, exc)
        log.info("discovery: broadcasting on %s port %d%s", ", ".join(self.broadcasts) or "no interface",
                 self.port, f", relays {self.relays}" if self.relays else "")
        self._task = asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await _stop(task, self._transports)
        self._request = None

    def forget(self, node_id: str) -> None:
        if self.core is not None:
            self.core.forget(node_id)

    async def _run(self) -> None:
        assert self.core is not None
        for host, port in self.explicit:  # resolved, so a node we know by name is not added twice
            resolved = await _resolve_ipv4(host)
            if resolved:
                self.core.explicit.add((resolved, port))
        relays = []
        for host, port in self.relays:
            resolved = await _resolve_ipv4(host)
            if resolved is None:
                log.warning("discovery relay %s:%d cannot be resolved; not used", host, port)
            else:
                relays.append((resolved, port))
        # Twice at first, in case one datagram is lost; then every interval.
        self.send_requests(relays)
        await asyncio.sleep(0.3)
        while True:
            self.send_requests(relays)
            if self.interval <= 0:
                return
            await asyncio.sleep(self.interval)

    def send_requests(self, relays: Sequence[tuple[str, int]]) -> None:
        if self._request is None or self.core is None:
            return
        for bcast in self.broadcasts:
            self._request.sendto(self.core.request(time.time(), os.urandom(16)), (bcast, self.port))
        for relay in relays:
            # A relayed request must name where to reply: the relay's broadcast has the relay's source.
            me = local_address_toward(relay[0])
            if me is None:
                log.debug("no route to relay %s:%d", *relay)
                continue
            self._request.sendto(self.core.request(time.time(), os.urandom(16), (me, self.request_port)), relay)

    def _on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        if self.core is None:
            return
        found = self.core.on_datagram(data, source, time.time())
        if found is not None:
            log.info("discovered node %s:%d (%d CPUs, by %s)", found.host, found.port, found.cpus, found.via)
            self.on_found(found)


async def _stop(task: asyncio.Task[Any] | None, transports: list[asyncio.DatagramTransport]) -> None:
    """Cancel a discovery shell's task and close its sockets."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for transport in transports:
        transport.close()
    transports.clear()
