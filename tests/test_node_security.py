"""A real node refuses what it cannot authenticate, never unpickles it, and keeps serving."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct

import clusterpy
from clusterpy.identity import local_info
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.protocol.framing import FrameDecoder, encode_frame
from clusterpy.protocol.handshake import ClientHandshake
from clusterpy.protocol.session import SessionCipher
from clusterpy.transport.stream import connect

from .conftest import SECRET, wait_until


class _Touch:
    """Unpickling this creates a marker file: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def square(x):
    return x * x


def still_serves(node):
    with clusterpy.JobCluster(square, nodes=[node.address]) as cluster:
        assert cluster.submit(12)(30) == 144


def _recv_frames(sock, count, timeout=5.0):
    sock.settimeout(timeout)
    decoder, frames = FrameDecoder(4096), []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames.extend(decoder.feed(data))
    return frames


def _handshake(sock, secret=SECRET.encode()):
    hs = ClientHandshake(secret, role="client", info=local_info(), nonce=os.urandom(32))
    sock.sendall(encode_frame(hs.start()))
    (b2,) = _recv_frames(sock, 1)
    sock.sendall(encode_frame(hs.receive(b2)))
    (b4,) = _recv_frames(sock, 1)
    assert hs.receive(b4) is None and hs.done
    return SessionCipher(hs.send_key, hs.recv_key)


def test_pickle_before_authentication_is_never_unpickled(node, tmp_path):
    marker = tmp_path / "pwned-preauth"
    payload = pickle.dumps(_Touch(marker))
    with socket.create_connection((node.host, node.port)) as sock:
        sock.sendall(encode_frame(payload))
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert not marker.exists()
    assert "refused" in node.log()
    still_serves(node)


def test_pickle_with_bad_mac_after_authentication_is_never_unpickled(node, tmp_path):
    marker = tmp_path / "pwned-badmac"
    with socket.create_connection((node.host, node.port)) as sock:
        cipher = _handshake(sock)
        body = bytearray(cipher.seal(pickle.dumps(_Touch(marker))))
        body[-1] ^= 1  # one bit of the MAC flipped
        sock.sendall(encode_frame(bytes(body)))
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert not marker.exists()
    wait_until(lambda: "closing connection" in node.log())
    still_serves(node)


def test_authenticated_peer_cannot_smuggle_objects_into_messages(node, tmp_path):
    """Messages are decoded with an allow-list: even a valid MAC does not run a gadget."""
    marker = tmp_path / "pwned-authenticated"
    with socket.create_connection((node.host, node.port)) as sock:
        cipher = _handshake(sock)
        sock.sendall(encode_frame(cipher.seal(pickle.dumps(_Touch(marker)))))
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert not marker.exists()
    wait_until(lambda: "not a clusterpy message" in node.log())
    still_serves(node)


def test_garbage_and_huge_length_prefix_are_refused(node):
    for junk in (b"\x00\x01garbage-not-a-frame" * 3, struct.pack(">I", 0xFFFFFFFF) + b"x" * 100, b"\xff" * 7):
        with socket.create_connection((node.host, node.port)) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    assert node.alive()
    still_serves(node)


def test_wrong_secret_refused_with_clear_error(node):
    async def attempt():
        try:
            await connect(node.host, node.port, secret=b"w" * 32, role="client", info=local_info())
        except clusterpy.AuthenticationError as exc:
            return str(exc)
        return None

    message = asyncio.run(attempt())
    assert message and "secret" in message
    wait_until(lambda: "wrong secret" in node.log() or "authentication" in node.log())
    still_serves(node)


def test_hostile_file_names_are_refused(node):
    async def deploy(name):
        conn = await connect(node.host, node.port, secret=SECRET.encode(), role="client", info=local_info())
        async with conn:
            meta = m.FileMeta(name, "0" * 64, 1, 0o644)
            conn.send(codec.encode(m.DeployComputation("chostile", "function", (meta,), b"", None)))
            await conn.drain()
            return codec.decode(await conn.recv())

    for name in ("../x", "/etc/x", "a/../../x", "x\x00y", "..", "a\\..\\b"):
        reply = asyncio.run(deploy(name))
        assert isinstance(reply, m.ComputationFailed), name
        assert "x" in reply.reason or "name" in reply.reason
    assert not (node.dest.parent / "x").exists()
    still_serves(node)
