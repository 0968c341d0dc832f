"""Discovery across hosts: real clusterpy-node, client and netrelay processes in network
namespaces (tests/netns.py): subnet A holds the client ``c``, nodes ``a1``-``a3`` (and ``a4``,
started late), a rogue ``x`` and another cluster's node ``y``; subnet B holds node ``b1`` and
the relay host ``rb``. All traffic stays inside these namespaces."""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from .netns import CLIENT_SCRIPT, Daemon, Host, Network, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = Network(tmp_path_factory.mktemp("netns"), hosts_a=["c", "a1", "a2", "a3", "a4", "x", "y"],
                      hosts_b=["b1", "rb"])
    try:
        nodes = {label: network[label].start_node() for label in ("a1", "a2", "a3", "b1")}
        for daemon in nodes.values():
            daemon.wait_for(r"listening on")
        yield network, nodes
    finally:
        network.close()


def client(host: Host, options: dict | None = None, steps: list | None = None, env: dict | None = None) -> Daemon:
    config = json.dumps({"options": options or {}, "steps": steps or []})
    return host.python(CLIENT_SCRIPT, config, env=env, stdin=True, name="client")


def finish(daemon: Daemon) -> None:
    daemon.json("done")
    assert daemon.proc.wait(15) == 0, daemon.log()


def subnet_a(network: Network, *labels: str) -> list[str]:
    return sorted(network[label].address for label in ("a1", "a2", "a3", *labels))


def test_client_discovers_the_three_nodes_of_its_subnet(net):
    network, _ = net
    # JobCluster(compute): no nodes=, no other argument.
    c = client(network["c"], {}, [["wait_nodes", 3, 15], ["sleep", 0.5], ["jobs", 12, 0.05]])
    assert c.json("started")["broadcasts"] == sorted(["127.255.255.255", network.broadcast("a")])
    assert c.json("nodes")["nodes"] == subnet_a(network)
    assert c.json("nodes")["nodes"] == subnet_a(network)  # not b1 (other subnet), no local node
    assert set(c.json("jobs")["by_node"]) == set(subnet_a(network))
    finish(c)


def test_a_node_started_later_joins_the_running_cluster_and_gets_jobs(net):
    network, _ = net
    # No periodic request during the test: the late node must be found by its announcement.
    c = client(network["c"], {"discovery_interval": 600},
               [["wait_nodes", 3, 15], ["pause"], ["wait_nodes", 4, 15], ["jobs", 16, 0.1]])
    assert c.json("paused")["nodes"] == subnet_a(network)
    late = network["a4"].start_node()
    try:
        late.wait_for(r"listening on")
        c.send("go")
        assert c.json("nodes")["nodes"] == subnet_a(network, "a4")
        by_node = c.json("jobs")["by_node"]
        assert by_node.get(network["a4"].address, 0) >= 1, by_node
        finish(c)
    finally:
        late.stop()


def test_node_on_another_subnet_is_found_only_through_a_netrelay(net):
    network, nodes = net
    b1 = network["b1"].address
    plain = client(network["c"], {"local": False}, [["wait_nodes", 4, 2.0]])
    relay = network["rb"].start([sys.executable, "-m", "clusterpy.netrelay", "--log-level", "DEBUG"], name="relay")
    relay.wait_for(r"clusterpy-netrelay listening on 0\.0\.0\.0:9701 relaying into " + network.broadcast("b"))
    relayed = client(network["c"], {"nodes": [b1.rsplit(".", 1)[0] + ".*"], "relays": [network["rb"].address]},
                     [["wait_nodes", 1, 15], ["jobs", 4, 0.05]])
    assert plain.json("nodes")["nodes"] == subnet_a(network)  # broadcasts stay on subnet A
    assert relayed.json("nodes")["nodes"] == [b1]  # the pattern keeps subnet A's nodes out
    assert relayed.json("jobs")["by_node"] == {b1: 4}
    finish(plain)
    finish(relayed)
    assert "relayed a request from" in relay.log()
    assert f"('{network['c'].address}'," in nodes["b1"].log()  # b1 saw the client connect from subnet A
    relay.stop()


ROGUE = r'''
import json, os, select, socket, sys, time
from clusterpy import discovery as d

me, tcp_port, bcast = sys.argv[1], int(sys.argv[2]), sys.argv[3]
wrong = d.DiscoveryKey.derive(b"not-the-cluster-secret-at-all")
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
udp.bind(("0.0.0.0", 9700))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", tcp_port))
tcp.listen()
counts = {"requests": 0, "forged": 0, "connections": 0}
print(json.dumps({"event": "ready"}), flush=True)
mapped = b"\0" * 10 + b"\xff\xff" + socket.inet_aton(me)
while True:
    ready, _, _ = select.select([udp, tcp, sys.stdin], [], [])
    if sys.stdin in ready:
        sys.stdin.readline()
        print(json.dumps({"event": "report", **counts}), flush=True)
        break
    if tcp in ready:
        conn, _ = tcp.accept()
        counts["connections"] += 1
        conn.close()
    if udp in ready:
        data, src = udp.recvfrom(4096)
        if len(data) != d.PACKET_SIZE or data[:4] != b"CPYD" or data[5] != 1:
            continue
        counts["requests"] += 1
        # 1. a reply signed with another secret but the cluster id copied from the request
        key = d.DiscoveryKey(wrong.mac_key, data[8:16])
        forged = d.encode_packet(key, d.Packet(d.PacketType.REPLY, time.time(), os.urandom(16), me, tcp_port, 64,
                                               os.urandom(16)))
        # 2. the genuine request turned into a reply naming the rogue, MAC kept
        tampered = data[:5] + b"\x03" + data[6:40] + mapped + tcp_port.to_bytes(2, "big") + data[58:]
        # 3. the genuine request sent back (a replay)
        for packet, dest in ((forged, src), (tampered, src), (data, src), (forged, (bcast, 9700))):
            udp.sendto(packet, dest)
            counts["forged"] += 1
'''


def test_forged_answers_and_another_cluster_are_ignored(net):
    network, nodes = net
    x, y = network["x"], network["y"]
    rogue = x.python(ROGUE, x.address, "9999", network.broadcast("a"), stdin=True, name="rogue")
    rogue.wait_for(r'"ready"')
    other_secret = {"CLUSTERPY_SECRET": "another-cluster-" + uuid.uuid4().hex}
    other = y.start_node(env=other_secret)
    other.wait_for(r"listening on")
    first = client(network["c"], {}, [["wait_nodes", 5, 3.0], ["jobs", 6, 0.01]])
    second = client(network["c"], {"local": False}, [["wait_nodes", 2, 3.0], ["jobs", 3, 0.01]], env=other_secret)
    assert first.json("nodes")["nodes"] == subnet_a(network)
    assert set(first.json("jobs")["by_node"]) <= set(subnet_a(network))
    assert second.json("nodes")["nodes"] == [y.address]
    assert second.json("jobs")["by_node"] == {y.address: 3}
    finish(first)
    finish(second)
    rogue.send("report")
    report = rogue.json("report")
    assert report["requests"] >= 2 and report["forged"] >= 8
    assert report["connections"] == 0  # never lured to the rogue's address
    assert "another cluster" in nodes["a1"].log()  # the second cluster's requests, dropped
    assert "another cluster" in other.log()
    other.stop()


GARBAGE = r'''
import json, os, socket, sys, time
from clusterpy import discovery as d
from clusterpy.secret import load_secret

key = d.DiscoveryKey.derive(load_secret())
good = d.encode_packet(key, d.Packet(d.PacketType.REQUEST, time.time(), os.urandom(16)))
flipped = bytearray(d.encode_packet(key, d.Packet(d.PacketType.REQUEST, time.time(), os.urandom(16))))
flipped[30] ^= 0x10
packets = [b"", b"\0", b"CPYD", os.urandom(50), good[:-1], good[:60], good + b"\0", bytes(flipped),
           os.urandom(d.PACKET_SIZE), b"CPYD\x01\x01" + os.urandom(102), os.urandom(1400), os.urandom(60000)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sent = 0
for dest in json.loads(sys.argv[1]):
    for p in packets:
        for _ in range(3):
            try:
                s.sendto(p, tuple(dest))
                sent += 1
            except OSError:
                pass
print(json.dumps({"event": "sent", "count": sent}), flush=True)
'''


def test_garbage_and_truncated_packets_are_ignored_and_everyone_keeps_working(net):
    network, nodes = net
    c = client(network["c"], {"discovery_interval": 600},
               [["wait_nodes", 3, 15], ["pause"], ["jobs", 6, 0.01], ["pause"], ["wait_nodes", 4, 15],
                ["jobs", 16, 0.1]])
    request_port = c.json("started")["request_port"]
    c.json("paused")
    targets = [[network[n].address, 9700] for n in ("a1", "a2", "a3")] + [
        [network.broadcast("a"), 9700], [network["c"].address, request_port], [network["c"].address, 9700]]
    sender = network["x"].python(GARBAGE, json.dumps(targets), name="garbage")
    assert sender.json("sent")["count"] >= 6 * 12
    assert sender.proc.wait(10) == 0
    for label in ("a1", "a2", "a3"):
        assert nodes[label].alive() and "dropped discovery datagram" in nodes[label].log()
    c.send("go")
    assert set(c.json("jobs")["by_node"]) <= set(subnet_a(network))
    c.json("paused")
    late = network["a4"].start_node()  # its announcement must still reach the client
    try:
        late.wait_for(r"listening on")
        c.send("go")
        assert c.json("nodes")["nodes"] == subnet_a(network, "a4")
        assert network["a4"].address in c.json("jobs")["by_node"]
        finish(c)
        # The nodes still answer requests: a new client finds all four.
        fresh = client(network["c"], {"local": False}, [["wait_nodes", 4, 15]])
        assert fresh.json("nodes")["nodes"] == subnet_a(network, "a4")
        finish(fresh)
    finally:
        late.stop()
