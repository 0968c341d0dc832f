"""The hostile-input suite: a node under attack refuses, says why in its log, deserializes
nothing, and then still serves a legitimate client.

The node runs in-process (``NodeServer`` in the test's event loop; its workers are real
processes) so that :class:`UnpickleSpy` can record every deserialization the daemon attempts:
``pickle.loads/load``, ``cloudpickle.loads/load``, ``pickle.Unpickler`` and the protocol's
restricted decoder (``codec.decode``). For unauthenticated input nothing at all may be
decoded; for authenticated but hostile messages (file names) only the restricted message
decoder may run, never an unrestricted unpickler.

The property-based fuzzing of the frame decoder, the session cipher and the handshake state
machine is in test_hostile_fuzz.py (no I/O). docs/SECURITY.md maps each attack to its test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import random
import statistics
import struct
import sys
import tracemalloc

import pytest

import clusterpy
from clusterpy.node import NodeServer
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.protocol.framing import encode_frame
from clusterpy.protocol.handshake import ClientHandshake
from clusterpy.transport.stream import connect

from ._attacker import INFO, KEY, LogLines, Raw, UnpickleSpy, deploy, refusal
from ._tls_material import Material, make_material
from .conftest import SECRET


def _square(x):
    return x * x


@pytest.fixture
def spy(monkeypatch) -> UnpickleSpy:
    return UnpickleSpy(monkeypatch)


@pytest.fixture
def caplog():
    """Shadows pytest's caplog in this module (see LogLines)."""
    handler = LogLines()
    logger = logging.getLogger("clusterpy")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # pytest's report capture keeps records too
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


@pytest.fixture
async def make_node(tmp_path, caplog):
    """Start in-process nodes (``await make_node(**options)``); all closed at the end."""
    nodes: list[NodeServer] = []

    async def make(**options) -> NodeServer:
        options = {"handshake_timeout": 2.0, "max_frame": 1 << 20, **options}
        node = NodeServer(secret=KEY, port=0, cpus=1, dest_path=tmp_path / f"node{len(nodes)}",
                          discovery=False, **options)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.aclose()


@pytest.fixture(scope="module")
def mat(tmp_path_factory) -> Material:
    return make_material(tmp_path_factory.mktemp("hostile-tls"))


@pytest.fixture(autouse=True)
async def hard_timeout():
    async with asyncio.timeout(60):
        yield


async def logged(caplog, *needles: str, timeout: float = 5.0) -> str:
    """Wait until the log holds every needle; return the log."""
    async with asyncio.timeout(timeout):
        while not all(n in caplog.text for n in needles):
            await asyncio.sleep(0.02)
    return caplog.text


async def still_serves(node: NodeServer, spy: UnpickleSpy, mat: Material | None = None) -> None:
    """A legitimate JobCluster runs a job on the node (the spy is disarmed: legit decoding)."""
    spy.armed = False
    tls = {} if mat is None else mat.client_files()
    async with clusterpy.JobCluster(_square, nodes=[f"127.0.0.1:{node.port}"], secret=KEY, pulse_interval=0.2,
                                    **tls) as cluster:
        job = cluster.submit(12)
        async with asyncio.timeout(20):
            assert await job == 144


async def round_trip(port: int, ssl=None) -> float:
    """Seconds for a legitimate connect + handshake + Ping/Pong (the reply is not decoded)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    conn = await connect("127.0.0.1", port, secret=KEY, role="client", info=INFO,
                         expected_peer_roles={"node"}, ssl=ssl, handshake_timeout=5)
    async with conn:
        conn.send(codec.encode(m.Ping(0.0)))
        await conn.drain()
        assert await conn.recv()
    return loop.time() - start


# --- malformed input before authentication -----------------------------------------------


@pytest.mark.parametrize("junk,log", [
    (random.Random(5).randbytes(300), "refused connection"),
    (b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", "limit here is 4096"),
    (encode_frame(pickle.dumps(os.system, protocol=5)), "not valid JSON"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), "limit here is 4096"),  # a TLS hello
    (encode_frame(b'{"t":"hello","proto":"clusterpy/2"}'), "hello message has no valid 'alg'"),
], ids=["random", "http", "raw-pickle", "tls-hello", "partial-hello"])
async def test_garbage_is_refused(make_node, spy, caplog, junk, log):
    node = await make_node()
    spy.arm()
    raw = await Raw.open(node.port)
    raw.send_raw(junk)
    await raw.closed_by_peer()
    await logged(caplog, log)
    assert spy.calls == []
    await still_serves(node, spy)


async def test_four_gib_length_prefix_is_refused_at_once(make_node, spy, caplog):
    node = await make_node()
    spy.arm()
    raw = await Raw.open(node.port)
    raw.send_raw(struct.pack(">I", 0xFFFFFFFF) + b"x" * 65536)
    assert refusal(await raw.closed_by_peer())["kind"] == "protocol"
    await logged(caplog, "peer announced a frame of 4294967295 bytes; the limit here is 4096")
    assert spy.calls == []
    await still_serves(node, spy)


async def test_truncated_frames_are_refused(make_node, spy, caplog):
    node = await make_node(handshake_timeout=0.5)
    spy.arm()
    # A header and half a body, then EOF.
    raw = await Raw.open(node.port)
    raw.send_raw(struct.pack(">I", 100) + b"{" * 50)
    raw.writer.write_eof()
    await raw.closed_by_peer()
    await logged(caplog, "closed the connection during the handshake")
    # The same, then silence: the handshake deadline ends it.
    raw = await Raw.open(node.port)
    raw.send_raw(struct.pack(">I", 100) + b"{" * 50)
    assert "timed out" in refusal(await raw.closed_by_peer())["reason"]
    await logged(caplog, "handshake timed out after 0.5 s")
    # Half a sealed frame after authentication, then EOF.
    raw = await Raw.open(node.port)
    await raw.handshake()
    spy.arm()
    body = raw.cipher.seal(codec.encode(m.Ping(1.0)))
    raw.send_raw(encode_frame(body)[:20])
    raw.writer.write_eof()
    await raw.closed_by_peer()
    await logged(caplog, "ends: client disconnected")
    assert spy.calls == []
    await still_serves(node, spy)


async def test_frame_over_the_cap_after_authentication(make_node, spy, caplog):
    node = await make_node(max_frame=1 << 20)
    raw = await Raw.open(node.port)
    await raw.handshake()
    spy.arm()
    raw.send_raw(struct.pack(">I", (1 << 20) + 1) + os.urandom(4096))
    await raw.closed_by_peer()
    await logged(caplog, f"peer announced a frame of {(1 << 20) + 1} bytes; the limit here is {1 << 20}")
    assert spy.calls == []
    await still_serves(node, spy)


# --- authentication attacks ------------------------------------------------------------------


async def test_wrong_secret_is_refused(make_node, spy, caplog):
    node = await make_node()
    spy.arm()
    raw = await Raw.open(node.port)
    hs = ClientHandshake(b"not the cluster secret", role="client", info=INFO, nonce=os.urandom(32))
    raw.send_frame(hs.start())
    with pytest.raises(clusterpy.AuthenticationError):
        hs.receive(await raw.frame())  # the node's proof fails for us...
    raw.send_frame(b'{"t":"proof"}' + os.urandom(32))  # ...and a guessed proof fails for it
    assert refusal(await raw.closed_by_peer())["kind"] == "auth"
    await logged(caplog, "failed to prove it knows the cluster secret")
    assert spy.calls == []
    await still_serves(node, spy)


async def test_replayed_handshake_is_refused(make_node, spy, caplog):
    node = await make_node()
    victim = await Raw.open(node.port)
    await victim.handshake()  # captured: B1 and B3 of a successful handshake
    b1, b3 = victim.sent
    spy.arm()
    attacker = await Raw.open(node.port)
    attacker.send_frame(b1)
    await attacker.frame()  # B2 with a fresh server nonce: the old proof no longer fits
    attacker.send_frame(b3)
    assert refusal(await attacker.closed_by_peer())["kind"] == "auth"
    await logged(caplog, "failed to prove it knows the cluster secret")
    assert spy.calls == []
    await victim.close()
    await still_serves(node, spy)


async def test_replayed_frame_on_the_same_connection(make_node, spy, caplog):
    node = await make_node()
    raw = await Raw.open(node.port)
    await raw.handshake()
    ping = raw.send_sealed(codec.encode(m.Ping(1.0)))
    assert await raw.frame()  # the Pong: the original was accepted (and decoded: it is legit)
    spy.arm()
    raw.send_frame(ping)  # the same bytes again
    await raw.closed_by_peer()
    await logged(caplog, "replayed, reordered or dropped frame")
    assert spy.calls == []
    await still_serves(node, spy)


async def test_replayed_frame_on_another_connection(make_node, spy, caplog):
    node = await make_node()
    first = await Raw.open(node.port)
    await first.handshake()
    captured = first.send_sealed(codec.encode(m.Ping(1.0)))
    await first.frame()
    spy.arm()
    second = await Raw.open(node.port)
    await second.handshake()
    second.send_frame(captured)  # sequence 0 fits, the keys do not
    await second.closed_by_peer()
    await logged(caplog, "failed its MAC check")
    assert spy.calls == []
    await first.close()
    await still_serves(node, spy)


@pytest.mark.parametrize("bit", [0, 8 * 8 + 3, -1], ids=["seq", "payload", "mac"])
async def test_one_flipped_bit_is_refused(make_node, spy, caplog, bit):
    node = await make_node()
    raw = await Raw.open(node.port)
    await raw.handshake()
    spy.arm()
    body = bytearray(raw.cipher.seal(codec.encode(m.Ping(1.0))))
    index = bit // 8 if bit >= 0 else len(body) - 1
    body[index] ^= 1 << (bit % 8 if bit >= 0 else 0)
    raw.send_frame(bytes(body))
    await raw.closed_by_peer()
    await logged(caplog, "failed its MAC check")
    assert spy.calls == []
    await still_serves(node, spy)


@pytest.mark.parametrize("field,value,log", [
    ("proto", "clusterpy/0", "peer speaks protocol 'clusterpy/0'"),
    ("alg", "hmac-sha1", "peer speaks algorithm 'hmac-sha1'"),
], ids=["older-protocol", "other-algorithm"])
async def test_downgrade_is_refused(make_node, spy, caplog, field, value, log):
    node = await make_node()
    spy.arm()
    hello = json.loads(ClientHandshake(KEY, role="client", info=INFO, nonce=os.urandom(32)).start())
    hello[field] = value
    raw = await Raw.open(node.port)
    raw.send_frame(json.dumps(hello, separators=(",", ":")).encode())
    assert refusal(await raw.closed_by_peer())["kind"] == "version"
    await logged(caplog, log)
    assert spy.calls == []
    await still_serves(node, spy)


# --- resource exhaustion -------------------------------------------------------------------


async def test_slow_drip_handshake_is_cut_while_others_are_served(make_node, spy, caplog):
    node = await make_node(handshake_timeout=1.0)
    base = statistics.median([await round_trip(node.port) for _ in range(5)])
    spy.arm()
    dripper = await Raw.open(node.port)
    b1 = encode_frame(ClientHandshake(KEY, role="client", info=INFO, nonce=os.urandom(32)).start())

    async def drip() -> None:
        for byte in b1:
            dripper.send_raw(bytes([byte]))
            await asyncio.sleep(0.02)

    drip_task = asyncio.ensure_future(drip())
    try:
        during = [await round_trip(node.port) for _ in range(5)]
        assert max(during) < max(20 * base, 0.5), (base, during)
        assert "timed out" in refusal(await dripper.closed_by_peer())["reason"]
    finally:
        drip_task.cancel()
        await asyncio.gather(drip_task, return_exceptions=True)
    await logged(caplog, "handshake timed out after 1 s")
    assert spy.unrestricted == []
    await still_serves(node, spy)


async def test_idle_half_open_flood_cannot_lock_clients_out(make_node, spy, caplog):
    node = await make_node(max_pending_handshakes=16, handshake_timeout=5.0)
    base = statistics.median([await round_trip(node.port) for _ in range(5)])
    spy.arm()
    attackers = []
    hello = encode_frame(ClientHandshake(KEY, role="client", info=INFO, nonce=os.urandom(32)).start())
    for i in range(150):  # silent, a partial header, half a hello: none ever finishes
        raw = await Raw.open(node.port)
        raw.send_raw([b"", b"\x00\x00", hello[: len(hello) // 2]][i % 3])
        attackers.append(raw)
    try:
        await asyncio.sleep(0.2)
        assert len(node._admission) <= 16
        during = [await round_trip(node.port) for _ in range(5)]
        assert max(during) < max(20 * base, 0.5), (base, during)
        await logged(caplog, "unauthenticated connections pending (the limit): dropped")
        assert spy.unrestricted == []
        await still_serves(node, spy)  # a full job while the flood is still connected
        assert len(node._admission) <= 16
    finally:
        for raw in attackers:
            raw.writer.transport.abort()


# The flood comes from another process, so that tracemalloc here measures the node alone.
_FLOODER = r"""
import asyncio, os, struct, sys
from clusterpy.identity import local_info
from clusterpy.protocol.framing import FrameDecoder, encode_frame
from clusterpy.protocol.handshake import ClientHandshake

PORT, SECRET, WAVES, PER_WAVE = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
JUNK = struct.pack(">I", 0xFFFFFFFF) + os.urandom(1 << 20)

async def frame(reader, decoder):
    while True:
        frames = decoder.feed(await reader.read(4096) or b"")
        if frames:
            return frames[0]

async def one(authenticated):
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    try:
        if authenticated:
            hs, decoder = ClientHandshake(SECRET, role="client", info=local_info(), nonce=os.urandom(32)), FrameDecoder()
            writer.write(encode_frame(hs.start()))
            writer.write(encode_frame(hs.receive(await frame(reader, decoder))))
            hs.receive(await frame(reader, decoder))
        writer.write(JUNK)
        while await reader.read(65536):
            pass
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()

async def main():
    for _ in range(WAVES):
        await asyncio.gather(*(one(i % 4 == 0) for i in range(PER_WAVE)))
    print("flooded")

asyncio.run(main())
"""


async def test_silent_authenticated_connection_is_closed(make_node, spy, caplog):
    """The idle timeout (zombie_interval): clients ping every pulse, so only a dead, stuck or
    hostile peer stays silent, and its connection is closed."""
    node = await make_node(zombie_interval=0.5)
    raw = await Raw.open(node.port)
    await raw.handshake()
    spy.arm()
    await raw.closed_by_peer(timeout=5)
    await logged(caplog, "silent for", "treating it as gone")
    assert spy.calls == []
    await still_serves(node, spy)


async def test_memory_stays_bounded_under_oversized_length_prefixes(make_node, spy, caplog):
    node = await make_node(max_frame=1 << 20)

    async def flood(waves: int, per_wave: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _FLOODER, str(node.port), SECRET, str(waves), str(per_wave),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and b"flooded" in out

    await flood(1, 4)  # warm-up: first-use allocations are not growth
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        spy.arm()
        await flood(8, 20)  # 160 connections announce 4 GiB and send 1 MiB each (1 in 4 after auth)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # 160 MiB arrived, 20 connections at a time. Each connection may hold at most its stream
    # buffer (about 0.5 MiB high-water mark plus one 256 KiB read) before its header is refused,
    # so the bound is ~20 MiB whatever the flood's total; a node that buffered bodies would hold
    # a good part of the 160 MiB. (The exact peak varies with scheduling and library versions.)
    assert peak < 40 * (1 << 20), f"peak growth {peak / (1 << 20):.1f} MiB"
    await logged(caplog, "peer announced a frame of 4294967295 bytes; the limit here is 4096",
                 "peer announced a frame of 4294967295 bytes; the limit here is 1048576")
    assert spy.calls == []
    await still_serves(node, spy)


# --- file names from peers --------------------------------------------------------------------


async def test_hostile_file_names_and_symlinks_are_refused(make_node, spy, caplog, tmp_path):
    node = await make_node()
    raw = await Raw.open(node.port)
    await raw.handshake()
    outside = tmp_path / "outside"
    outside.mkdir()
    # A directory kept from an earlier computation (dest_path), where a job left a symlink.
    shared = node.dest_path / "shared"
    shared.mkdir()
    (shared / "lib").symlink_to(outside)
    spy.arm()
    cases = [([("../x", b"a")], None), ([("/etc/x", b"b")], None), ([("a/../../x", b"c")], None),
             ([("x\x00y", b"d")], None), ([("run.sh", b"e")], "../x"), ([("run.sh", b"f")], "/etc"),
             ([("lib/evil", b"g")], "shared"), ([("lib", b"h")], "shared")]
    for i, (files, dest) in enumerate(cases):
        reply = await deploy(raw, f"c{i}", files, dest)
        assert isinstance(reply, m.ComputationFailed), (files, dest, reply)
        assert "unsafe" in reply.reason or "symlink" in reply.reason, reply.reason
    await logged(caplog, "unsafe file name '../x'", "unsafe computation id '../x'", "is a symlink")
    assert list(outside.iterdir()) == []
    assert not (node.dest_path.parent / "x").exists()
    assert spy.unrestricted == []  # user data is never unpickled by the daemon
    await raw.close()
    await still_serves(node, spy)


async def test_file_size_and_quota_limits(make_node, spy, caplog):
    node = await make_node(max_file_size=1000, quota=1500)
    raw = await Raw.open(node.port)
    await raw.handshake()
    spy.arm()
    reply = await deploy(raw, "cbig", [("big", b"x" * 1001)])
    assert isinstance(reply, m.ComputationFailed) and "accepts at most 1000" in reply.reason
    reply = await deploy(raw, "cquota", [("a", b"a" * 800), ("b", b"b" * 800)])
    assert isinstance(reply, m.ComputationFailed) and "quota" in reply.reason
    await logged(caplog, "accepts at most 1000", "quota of 1500 bytes")
    assert spy.unrestricted == []
    await raw.close()
    await still_serves(node, spy)


# --- TLS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("client,log", [
    (None, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("foreign", "unable to get local issuer certificate"),
    ("expired", "certificate has expired"),
], ids=["no-certificate", "other-ca", "expired"])
async def test_tls_client_certificates_are_checked(make_node, spy, caplog, mat, client, log):
    node = await make_node(**mat.node_files())
    spy.arm()
    with pytest.raises((clusterpy.AuthenticationError, clusterpy.ConnectionClosedError)):
        await connect("127.0.0.1", node.port, secret=KEY, role="client", info=INFO,
                      ssl=mat.client_context(client), handshake_timeout=5)
    text = await logged(caplog, log)
    assert "refused connection from" in text and "certificate" in text
    assert spy.calls == []
    await still_serves(node, spy, mat)
