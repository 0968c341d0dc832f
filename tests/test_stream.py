"""The asyncio adapter over real sockets on 127.0.0.1."""

import asyncio
import json
import logging
import os
import struct
from collections.abc import Awaitable, Callable

import pytest

from clusterpy.errors import (
    AuthenticationError,
    ClusterError,
    ConnectionClosedError,
    FrameTooLargeError,
    ProtocolError,
    VersionMismatchError,
)
from clusterpy.protocol.framing import encode_frame
from clusterpy.protocol.handshake import ClientHandshake
from clusterpy.transport.stream import Connection, accept, connect

SECRET = b"the cluster secret"
INFO = {"python": "3.11", "cloudpickle": "3.0.0", "hostname": "test"}

Handler = Callable[[Connection], Awaitable[None]]


class Server:
    """A node-like test server: accepts, runs ``handler``, records handshake errors."""

    def __init__(self, handler: Handler | None = None, **accept_kw) -> None:
        self.handler = handler
        self.accept_kw = {"secret": SECRET, "role": "node", "info": INFO,
                          "expected_peer_roles": {"client", "scheduler"}, **accept_kw}
        self.errors: list[ClusterError] = []
        self.accepted = 0
        self.errors_changed = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    def _serve(self, reader, writer) -> None:
        self.tasks.add(asyncio.ensure_future(self._handle(reader, writer)))

    async def _handle(self, reader, writer) -> None:
        try:
            conn = await accept(reader, writer, **self.accept_kw)
        except ClusterError as exc:
            self.errors.append(exc)
            self.errors_changed.set()
            return
        self.accepted += 1
        async with conn:
            if self.handler is not None:
                await self.handler(conn)

    async def next_error(self) -> ClusterError:
        while not self.errors:
            self.errors_changed.clear()
            await self.errors_changed.wait()
        return self.errors.pop(0)

    def connect(self, **kw) -> Awaitable[Connection]:
        args = {"secret": SECRET, "role": "client", "info": INFO,
                "expected_peer_roles": {"node"}, **kw}
        return connect("127.0.0.1", self.port, **args)


async def echo(conn: Connection) -> None:
    try:
        while True:
            conn.send(await conn.recv())
    except ConnectionClosedError:
        pass


@pytest.fixture(autouse=True)
async def hard_timeout():
    # No test may hang: the whole suite must stay fast.
    async with asyncio.timeout(15):
        yield


async def test_ten_thousand_pipelined_messages_both_ways():
    n = 10_000

    async def talk(conn: Connection) -> list[bytes]:
        async def sender():
            for i in range(n):
                conn.send(b"msg %d" % i)
            await conn.drain()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(sender())
            received = [await conn.recv() for _ in range(n)]
        return received

    server_got: list[bytes] = []

    async def handler(conn: Connection) -> None:
        server_got.extend(await talk(conn))

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            assert conn.peer_role == "node" and conn.peer_info == INFO
            client_got = await talk(conn)
            assert client_got == [b"msg %d" % i for i in range(n)]
            with pytest.raises(ConnectionClosedError):
                await conn.recv()  # the server closes after its handler returns
        assert server_got == client_got


async def test_one_mib_payloads_and_data_right_after_the_handshake():
    big = os.urandom(1 << 20)

    async def handler(conn: Connection) -> None:
        # Sent immediately after B4: must not be judged by the pre-auth 4 KiB cap.
        conn.send(big)
        await echo(conn)

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            assert await conn.recv() == big
            for i in range(4):
                payload = bytes([i]) * (1 << 20)
                conn.send(payload)
                assert await conn.recv() == payload


async def test_a_message_with_out_of_band_blobs_crosses_intact():
    # encode_parts -> send(parts) -> recv -> decode: the blobs come back as views of the frame.
    from clusterpy.protocol import codec
    from clusterpy.protocol import messages as m

    args = [os.urandom(size) for size in (70_000, 1 << 20, 10)]
    message = m.SubmitJobs("c", tuple(m.JobRequest(f"j{i}", 1, a) for i, a in enumerate(args)))
    parts = codec.encode_parts(message)
    assert len(parts) == 3  # the pickle, then the two large blobs as they are

    async def handler(conn: Connection) -> None:
        received = codec.decode(await conn.recv())
        conn.send(codec.encode_parts(received))  # re-sent from the views, as a scheduler relays

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            conn.send(parts)
            echoed = codec.decode(await conn.recv())
    assert echoed == message
    assert [type(job.args) for job in echoed.jobs] == [memoryview, memoryview, bytes]


async def test_large_payloads_are_paced_into_the_transport_in_order():
    # A 32 MB payload is handed to the transport a piece at a time as it drains, so the
    # transport never holds (and copies) most of it; small frames sent after it stay behind it.
    big = [os.urandom(32 << 20), os.urandom(8 << 20)]
    release = asyncio.Event()

    async def handler(conn: Connection) -> None:
        conn._transport.pause_reading()  # read nothing until released: the client's side fills up
        await release.wait()
        conn._transport.resume_reading()
        for _ in range(2 + 100):
            conn.send(await conn.recv())
        await conn.drain()

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            conn.send(big[0])
            for i in range(100):
                conn.send(b"small %d" % i)
            conn.send(big[1])
            await asyncio.sleep(0)  # the turn ends: the corked frames are flushed
            await asyncio.sleep(0.05)
            assert conn._writer.pending and conn._transport.get_write_buffer_size() < 1 << 20
            release.set()
            await conn.drain()
            assert not conn._writer.pending
            echoed = [await conn.recv() for _ in range(102)]
    assert echoed == [big[0], *[b"small %d" % i for i in range(100)], big[1]]


async def test_eager_delivery_handles_messages_in_the_read_callback_in_order():
    # While the receiving task waits in recv(), payloads go to the handler as they are read;
    # one the handler leaves (False) and everything after it come through recv(), in order,
    # until the task waits again.
    got: list[tuple[str, bytes]] = []
    parked: list[bool] = []
    server: list[Connection] = []
    done = asyncio.Event()

    async def handler(conn: Connection) -> None:
        def eager(payload: bytes | bytearray) -> bool:
            parked.append(conn._waiting)
            if payload.startswith(b"slow"):
                return False
            got.append(("eager", bytes(payload)))
            return True

        conn.deliver_eagerly(eager)
        server.append(conn)
        while True:
            payload = await conn.recv()
            got.append(("recv", bytes(payload)))
            if payload == b"end":
                done.set()
                return
            await asyncio.sleep(0.05)  # handling that awaits: what arrives meanwhile queues

    async def until(condition) -> None:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.005)

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            await until(lambda: server and server[0]._waiting)
            for i in range(5):
                conn.send(b"fast %d" % i)
            await until(lambda: len(got) == 5)
            conn.send(b"slow")
            conn.send(b"after slow")  # in the same write: it arrives while "slow" is handled
            await until(lambda: len(got) == 7 and server[0]._waiting)
            conn.send(b"fast again")
            await until(lambda: len(got) == 8)
            conn.send(b"slow end")
            conn.send(b"end")
            await asyncio.wait_for(done.wait(), 5)
    assert got == [*[("eager", b"fast %d" % i) for i in range(5)], ("recv", b"slow"), ("recv", b"after slow"),
                   ("eager", b"fast again"), ("recv", b"slow end"), ("recv", b"end")]
    assert all(parked)  # the handler only ever ran while the task was parked in recv()


async def test_a_protocol_error_raised_by_the_eager_handler_breaks_the_connection():
    failure: list[BaseException] = []

    async def handler(conn: Connection) -> None:
        def eager(payload: bytes | bytearray) -> bool:
            if payload == b"bad":
                raise ProtocolError("a malformed message")
            return True

        conn.deliver_eagerly(eager)
        try:
            await conn.recv()
        except ProtocolError as exc:
            failure.append(exc)

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            conn.send(b"good")
            conn.send(b"bad")
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(conn.recv(), 5)
    assert [str(e) for e in failure] == ["a malformed message"]


async def test_wrong_secret_refused_on_both_sides_then_good_client_accepted(caplog):
    caplog.set_level(logging.WARNING, logger="clusterpy.transport")
    async with Server(echo) as srv:
        with pytest.raises(AuthenticationError) as info:
            await srv.connect(secret=b"not the secret")
        msg = str(info.value)
        assert f"127.0.0.1:{srv.port}" in msg and "node" in msg and "wrong secret?" in msg
        server_error = await srv.next_error()
        assert isinstance(server_error, AuthenticationError)
        assert "wrong secret?" in str(server_error) and "127.0.0.1:" in str(server_error)
        assert any(r.levelno == logging.WARNING and "127.0.0.1:" in r.getMessage()
                   and "wrong secret?" in r.getMessage() for r in caplog.records)
        # The server keeps serving.
        async with await srv.connect() as conn:
            conn.send(b"ping")
            assert await conn.recv() == b"ping"


async def test_server_refusal_reaches_the_client_with_address():
    async with Server() as srv:
        with pytest.raises(AuthenticationError,
                           match=rf"node 127\.0\.0\.1:{srv.port} refused the connection: "
                                 "this node does not accept peers with role 'node'"):
            await srv.connect(role="node")
        assert isinstance(await srv.next_error(), AuthenticationError)


async def test_version_mismatch_is_clear():
    async with Server(info={**INFO, "cloudpickle": "0.0.1"}) as srv:
        with pytest.raises(VersionMismatchError, match="cloudpickle 0.0.1"):
            await srv.connect()
        assert isinstance(await srv.next_error(), VersionMismatchError)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a raw socket and return everything until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await reader.read()
    finally:
        writer.close()


def refusal(reply: bytes) -> dict:
    (length,) = struct.unpack(">I", reply[:4])
    assert len(reply) == 4 + length
    obj = json.loads(reply[4:])
    assert obj["t"] == "refused"
    return obj


@pytest.mark.parametrize(
    "garbage,error",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", FrameTooLargeError),
        (b"\xff\xff\xff\xff" + b"x" * 100_000, FrameTooLargeError),
        (encode_frame(b"\x00garbage{"), ProtocolError),
        (encode_frame(b'{"t":"hello"}'), ProtocolError),
    ],
)
async def test_garbage_is_refused(garbage, error):
    async with Server(echo) as srv:
        reply = await raw_exchange(srv.port, garbage)
        assert refusal(reply)["kind"] == "protocol"
        assert isinstance(await srv.next_error(), error)
        assert srv.accepted == 0


async def test_handshake_timeout_cuts_silent_and_slow_drip_clients():
    async with Server(echo, handshake_timeout=0.3) as srv:
        loop = asyncio.get_running_loop()
        start = loop.time()
        reply = await raw_exchange(srv.port, b"")
        assert "timed out" in refusal(reply)["reason"]
        assert loop.time() - start < 2
        start = loop.time()
        error = await srv.next_error()
        assert isinstance(error, ConnectionClosedError) and "timed out" in str(error)

        # A client dripping a valid B1 one byte at a time is cut too.
        hs = ClientHandshake(SECRET, role="client", info=INFO, nonce=os.urandom(32))
        b1 = encode_frame(hs.start())
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        until_eof = asyncio.ensure_future(reader.read())
        for byte in b1:
            if until_eof.done():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("a slow-drip client was not cut off")
        assert loop.time() - start < 4
        try:
            assert "timed out" in refusal(await until_eof)["reason"]
        except ConnectionError:
            pass  # the reset may overtake the refusal
        writer.close()
        assert "timed out" in str(await srv.next_error())


async def test_client_handshake_timeout():
    writers = []
    server = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionClosedError, match="timed out"):
            await connect("127.0.0.1", port, secret=SECRET, role="client", info=INFO,
                          handshake_timeout=0.2)
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connection_refused_is_connection_closed():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectionClosedError, match="cannot connect"):
        await connect("127.0.0.1", port, secret=SECRET, role="client", info=INFO)


async def test_closed_connection_refuses_use():
    async with Server(echo) as srv:
        conn = await srv.connect()
        await conn.aclose()
        assert conn.closed
        with pytest.raises(ConnectionClosedError, match="closed locally"):
            conn.send(b"x")
        with pytest.raises(ConnectionClosedError, match="closed locally"):
            await conn.recv()
        await conn.aclose()  # idempotent


async def test_tampered_frame_after_handshake_breaks_the_connection():
    async def handler(conn: Connection) -> None:
        # Inject a forged frame the session MAC must reject.
        conn._transport.write(encode_frame(b"\x00" * 8 + b"forged" + b"\x00" * 32))
        await conn.drain()
        await asyncio.sleep(1)

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            with pytest.raises(AuthenticationError):
                await conn.recv()
            assert conn.closed
            with pytest.raises(ConnectionClosedError, match="broken"):
                await conn.recv()


async def test_post_auth_frame_cap_applies():
    async def handler(conn: Connection) -> None:
        conn._transport.write(struct.pack(">I", 10_000))
        await conn.drain()
        await asyncio.sleep(1)

    async with Server(handler) as srv:
        async with await srv.connect(max_frame=5000) as conn:
            with pytest.raises(ValueError):
                conn.send(b"x" * 5000)  # over our own cap once sealed
            with pytest.raises(FrameTooLargeError):
                await conn.recv()


async def test_flow_control_both_ways_with_a_reader_that_stops():
    # The server stops reading: its receiver pauses the socket once 4 MiB wait unreceived,
    # the kernel buffers fill, and the client's drain() waits. When the server reads again,
    # every frame arrives, intact and in order.
    release = asyncio.Event()
    got: list[bytes] = []

    async def handler(conn: Connection) -> None:
        await release.wait()
        for _ in range(40):
            got.append(bytes(await conn.recv()))
        conn.send(b"done")
        await conn.drain()
        await asyncio.sleep(1)

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            frames = [bytes([i]) * (1 << 20) for i in range(40)]

            async def sender():
                for frame in frames:
                    conn.send(frame)
                    await conn.drain()

            task = asyncio.create_task(sender())
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert not done, "40 MiB went out although nobody read them: no back-pressure"
            release.set()
            await asyncio.wait_for(task, 10)
            assert await conn.recv() == b"done"
    assert got == frames


async def test_eof_in_the_middle_of_a_frame_is_named():
    async def handler(conn: Connection) -> None:
        conn._transport.write(struct.pack(">I", 200_000) + b"x" * 100_000)  # half a large frame
        await asyncio.sleep(0.2)
        conn._transport.close()

    async with Server(handler) as srv:
        async with await srv.connect() as conn:
            with pytest.raises(ConnectionClosedError, match="in the middle of a frame"):
                await conn.recv()
