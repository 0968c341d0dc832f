"""Discovery packets and decisions, without sockets (clusterpy.discovery), plus the interface
helpers and one real round trip on loopback."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterpy
from clusterpy import discovery as d
from clusterpy.transport import udp

from .conftest import REPO

KEY = d.DiscoveryKey.derive(b"s" * 32)
NOW = 1_700_000_000.0


def nonce(i: int) -> bytes:
    return i.to_bytes(16, "big")


def node_core(**kw) -> d.NodeResponder:
    return d.NodeResponder(KEY, tcp_port=9700, cpus=4, incarnation=nonce(0xAB), **kw)


def client_core(**kw) -> d.ClientDiscovery:
    return d.ClientDiscovery(KEY, client_id=nonce(0xC1), **kw)


# -------------------------------------------------------------------- packet format


def test_packet_is_fixed_small_and_round_trips():
    assert d.PACKET_SIZE == 108
    pkt = d.Packet(d.PacketType.REPLY, NOW, nonce(1), "10.0.0.5", 9700, 8, nonce(2))
    data = d.encode_packet(KEY, pkt)
    assert len(data) == d.PACKET_SIZE and data[:4] == b"CPYD"
    assert d.Verifier(KEY).verify(data, NOW + 1) == pkt
    v6 = d.Packet(d.PacketType.ANNOUNCE, NOW, nonce(3), "fe80::1", 1, 1, nonce(4))
    assert d.Verifier(KEY).verify(d.encode_packet(KEY, v6), NOW) == v6


def test_keys_are_domain_separated_and_per_cluster():
    other_secret = d.DiscoveryKey.derive(b"t" * 32)
    named = d.DiscoveryKey.derive(b"s" * 32, "blue")
    ids = {KEY.cluster_id, other_secret.cluster_id, named.cluster_id}
    keys = {KEY.mac_key, other_secret.mac_key, named.mac_key}
    assert len(ids) == 3 and len(keys) == 3
    assert KEY.mac_key != b"s" * 32  # never the secret itself
    with pytest.raises(ValueError):
        d.DiscoveryKey.derive(b"s" * 32, "x" * 65)


@pytest.mark.parametrize("other", [d.DiscoveryKey.derive(b"t" * 32), d.DiscoveryKey.derive(b"s" * 32, "blue")])
def test_other_cluster_is_rejected(other):
    data = d.encode_packet(other, d.Packet(d.PacketType.REPLY, NOW, nonce(1), "10.0.0.5", 9700, 1, nonce(2)))
    result = d.Verifier(KEY).verify(data, NOW)
    assert isinstance(result, d.Rejected) and "another cluster" in result.reason


def test_every_flipped_bit_is_rejected():
    data = d.encode_packet(KEY, d.Packet(d.PacketType.REPLY, NOW, nonce(1), "10.0.0.5", 9700, 1, nonce(2)))
    for i in range(len(data) * 8):
        forged = bytearray(data)
        forged[i // 8] ^= 1 << (i % 8)
        assert isinstance(d.Verifier(KEY).verify(bytes(forged), NOW), d.Rejected), i


def test_forged_mac_with_the_right_cluster_id_is_rejected():
    data = bytearray(d.encode_packet(KEY, d.Packet(d.PacketType.REPLY, NOW, nonce(1), "10.0.0.5", 9700, 1, nonce(2))))
    data[-32:] = os.urandom(32)
    result = d.Verifier(KEY).verify(bytes(data), NOW)
    assert isinstance(result, d.Rejected) and result.reason == "bad MAC"


def test_stale_and_future_packets_are_rejected():
    v = d.Verifier(KEY, window=30)
    for i, skew in enumerate((-31, 31, -3600, 10**9)):
        data = d.encode_packet(KEY, d.Packet(d.PacketType.REPLY, NOW + skew, nonce(i), "10.0.0.5", 1, 1, nonce(9)))
        result = v.verify(data, NOW)
        assert isinstance(result, d.Rejected) and "stale" in result.reason
    inside = d.encode_packet(KEY, d.Packet(d.PacketType.REPLY, NOW - 29, nonce(99), "10.0.0.5", 1, 1, nonce(9)))
    assert isinstance(v.verify(inside, NOW), d.Packet)


def test_replayed_packet_is_rejected_and_cache_is_bounded():
    v = d.Verifier(KEY, capacity=8)
    first = d.encode_packet(KEY, d.Packet(d.PacketType.REQUEST, NOW, nonce(1)))
    assert isinstance(v.verify(first, NOW), d.Packet)
    assert v.verify(first, NOW + 1) == d.Rejected("replayed nonce")
    for i in range(2, 40):
        v.verify(d.encode_packet(KEY, d.Packet(d.PacketType.REQUEST, NOW, nonce(i))), NOW)
    assert len(v._seen) == 8
    # Nonces leave the cache once their packet is too old to be fresh anyway.
    v.verify(d.encode_packet(KEY, d.Packet(d.PacketType.REQUEST, NOW + 100, nonce(100))), NOW + 100)
    assert list(v._seen) == [nonce(100)]


def test_valid_mac_but_unknown_version_type_or_flags_is_rejected():
    for version, ptype, flags in ((2, 1, 0), (1, 9, 0), (1, 1, 1)):
        body = struct.pack("!4sBBH8sQ16s", b"CPYD", version, ptype, flags, KEY.cluster_id, int(NOW * 1000), nonce(1))
        body += struct.pack("!16sHH16s", bytes(16), 0, 0, bytes(16))
        import hashlib
        import hmac

        data = body + hmac.new(KEY.mac_key, body, hashlib.sha256).digest()
        assert isinstance(d.Verifier(KEY).verify(data, NOW), d.Rejected)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data):
    assert isinstance(d.Verifier(KEY).verify(data, NOW), d.Rejected)
    assert node_core().on_datagram(data, ("10.0.0.9", 5000), NOW) is None
    assert client_core().on_datagram(data, ("10.0.0.9", 5000), NOW) is None
    assert d.RelayCore(KEY).on_datagram(data, ("10.0.0.9", 5000), NOW) is None


# -------------------------------------------------------------------- node, client, relay cores


def test_node_replies_to_the_source_or_the_verified_reply_address():
    node, client = node_core(), client_core()
    assert node.on_datagram(client.request(NOW, nonce(1)), ("10.0.0.9", 5000), NOW) == ("10.0.0.9", 5000)
    relayed = client.request(NOW, nonce(2), ("10.0.1.7", 6000))
    assert node.on_datagram(relayed, ("10.0.2.1", 9701), NOW) == ("10.0.1.7", 6000)
    # Announcements and replies (other nodes') are not answered; nor are unusable reply addresses.
    for ptype in (d.PacketType.ANNOUNCE, d.PacketType.REPLY):
        other = d.encode_packet(KEY, d.Packet(ptype, NOW, nonce(3 + ptype), "10.0.0.8", 9700, 1, nonce(7)))
        assert node.on_datagram(other, ("10.0.0.8", 9700), NOW) is None
    for i, bad in enumerate((("255.255.255.255", 1), ("224.0.0.1", 1), ("10.0.0.1", 0))):
        assert node.on_datagram(client.request(NOW, nonce(20 + i), bad), ("10.0.0.9", 5000), NOW) is None


def test_node_reply_names_its_address_or_the_advertised_one():
    client = client_core()
    found = client.on_datagram(node_core().reply("10.0.0.5", NOW, nonce(1)), ("10.0.0.5", 9700), NOW)
    assert found == d.Found("10.0.0.5", 9700, 4, nonce(0xAB).hex(), "reply")
    natted = node_core(advertise="203.0.113.4").announce("10.0.0.5", NOW, nonce(2))
    found = client_core().on_datagram(natted, ("10.0.0.5", 9700), NOW)
    assert found is not None and found.host == "203.0.113.4" and found.via == "announce"
    with pytest.raises(ValueError):
        node_core(advertise="not an address")


def test_client_dedupes_filters_and_forgets():
    def answer(core, i, host="10.0.0.5", port=9700, inc=0xAB):
        pkt = d.encode_packet(KEY, d.Packet(d.PacketType.ANNOUNCE, NOW, nonce(i), host, port, 2, nonce(inc)))
        return core.on_datagram(pkt, (host, 9700), NOW)

    c = client_core()
    assert answer(c, 1) is not None
    assert answer(c, 2) is None  # same incarnation again
    c.forget(nonce(0xAB).hex())
    assert answer(c, 3) is not None  # a lost node may come back
    assert answer(c, 4, inc=0xAC) is not None  # restarted: new incarnation at the same address
    explicit = client_core(explicit=[("10.0.0.5", 9700)])
    assert answer(explicit, 5) is None
    filtered = client_core(patterns=["192.168.1.*", "10.0.0.*:9800"])
    assert answer(filtered, 6) is None
    assert answer(filtered, 7, port=9800, inc=1) is not None
    assert answer(filtered, 8, host="192.168.1.20", inc=2) is not None
    assert client_core().on_datagram(client_core().request(NOW, nonce(9)), ("10.0.0.9", 1), NOW) is None
    assert answer(client_core(), 10, host="0.0.0.0") is None


def test_patterns_and_plan():
    assert d.is_pattern("192.168.1.*") and not d.is_pattern("10.0.0.5:9700") and not d.is_pattern("host")
    assert d.match_pattern("10.0.?.5", "10.0.1.5", 1) and not d.match_pattern("10.0.*:9700", "10.0.1.5", 9701)
    plan = d.plan_nodes([], discover=None, local=None, relays=False, wait=1.0)
    assert plan.discover and not plan.local and plan.fallback == 1.0
    plan = d.plan_nodes(["a", "10.0.*"], discover=None, local=None, relays=False, wait=1.0)
    assert plan.discover and plan.explicit == ("a",) and plan.patterns == ("10.0.*",) and plan.fallback is None
    assert not d.plan_nodes(["a"], discover=None, local=None, relays=False, wait=1).discover
    assert d.plan_nodes(["a"], discover=None, local=None, relays=True, wait=1).discover
    plan = d.plan_nodes([], discover=None, local=True, relays=False, wait=1)
    assert plan.local and not plan.discover
    plan = d.plan_nodes([], discover=False, local=None, relays=False, wait=1)
    assert plan.local and not plan.discover and plan.fallback is None
    plan = d.plan_nodes([], discover=None, local=False, relays=False, wait=1)
    assert plan.discover and not plan.local and plan.fallback is None
    with pytest.raises(ValueError):
        d.plan_nodes([], discover=None, local=None, relays=False, wait=-1)


def test_relay_relays_only_fresh_verified_requests_with_a_reply_address_unchanged():
    relay, client = d.RelayCore(KEY), client_core()
    good = client.request(NOW, nonce(1), ("10.0.1.7", 6000))
    assert relay.on_datagram(good, ("10.0.1.7", 6000), NOW) == good  # one in, the same bytes out
    assert relay.on_datagram(good, ("10.0.1.7", 6000), NOW) is None  # replayed
    assert relay.on_datagram(client.request(NOW, nonce(2)), ("10.0.1.7", 6000), NOW) is None  # no reply address
    announce = node_core().announce("10.0.0.5", NOW, nonce(3))
    assert relay.on_datagram(announce, ("10.0.0.5", 9700), NOW) is None
    stale = client.request(NOW - 60, nonce(4), ("10.0.1.7", 6000))
    assert relay.on_datagram(stale, ("10.0.1.7", 6000), NOW) is None
    wrong = client_core().request(NOW, nonce(5), ("10.0.1.7", 6000))[:-1] + b"\0"
    assert relay.on_datagram(wrong, ("10.0.1.7", 6000), NOW) is None
    assert relay.relayed == 1 and relay.dropped == 5


def test_relay_rate_limit():
    relay, client = d.RelayCore(KEY, rate=2.0, burst=3), client_core()
    sent = [relay.on_datagram(client.request(NOW, nonce(i), ("10.0.1.7", 6000)), ("10.0.1.7", 1), NOW) for i in range(10)]
    assert sum(s is not None for s in sent) == 3
    later = client.request(NOW + 1, nonce(100), ("10.0.1.7", 6000))
    assert relay.on_datagram(later, ("10.0.1.7", 1), NOW + 1) is not None  # refilled at 2/s
    sent = [relay.on_datagram(client.request(NOW + 1, nonce(200 + i), ("10.0.1.7", 6000)), ("x", 1), NOW + 1)
            for i in range(5)]
    assert sum(s is not None for s in sent) == 1


# -------------------------------------------------------------------- interfaces


def test_interfaces_and_selection():
    lo = udp.Interface("lo", "127.0.0.1", "255.0.0.0", "127.255.255.255")
    eth = udp.Interface("eth0", "192.0.2.2", "255.255.255.0", "192.0.2.255")
    ifaces = [lo, eth]
    assert udp.select_interfaces(None, ifaces) == ifaces
    assert udp.select_interfaces(["lo"], ifaces) == [lo]
    assert udp.select_interfaces(["eth*"], ifaces) == [eth]
    assert udp.select_interfaces(["192.0.2.0/24"], ifaces) == [eth]
    assert udp.select_interfaces(["127.0.0.1"], ifaces) == [lo]
    assert udp.select_interfaces([], ifaces) == []
    assert udp.interfaces_spec("lo, eth0") == ["lo", "eth0"]
    assert udp.interfaces_spec("none") == [] and udp.interfaces_spec(["*"]) is None
    entry = udp.interface_from_entry
    assert entry("e", {"addr": "10.0.0.2", "netmask": "255.255.255.0", "broadcast": "10.0.0.2"}).broadcast == "10.0.0.255"
    assert entry("e", {"addr": "10.0.0.2", "netmask": "255.255.255.0", "broadcast": "10.0.0.255"}).broadcast == "10.0.0.255"
    assert entry("t", {"addr": "10.8.0.2", "netmask": "255.255.255.255", "peer": "10.8.0.1"}).broadcast is None
    assert entry("t", {"addr": "10.8.0.2", "netmask": "255.255.255.0", "peer": "10.8.0.1"}).broadcast is None
    assert entry("x", {"addr": "10.0.0.2"}) is None and entry("x", {"addr": "bad", "netmask": "1"}) is None
    real = {i.name: i for i in udp.ipv4_interfaces()}
    assert real["lo"].broadcast == "127.255.255.255"  # computed: loopback reports none
    assert udp.local_address_toward("127.0.0.1") == "127.0.0.1"


def test_test_session_restricts_broadcasts_to_loopback():
    # conftest sets this so that no test broadcasts on the machine's real interfaces.
    assert udp.interfaces_spec(None) == ["lo"]


# -------------------------------------------------------------------- real sockets on loopback


async def test_responder_and_client_on_loopback_ignore_garbage():
    secret = b"loopback-secret-" + os.urandom(8).hex().encode()
    port = _free_udp_port()
    found: list[d.Found] = []
    node = udp.DiscoveryResponder(secret, host="127.0.0.1", port=port, tcp_port=4242, cpus=3,
                                  node_id=os.urandom(16).hex(), announce_interval=0)
    client = udp.DiscoveryClient(secret, on_found=found.append, port=port, interfaces=["lo"], interval=0.2)
    await client.start()
    try:
        await node.start()  # the announcement reaches the listening client
        assert node.active
        for _ in range(50):
            if found:
                break
            await asyncio.sleep(0.02)
        assert [(f.host, f.port, f.cpus, f.via) for f in found] == [("127.0.0.1", 4242, 3, "announce")]
        client.forget(found[0].incarnation)  # so that the next request's reply is news
        sock = udp.open_udp_socket("127.0.0.1", 0)
        try:
            for junk in (b"", b"x", os.urandom(107), os.urandom(108), os.urandom(109), b"CPYD" + bytes(104),
                         os.urandom(2000)):
                for dest in (("127.0.0.1", port), ("127.255.255.255", port), ("127.0.0.1", client.request_port)):
                    sock.sendto(junk, dest)
        finally:
            sock.close()
        for _ in range(100):
            if len(found) == 2:
                break
            await asyncio.sleep(0.02)
        assert [f.via for f in found] == ["announce", "reply"]  # both kept working
    finally:
        await client.aclose()
        await node.aclose()


def _free_udp_port() -> int:
    sock = udp.open_udp_socket("127.0.0.1", 0)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def test_node_cli_has_discovery_options():
    out = subprocess.run([sys.executable, "-m", "clusterpy.node", "--help"], capture_output=True, text=True, timeout=30)
    for flag in ("--no-discovery", "--discovery-port", "--advertise", "--ext-host", "--announce-interval",
                 "--discovery-interfaces", "--cluster-name"):
        assert flag in out.stdout


def test_jobcluster_discovers_a_node_on_loopback(start_node):
    port = str(_free_udp_port())
    node = start_node(extra=["--discovery-port", port])
    start = time.monotonic()
    with clusterpy.JobCluster(pow, discovery_port=int(port), local=False) as cluster:
        assert cluster.submit(2, 5)() == 32
        assert [n["node_id"] for n in cluster.nodes()] == [node.node_id]
    assert time.monotonic() - start < 10


def test_jobcluster_falls_back_to_the_local_node_when_nothing_answers():
    start = time.monotonic()
    with clusterpy.JobCluster(pow, discovery_port=_free_udp_port(), discovery_wait=0.3, local_cpus=1) as cluster:
        assert cluster.submit(3, 2)() == 9
        (info,) = cluster.nodes()
        assert info["ip_addr"] == "127.0.0.1"
    assert time.monotonic() - start < 10


def test_discover_example(start_node):
    port = str(_free_udp_port())
    node = start_node(extra=["--discovery-port", port])
    out = subprocess.run([sys.executable, str(REPO / "examples" / "discover.py"), "--interfaces", "lo",
                          "--discovery-port", port, "--wait", "5", "127.0.0.*"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert node.node_id in out.stdout and "10 jobs on 1 node" in out.stdout


def test_netrelay_cli():
    out = subprocess.run([sys.executable, "-m", "clusterpy.netrelay", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--node-port", "--networks", "--secret-file", "--rate", "--burst", "--log-level"):
        assert flag in out.stdout
    # Relaying into no network is a configuration error, reported without a traceback.
    bad = subprocess.run([sys.executable, "-m", "clusterpy.netrelay", "--networks", "none", "--port", "0"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no network" in bad.stderr and "Traceback" not in bad.stderr  # a usage error, as for every daemon


def test_discovery_core_does_no_io():
    import ast

    tree = ast.parse((REPO / "clusterpy" / "discovery.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"asyncio", "socket", "time", "os", "random", "secrets", "netifaces"}
