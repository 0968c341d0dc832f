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
