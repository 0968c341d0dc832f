"""The message codec driven directly: every message type round-trips, and a payload that is
not a well-formed clusterpy message is a ProtocolError, whatever it tries."""

from __future__ import annotations

import dataclasses
import pickle
import typing

import pytest

from clusterpy.errors import ProtocolError
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m

_SAMPLES: dict[object, object] = {str: "x", int: 7, float: 1.5, bytes: b"\x00\xff", bool: True}


def _sample(tp: object) -> object:
    if tp in _SAMPLES:
        return _SAMPLES[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return (_sample(args[0]),) if args else ()
    if origin is dict:
        return {_sample(args[0]): _sample(args[1])}
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample(next(a for a in args if a is not type(None)))
    if dataclasses.is_dataclass(tp):
        return _build(tp)
    return None


def _build(cls: type) -> object:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _sample(hints[f.name]) for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("name", sorted(m.MESSAGE_TYPES))
def test_every_message_type_round_trips(name):
    message = _build(m.MESSAGE_TYPES[name])
    decoded = codec.decode(codec.encode(message))
    assert decoded == message and type(decoded) is type(message)


class _PingWithTwoFields:
    def __reduce__(self):
        return (m.Ping, (1.0, 2.0))


def test_a_message_with_the_wrong_number_of_fields_is_refused():
    payload = pickle.dumps(_PingWithTwoFields(), protocol=5)  # calls Ping(1.0, 2.0) when loaded
    with pytest.raises(ProtocolError, match="undecodable"):
        codec.decode(payload)


@pytest.mark.parametrize("payload", [
    pickle.dumps(print), pickle.dumps(ValueError("x")), pickle.dumps(object),
    b"", b"garbage", pickle.dumps({"t": "ping"}),
])
def test_anything_else_is_refused(payload):
    with pytest.raises(ProtocolError):
        codec.decode(payload)


def _large(cls: type) -> object:
    """A message of type ``cls`` whose blob fields hold 100 kB each."""
    message = _build(cls)
    blobs = m._BLOB_FIELDS[cls]
    return dataclasses.replace(message, **{name: bytes([i]) * 100_000 for i, name in enumerate(sorted(blobs))})


@pytest.mark.parametrize("cls", sorted(m._BLOB_FIELDS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_large_blobs_travel_out_of_band_and_decode_as_read_only_views(cls):
    inner = _large(cls)
    message = m.SubmitJobs("c", (inner,)) if cls is m.JobRequest else inner  # a JobRequest travels in a batch
    parts = codec.encode_parts(message)
    assert len(parts) == 1 + len(m._BLOB_FIELDS[cls]) and len(parts[0]) < 1000  # no blob copied into the pickle
    received = bytearray(b"".join(parts))  # as a large frame arrives: a bytearray, decoded in place
    decoded = codec.decode(received)
    assert decoded == message and type(decoded) is type(message)
    decoded_inner = decoded.jobs[0] if cls is m.JobRequest else decoded
    for name in m._BLOB_FIELDS[cls]:
        value = getattr(decoded_inner, name)
        assert isinstance(value, memoryview) and value.readonly and value.obj is received
    # A decoded message pickles anywhere (the journal, a node's kept results): blobs become bytes.
    for protocol in (4, 5):
        again = pickle.loads(pickle.dumps(decoded, protocol=protocol))
        again_inner = again.jobs[0] if cls is m.JobRequest else again
        assert again == message and all(type(getattr(again_inner, n)) is bytes for n in m._BLOB_FIELDS[cls])
    assert codec.decode(codec.encode(decoded)) == message  # and re-encodes (a scheduler relaying it)


def test_small_blobs_stay_in_band():
    message = m.JobDone("c", "j", 1, "finished", b"r" * 100, None, None, None, None, b"", b"", 0.0, 0.0, 0.0, None)
    (payload,) = codec.encode_parts(message)
    assert payload[:1] == b"\x80" and type(codec.decode(payload).result) is bytes


def _out_of_band_payload() -> bytes:
    return codec.encode(m.JobProgress("c", "j", 1, b"v" * 100_000))


@pytest.mark.parametrize("forge", [
    lambda p: p[:3],                                              # header cut short
    lambda p: p[:1] + (0).to_bytes(4, "big") + p[5:],             # no buffers announced
    lambda p: p[:1] + (10**6).to_bytes(4, "big") + p[5:],         # more lengths than the payload holds
    lambda p: p[:5] + (10**9).to_bytes(8, "big") + p[13:],        # a buffer longer than the payload
    lambda p: p[:1] + (2).to_bytes(4, "big") + p[5:13] + bytes(8) + p[13:],  # a buffer the pickle does not use
    lambda p: p[:-50_000],                                        # buffer truncated
], ids=["short", "zero", "count", "long", "unused", "truncated"])
def test_a_forged_out_of_band_header_is_a_protocol_error(forge):
    payload = _out_of_band_payload()
    assert codec.decode(payload) == m.JobProgress("c", "j", 1, b"v" * 100_000)
    with pytest.raises(ProtocolError):
        codec.decode(forge(payload))


def test_an_out_of_band_payload_cannot_smuggle_a_class():
    payload = bytearray(_out_of_band_payload())
    (count,) = __import__("struct").unpack_from(">I", payload, 1)
    start = 1 + 4 + 8 * count
    evil = pickle.dumps(print, protocol=5)
    forged = bytes(payload[:start]) + evil + bytes(payload[len(payload) - 100_000:])
    with pytest.raises(ProtocolError):
        codec.decode(forged)
