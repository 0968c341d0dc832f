"""Discovery packets and the decisions around them (sans-IO).

A discovery packet is a fixed 108-byte struct, never pickle, authenticated with an HMAC::

    offset size field
         0    4 magic          b"CPYD"
         4    1 version        1
         5    1 type           1 request, 2 announce, 3 reply
         6    2 flags          0 (reserved)
         8    8 cluster id     derived from the secret and the cluster name
        16    8 timestamp      milliseconds since the epoch, from the sender's clock
        24   16 nonce          random, unique per packet
        40   16 address        IPv6 or IPv4-mapped (::ffff:a.b.c.d); :: = unspecified
        56    2 port
        58    2 cpus
        60   16 incarnation    the node's id (announce, reply) or the client's id (request)
        76   32 mac            HMAC-SHA256(discovery key, bytes 0..75)

``address``/``port`` are the node's TCP address in an announce or a reply, and where to
reply in a request (unspecified: to the request's source address and port).

Keys: ``prk = HMAC(secret, "clusterpy/1 discovery\\0" + name)``, the MAC key is
``HMAC(prk, "mac")`` and the cluster id ``HMAC(prk, "cluster-id")[:8]``. The label differs
from every handshake label (see :mod:`clusterpy.protocol.handshake`), so no discovery MAC
can ever serve as a handshake proof. Two clusters with different secrets or names have
different cluster ids and keys: their packets fail verification at each other.

Verification (:class:`Verifier`), in this order: exact size, MAC (``hmac.compare_digest``),
header fields, freshness (``|now - timestamp| <= window``), then the nonce must not be in
the bounded replay cache. Anything that fails is *dropped*: the cores return nothing and log
the reason at DEBUG; no packet a peer sends can make the receive path raise.

The cores below decide; the asyncio shells in :mod:`clusterpy.transport.udp` and
:mod:`clusterpy.netrelay` own the sockets, the clock and the random nonces.
"""

from __future__ import annotations

import collections
import enum
import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_RELAY_PORT",
    "DEFAULT_WINDOW",
    "PACKET_SIZE",
    "PacketType",
    "Packet",
    "DiscoveryKey",
    "Rejected",
    "Verifier",
    "encode_packet",
    "NodeResponder",
    "Found",
    "ClientDiscovery",
    "RelayCore",
    "is_pattern",
    "match_pattern",
    "NodePlan",
    "plan_nodes",
]

log = logging.getLogger("clusterpy.discovery")

#: UDP port of clusterpy-netrelay.
DEFAULT_RELAY_PORT = 9701
#: Seconds a packet's timestamp may differ from the receiver's clock.
DEFAULT_WINDOW = 30.0
#: Nonces remembered per receiver; see :class:`Verifier` for what happens when it is full.
DEFAULT_REPLAY_CAPACITY = 4096

MAGIC = b"CPYD"
VERSION = 1
_LABEL = b"clusterpy/1 discovery\0"
_HEADER = struct.Struct("!4sBBH8sQ16s")
_BODY = struct.Struct("!16sHH16s")
MAC_SIZE = 32
NONCE_SIZE = 16
ID_SIZE = 16
PACKET_SIZE = _HEADER.size + _BODY.size + MAC_SIZE
_MAX_NAME = 64
_UNSPECIFIED = bytes(16)


class PacketType(enum.IntEnum):
    REQUEST = 1
    ANNOUNCE = 2
    REPLY = 3


@dataclass(frozen=True)
class Packet:
    """A verified (or to-be-sent) discovery packet; ``address`` is "" when unspecified."""

    type: PacketType
    timestamp: float
    nonce: bytes
    address: str = ""
    port: int = 0
    cpus: int = 0
    incarnation: bytes = bytes(ID_SIZE)


@dataclass(frozen=True)
class DiscoveryKey:
    """The discovery MAC key and the cluster id, derived from the cluster secret."""

    mac_key: bytes
    cluster_id: bytes

    @classmethod
    def derive(cls, secret: bytes, name: str = "") -> "DiscoveryKey":
        """Derive the key for ``secret`` and the optional cluster ``name``.

        Raises:
            ValueError: ``name`` is longer than 64 characters.
        """
        if len(name) > _MAX_NAME:
            raise ValueError(f"the cluster name is at most {_MAX_NAME} characters")
        prk = hmac.new(secret, _LABEL + name.encode("utf-8"), hashlib.sha256).digest()
        return cls(hmac.new(prk, b"mac", hashlib.sha256).digest(),
                   hmac.new(prk, b"cluster-id", hashlib.sha256).digest()[:8])


@dataclass(frozen=True)
class Rejected:
    """Why a datagram was dropped (for the DEBUG log and for tests)."""

    reason: str


def _pack_address(address: str) -> bytes:
    if not address:
        return _UNSPECIFIED
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return ip.packed


def _unpack_address(raw: bytes) -> str:
    if raw == _UNSPECIFIED:
        return ""
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def encode_packet(key: DiscoveryKey, packet: Packet) -> bytes:
    """Serialize and MAC ``packet``.

    Raises:
        ValueError: a field is out of range (bad address, port, nonce or id size).
    """
    if len(packet.nonce) != NONCE_SIZE or len(packet.incarnation) != ID_SIZE:
        raise ValueError("nonce and incarnation must be 16 bytes")
    if not (0 <= packet.port <= 0xFFFF and 0 <= packet.cpus <= 0xFFFF):
        raise ValueError("port and cpus must fit in 16 bits")
    body = _HEADER.pack(MAGIC, VERSION, int(packet.type), 0, key.cluster_id,
                        max(0, int(packet.timestamp * 1000)), packet.nonce)
    body += _BODY.pack(_pack_address(packet.address), packet.port, packet.cpus, packet.incarnation)
    return body + hmac.new(key.mac_key, body, hashlib.sha256).digest()


class Verifier:
    """Authenticate datagrams: MAC, then freshness, then a bounded replay cache.

    The replay cache keeps each accepted nonce until its packet is too old to pass the
    freshness check anyway. When ``capacity`` nonces are remembered, the oldest is forgotten
    first: replaying it then needs more than ``capacity`` *valid* packets within the window,
    which only holders of the secret can produce.
    """

    def __init__(self, key: DiscoveryKey, *, window: float = DEFAULT_WINDOW,
                 capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        self.key = key
        self.window = window
        self.capacity = capacity
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def verify(self, data: bytes, now: float) -> Packet | Rejected:
        """Return the verified packet, or why it was rejected. Never raises."""
        if len(data) != PACKET_SIZE:
            return Rejected(f"size {len(data)}, expected {PACKET_SIZE}")
        body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        expected = hmac.new(self.key.mac_key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            other = body[8:16] != self.key.cluster_id
            return Rejected("another cluster (cluster id differs)" if other else "bad MAC")
        magic, version, ptype, flags, _cid, stamp, nonce = _HEADER.unpack_from(body)
        raw_addr, port, cpus, incarnation = _BODY.unpack_from(body, _HEADER.size)
        if magic != MAGIC or version != VERSION or flags != 0 or ptype not in PacketType._value2member_map_:
            return Rejected(f"unsupported header (version {version}, type {ptype}, flags {flags})")
        timestamp = stamp / 1000.0
        if abs(now - timestamp) > self.window:
            return Rejected(f"stale: timestamp {now - timestamp:+.1f}s from now")
        self._expire(now)
        if nonce in self._seen:
            return Rejected("replayed nonce")
        try:
            address = _unpack_address(raw_addr)
        except ValueError:  # pragma: no cover - every 16-byte value is an IPv6 address
            return Rejected("bad address")
        self._seen[nonce] = timestamp + self.window
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return Packet(PacketType(ptype), timestamp, nonce, address, port, cpus, incarnation)

    def _expire(self, now: float) -> None:
        # Insertion order is nearly time order; stop at the first entry still needed.
        while self._seen:
            nonce, until = next(iter(self._seen.items()))
            if until >= now:
                break
            del self._seen[nonce]


def _usable_unicast(address: str) -> bool:
    """A concrete unicast address worth sending to (not multicast, broadcast or unspecified)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"))


# -------------------------------------------------------------------- node


class NodeResponder:
    """What a node says: announcements, and replies to verified requests.

    Use: ``dest = on_datagram(data, source, now)``; if not None, send
    ``reply(dest_local_address, now, nonce)`` to ``dest``.
    """

    def __init__(self, key: DiscoveryKey, *, tcp_port: int, cpus: int, incarnation: bytes,
                 advertise: str | None = None, window: float = DEFAULT_WINDOW) -> None:
        """``advertise`` (an IP address) overrides the address put in every packet (NAT)."""
        if advertise is not None:
            ipaddress.ip_address(advertise)  # ValueError early, not at the first packet
        self.key = key
        self.tcp_port = tcp_port
        self.cpus = min(cpus, 0xFFFF)
        self.incarnation = incarnation
        self.advertise = advertise
        self.verifier = Verifier(key, window=window)

    def on_datagram(self, data: bytes, source: tuple[str, int], now: float) -> tuple[str, int] | None:
        """Return where to send a reply, or None (dropped or nothing to answer).

        The destination is the source of the packet, or the reply address carried in the
        *verified* request (a client that asked through a relay); never an address from a
        packet that failed verification.
        """
        packet = self.verifier.verify(data, now)
        if isinstance(packet, Rejected):
            log.debug("dropped discovery datagram from %s: %s", source, packet.reason)
            return None
        if packet.type is not PacketType.REQUEST:
            return None  # other nodes' announcements and replies are not for us
        if not packet.address:
            return source
        if packet.port == 0 or not _usable_unicast(packet.address):
            log.debug("dropped request from %s: unusable reply address %s:%d", source, packet.address, packet.port)
            return None
        return packet.address, packet.port

    def _packet(self, ptype: PacketType, address: str, now: float, nonce: bytes) -> bytes:
        return encode_packet(self.key, Packet(ptype, now, nonce, self.advertise or address,
                                              self.tcp_port, self.cpus, self.incarnation))

    def reply(self, address: str, now: float, nonce: bytes) -> bytes:
        """A reply naming ``address`` (the node's address toward the client) unless advertised."""
        return self._packet(PacketType.REPLY, address, now, nonce)

    def announce(self, address: str, now: float, nonce: bytes) -> bytes:
        """An announcement for the network where this node's address is ``address``."""
        return self._packet(PacketType.ANNOUNCE, address, now, nonce)


# -------------------------------------------------------------------- client


def is_pattern(spec: str) -> bool:
    """True for a wildcard node pattern (``"192.168.1.*"``), False for an explicit address."""
    return any(c in spec for c in "*?[")


def match_pattern(pattern: str, host: str, port: int) -> bool:
    """Does the node at ``host:port`` match ``pattern`` (``"10.0.*"`` or ``"10.0.*:9700"``)?"""
    head, sep, tail = pattern.rpartition(":")
    if sep and tail.isdigit() and head:
        return int(tail) == port and fnmatch.fnmatchcase(host, head)
    return fnmatch.fnmatchcase(host, pattern)


@dataclass(frozen=True)
class NodePlan:
    """How a client finds its nodes, decided from its arguments (see :func:`plan_nodes`)."""

    explicit: tuple[str, ...]  # connected directly
    patterns: tuple[str, ...]  # filter what discovery finds
    discover: bool
    local: bool  # start the embedded local node at once
    fallback: float | None  # start it if nothing is discovered within this many seconds


def plan_nodes(nodes: Sequence[str], *, discover: bool | None, local: bool | None, relays: bool,
               wait: float) -> NodePlan:
    """Decide discovery and the embedded local node from ``JobCluster``'s arguments.

    ``discover=None`` means: discover when no node is named (unless ``local=True`` asks for
    the local node only), when a wildcard pattern is given, or when relays are given.
    ``local=None`` means: the local node only when no node is named, and then, if
    discovery is on, only if nothing is discovered within ``wait`` seconds.

    Raises:
        ValueError: ``wait`` is negative.
    """
    if wait < 0:
        raise ValueError("discovery_wait must not be negative")
    patterns = tuple(n for n in nodes if is_pattern(n))
    explicit = tuple(n for n in nodes if not is_pattern(n))
    if discover is None:
        discover = bool(patterns) or relays or (not nodes and local is not True)
    fallback = None
    if local is None:
        local = not nodes and not discover
        if not nodes and discover:
            fallback = wait
    return NodePlan(explicit, patterns, discover, local, fallback)


@dataclass(frozen=True)
class Found:
    """A node to connect to: verified, new, and selected by the client's patterns."""

    host: str
    port: int
    cpus: int
    incarnation: str  # hex, the node id it will show in the handshake
    via: str  # "reply" or "announce"


class ClientDiscovery:
    """The client's side: build requests, turn verified answers into new nodes.

    Args:
        patterns: wildcard patterns a discovered node must match (empty: every node).
        explicit: ``(host, port)`` of nodes the client connects to directly; discovering
            them again is not news.
    """

    def __init__(self, key: DiscoveryKey, *, client_id: bytes, patterns: Sequence[str] = (),
                 explicit: Iterable[tuple[str, int]] = (), window: float = DEFAULT_WINDOW) -> None:
        self.key = key
        self.client_id = client_id
        self.patterns = tuple(patterns)
        self.explicit = set(explicit)
        self.verifier = Verifier(key, window=window)
        self._known: dict[str, tuple[str, int]] = {}

    def request(self, now: float, nonce: bytes, reply_to: tuple[str, int] | None = None) -> bytes:
        """A request; ``reply_to`` is the client's own address for requests sent through a relay."""
        host, port = reply_to or ("", 0)
        return encode_packet(self.key, Packet(PacketType.REQUEST, now, nonce, host, port, 0, self.client_id))

    def on_datagram(self, data: bytes, source: tuple[str, int], now: float) -> Found | None:
        """Return the node to connect to, or None (dropped, filtered, or known already)."""
        packet = self.verifier.verify(data, now)
        if isinstance(packet, Rejected):
            log.debug("dropped discovery datagram from %s: %s", source, packet.reason)
            return None
        if packet.type is PacketType.REQUEST:
            return None  # our own broadcast, or another client's
        if not packet.address or packet.port == 0 or not _usable_unicast(packet.address):
            log.debug("dropped %s from %s: unusable node address", packet.type.name.lower(), source)
            return None
        incarnation = packet.incarnation.hex()
        address = (packet.address, packet.port)
        if incarnation in self._known:
            return None
        self._known[incarnation] = address
        if address in self.explicit:
            return None
        if self.patterns and not any(match_pattern(p, *address) for p in self.patterns):
            log.debug("node %s:%d does not match %s; not used", *address, list(self.patterns))
            return None
        return Found(packet.address, packet.port, packet.cpus, incarnation, packet.type.name.lower())

    def forget(self, incarnation: str) -> None:
        """The node was lost: let its next answer bring it back."""
        self._known.pop(incarnation, None)


# -------------------------------------------------------------------- relay


class RelayCore:
    """clusterpy-netrelay's decisions: relay verified, fresh requests, at a bounded rate.

    ``on_datagram`` returns the datagram to broadcast, unchanged (so it stays authenticated
    and the same size: no amplification), or None. Only requests that name the client's own
    reply address are relayed: a node answers that verified address, never the relay.
    The rate limit is a token bucket of ``burst`` requests refilled at ``rate`` per second.
    """

    def __init__(self, key: DiscoveryKey, *, rate: float = 20.0, burst: int = 40,
                 window: float = DEFAULT_WINDOW) -> None:
        self.verifier = Verifier(key, window=window)
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None
        self.relayed = 0
        self.dropped = 0

    def on_datagram(self, data: bytes, source: tuple[str, int], now: float) -> bytes | None:
        reason = self._check(data, now)
        if reason is not None:
            self.dropped += 1
            log.debug("not relaying datagram from %s: %s", source, reason)
            return None
        self.relayed += 1
        return data

    def _check(self, data: bytes, now: float) -> str | None:
        packet = self.verifier.verify(data, now)
        if isinstance(packet, Rejected):
            return packet.reason
        if packet.type is not PacketType.REQUEST:
            return f"a {packet.type.name.lower()}, only requests are relayed"
        if not packet.address or packet.port == 0 or not _usable_unicast(packet.address):
            return "no usable reply address in the request"
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            return "rate limit"
        self._tokens -= 1.0
        return None
