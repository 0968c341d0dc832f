"""G. The practical limit: asyncio loopback round trips of length-prefixed frames.

An echo server runs in its own process (as a node does); the client runs in this one.

* ``raw``: plain asyncio streams, 4-byte length prefix, no authentication, no pickling; both
  sides parse every complete frame in a read and answer a whole read with one write, which
  is the best plain asyncio streams code can do.
* ``clusterpy``: clusterpy's own authenticated transport (``clusterpy.transport.stream``:
  handshake, per-frame HMAC-SHA256 and sequence numbers), payloads echoed as opaque bytes,
  no pickling: what clusterpy's protocol costs before any scheduling or job handling.

Measured: pipelined small messages (round trips/s with ``window`` frames in flight),
sequential small round trips (median and p99 microseconds), and 1 MB frames echoed
(MB/s counting both directions, 4 in flight: the same shape as workload C).

Server: ``python bench/rawloop.py serve raw|clusterpy`` prints ``port N``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
from typing import Any

_HEADER = struct.Struct(">I")
SMALL = b"x" * 64


def _split(buf: bytearray) -> list[bytes]:
    """Remove and return the complete frame bodies at the front of ``buf``."""
    frames = []
    pos = 0
    end = len(buf)
    while end - pos >= 4:
        (size,) = _HEADER.unpack_from(buf, pos)
        if end - pos - 4 < size:
            break
        frames.append(bytes(buf[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    del buf[:pos]
    return frames


# ------------------------------------------------------------------------------- servers


async def _serve_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    buf = bytearray()
    try:
        while data := await reader.read(1 << 18):
            buf += data
            frames = _split(buf)
            if frames:
                out: list[bytes] = []
                for body in frames:
                    out += (_HEADER.pack(len(body)), body)
                writer.writelines(out)
                await writer.drain()
    finally:
        writer.close()


async def _serve_clusterpy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    from clusterpy.errors import ClusterError
    from clusterpy.identity import local_info
    from clusterpy.transport.stream import accept

    secret = os.environ["CLUSTERPY_SECRET"].encode()
    conn = await accept(reader, writer, secret=secret, role="node", info=local_info(),
                        expected_peer_roles=frozenset({"client"}))
    try:
        while True:
            conn.send(await conn.recv())
            await conn.drain()
    except ClusterError:
        pass
    finally:
        await conn.aclose()


async def serve(mode: str) -> None:
    handler = _serve_raw if mode == "raw" else _serve_clusterpy
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------- clients


class _RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.frames: list[bytes] = []

    @classmethod
    async def open(cls, port: int) -> "_RawClient":
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 20))

    def send(self, body: bytes) -> None:
        self.writer.writelines((_HEADER.pack(len(body)), body))

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv_many(self, count: int) -> list[bytes]:
        while len(self.frames) < count:
            data = await self.reader.read(1 << 18)
            if not data:
                raise ConnectionError("server closed")
            self.buf += data
            self.frames += _split(self.buf)
        got, self.frames = self.frames[:count], self.frames[count:]
        return got

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class _ClusterpyClient:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, port: int) -> "_ClusterpyClient":
        from clusterpy.identity import local_info
        from clusterpy.transport.stream import connect

        conn = await connect("127.0.0.1", port, secret=os.environ["CLUSTERPY_SECRET"].encode(),
                             role="client", info=local_info(), expected_peer_roles=frozenset({"node"}))
        return cls(conn)

    def send(self, body: bytes) -> None:
        self.conn.send(body)

    async def drain(self) -> None:
        await self.conn.drain()

    async def recv_many(self, count: int) -> list[bytes]:
        return [await self.conn.recv() for _ in range(count)]

    async def close(self) -> None:
        await self.conn.aclose()


async def _measure(mode: str, port: int, small: int, window: int, rtts: int, big: int, big_bytes: int) -> dict[str, float]:
    client = await (_RawClient if mode == "raw" else _ClusterpyClient).open(port)
    try:
        # Pipelined small messages.
        for _ in range(3):  # warm-up
            client.send(SMALL)
            await client.recv_many(1)
        start = time.perf_counter()
        for _ in range(small // window):
            for _ in range(window):
                client.send(SMALL)
            await client.drain()
            await client.recv_many(window)
        pipelined = (small // window * window) / (time.perf_counter() - start)
        # Sequential small round trips.
        lat = []
        for _ in range(rtts):
            t = time.perf_counter()
            client.send(SMALL)
            await client.recv_many(1)
            lat.append(time.perf_counter() - t)
        lat.sort()
        # Large frames, 4 in flight.
        payload = os.urandom(big_bytes)
        start = time.perf_counter()
        sent = received = 0
        inflight = 0
        while received < big:
            while inflight < 4 and sent < big:
                client.send(payload)
                sent += 1
                inflight += 1
            await client.drain()
            back = await client.recv_many(1)
            if len(back[0]) != big_bytes:
                raise AssertionError("echo of the wrong size")
            received += 1
            inflight -= 1
        bandwidth = 2 * big * big_bytes / (time.perf_counter() - start) / 1e6
    finally:
        await client.close()
    return {
        f"G.{mode}.msgs": pipelined,
        f"G.{mode}.rtt": lat[len(lat) // 2] * 1e6,
        f"G.{mode}.rtt99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] * 1e6,
        f"G.{mode}.mbps": bandwidth,
    }


def measure(mode: str, *, small: int = 100_000, window: int = 100, rtts: int = 2_000, big: int = 50,
            big_bytes: int = 1 << 20) -> dict[str, float]:
    """Start a ``mode`` echo server process, measure against it, stop it."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", mode], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"echo server did not start: {line!r}")
        return asyncio.run(_measure(mode, int(line.split()[1]), small, window, rtts, big, big_bytes))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        try:
            asyncio.run(serve(sys.argv[2]))
        except KeyboardInterrupt:
            pass
    else:
        os.environ.setdefault("CLUSTERPY_SECRET", "rawloop-" + os.urandom(8).hex())
        for mode in ("raw", "clusterpy"):
            print(mode, measure(mode))
