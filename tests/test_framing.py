"""The frame decoder driven directly: no sockets, no event loop."""

import ast
import pathlib
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterpy.protocol
from clusterpy.errors import FrameTooLargeError, ProtocolError
from clusterpy.protocol.framing import (
    DEFAULT_MAX_FRAME,
    DIRECT_BODY,
    PREAUTH_MAX_FRAME,
    FrameDecoder,
    encode_frame,
    frame_header,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def test_constants():
    assert PREAUTH_MAX_FRAME == 4096
    assert DEFAULT_MAX_FRAME == 256 * 1024 * 1024


def test_encode_frame_is_big_endian_length_plus_body():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_encode_frame_rejects_4_gib():
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(ValueError):
        encode_frame(Huge())
    with pytest.raises(ValueError):
        frame_header(2**32)
    assert frame_header(2**32 - 1) == b"\xff\xff\xff\xff"


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), max_size=30),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_round_trip_in_any_chunking(bodies, cuts):
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(300)
    out = []
    for chunk in chunked(stream, cuts):
        out.extend(decoder.feed(chunk))
        # Never more than one unfinished frame (header + body) is held.
        assert decoder.buffered <= 300 + 4
    assert out == bodies
    assert decoder.buffered == 0
    assert decoder.needed == 4


def _read_through_buffers(decoder: FrameDecoder, stream: bytes, reads: list[int]) -> list:
    """Drive the decoder as a BufferedProtocol would: read at most ``reads[i]`` bytes into
    each buffer it offers (a socket's recv_into)."""
    out, pos, i = [], 0, 0
    while pos < len(stream):
        buf = decoder.get_buffer()
        n = min(len(buf), len(stream) - pos, max(1, reads[i % len(reads)] if reads else len(buf)))
        buf[:n] = stream[pos : pos + n]
        del buf  # a real transport drops its view before the bodies are used
        pos += n
        i += 1
        out.extend(decoder.buffer_updated(n))
    return out


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 7, 300, DIRECT_BODY - 1, DIRECT_BODY, 3 * DIRECT_BODY + 5]), max_size=8),
    reads=st.lists(st.integers(min_value=1, max_value=600_000), max_size=10),
)
def test_buffer_interface_round_trips_any_read_sizes(sizes, reads):
    bodies = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(4 * DIRECT_BODY)
    assert _read_through_buffers(decoder, stream, reads) == bodies
    assert decoder.buffered == 0 and decoder.needed == 4


def test_large_body_is_received_in_place_into_its_own_buffer():
    body = bytes(range(256)) * (DIRECT_BODY // 128)  # 2 x DIRECT_BODY
    decoder = FrameDecoder()
    first = decoder.get_buffer()
    first[:4 + 1000] = encode_frame(body)[: 4 + 1000]
    del first
    assert decoder.buffer_updated(4 + 1000) == []
    rest = decoder.get_buffer()
    assert len(rest) == len(body) - 1000  # exactly the rest of the body: nothing past the frame
    rest[:] = body[1000:]
    del rest
    (out,) = decoder.buffer_updated(len(body) - 1000)
    assert isinstance(out, bytearray) and out == body
    assert decoder.needed == 4


def test_large_body_fed_in_chunks_is_assembled_without_growing():
    body = b"x" * (DIRECT_BODY * 2)
    stream = encode_frame(body)
    decoder = FrameDecoder()
    assert decoder.feed(stream[:100]) == []
    assert decoder.buffered == 96
    assert decoder.feed(stream[100:]) == [body]


def test_many_small_frames_in_one_feed():
    bodies = [str(i).encode() for i in range(20_000)]
    decoder = FrameDecoder(PREAUTH_MAX_FRAME)
    assert decoder.feed(b"".join(map(encode_frame, bodies))) == bodies


def test_accepts_memoryview_and_bytearray():
    decoder = FrameDecoder()
    assert decoder.feed(bytearray(encode_frame(b"x"))) == [b"x"]
    assert decoder.feed(memoryview(encode_frame(b"y"))) == [b"y"]


def test_zero_length_frames():
    decoder = FrameDecoder(0)
    assert decoder.feed(encode_frame(b"") * 3) == [b"", b"", b""]
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.feed(b"\x00\x00") == [b""]


def test_one_mib_frame_in_64_kib_pieces():
    body = bytes(range(256)) * 4096
    stream = encode_frame(body) + encode_frame(b"next")
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(stream), 65536):
        out.extend(decoder.feed(stream[i : i + 65536]))
    assert out == [body, b"next"]


def test_large_frame_in_small_pieces_is_linear():
    # Quadratic re-copying of the buffer would move ~32 GB here and take many seconds.
    body = b"z" * (16 * 1024 * 1024)
    stream = encode_frame(body)
    decoder = FrameDecoder()
    start = time.perf_counter()
    out = []
    view = memoryview(stream)
    for i in range(0, len(stream), 4096):
        out.extend(decoder.feed(view[i : i + 4096]))
    assert time.perf_counter() - start < 2.0
    assert out == [body]


def test_needed_never_crosses_a_frame_boundary():
    stream = encode_frame(b"hello") + encode_frame(b"world")
    decoder = FrameDecoder()
    pos, out = 0, []
    while pos < len(stream):
        n = decoder.needed
        frames = decoder.feed(stream[pos : pos + n])
        pos += n
        if frames:
            out.extend(frames)
            # Stopping here leaves the decoder empty: nothing of the next frame was read.
            assert decoder.buffered == 0
    assert out == [b"hello", b"world"]


def test_oversize_header_rejected_before_any_body():
    decoder = FrameDecoder(100)
    assert decoder.feed(encode_frame(b"a" * 100)) == [b"a" * 100]
    with pytest.raises(FrameTooLargeError, match="101"):
        decoder.feed(struct.pack(">I", 101))  # the header alone is enough
    assert decoder.failed
    assert decoder.buffered == 0


def test_oversize_header_split_across_feeds():
    decoder = FrameDecoder(PREAUTH_MAX_FRAME)
    for byte in b"\x00\x00\x10":
        assert decoder.feed(bytes([byte])) == []
    with pytest.raises(FrameTooLargeError):
        decoder.feed(b"\x01")  # 0x00001001 = 4097


def test_4_gib_prefix_rejected_without_buffering():
    decoder = FrameDecoder(PREAUTH_MAX_FRAME)
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 10_000)
    assert isinstance(info.value, ProtocolError)
    assert decoder.buffered == 0


def test_failed_decoder_stays_failed():
    decoder = FrameDecoder(10)
    with pytest.raises(FrameTooLargeError):
        decoder.feed(encode_frame(b"ok") + encode_frame(b"x" * 11))
    for data in (encode_frame(b"ok"), b"", b"\x00"):
        with pytest.raises(FrameTooLargeError):
            decoder.feed(data)
    decoder.max_frame = 1000  # raising the cap does not revive it
    with pytest.raises(FrameTooLargeError):
        decoder.feed(encode_frame(b"ok"))


def test_cap_can_be_raised_after_authentication():
    decoder = FrameDecoder(PREAUTH_MAX_FRAME)
    decoder.max_frame = 10_000
    assert decoder.feed(encode_frame(b"q" * 10_000)) == [b"q" * 10_000]
    with pytest.raises(ValueError):
        decoder.max_frame = -1
    with pytest.raises(ValueError):
        FrameDecoder(2**32)


PROTOCOL_DIR = pathlib.Path(clusterpy.protocol.__file__).parent
CORE_DIR = PROTOCOL_DIR.parent / "core"
FORBIDDEN = {"asyncio", "socket", "ssl", "time", "os", "random", "secrets", "threading", "subprocess"}


@pytest.mark.parametrize("path", sorted([*PROTOCOL_DIR.glob("*.py"), *CORE_DIR.glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_protocol_and_core_modules_do_no_io(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {imported & FORBIDDEN}"
