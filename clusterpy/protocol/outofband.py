"""Pickles that carry their large buffers beside them (pickle protocol 5 out-of-band buffers).

Used for the messages between client, scheduler and node (:mod:`.codec`) and for the frames
between a node and its workers (:mod:`clusterpy._channel`). A payload is one of::

    in band:      | pickle (its first byte is 0x80, the PROTO opcode) |
    out of band:  | 0x01 | count (>I) | count x length (>Q) | pickle | buffer 0 | ... | buffer n-1 |

:func:`dumps` returns a payload as a list of parts: the buffers are parts of their own, never
copied into the pickle, so a sender writes them as they are (``writev``, or one transport
write each). :func:`split` finds the pickle and the buffers inside a received payload as
views, so a receiver unpickles with ``buffers=`` and the objects it rebuilds point into the
received bytes instead of copies of them.

Only objects that pickle as a :class:`pickle.PickleBuffer` travel out of band: the message
types wrap their large blobs in one (``messages._blob``), the channel wraps large ``bytes``
with :func:`wrap`. This module does no I/O.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["MARK", "MIN_SIZE", "Part", "dumps", "assemble", "wrap", "split", "load", "is_out_of_band", "payload_size"]

#: First byte of an out-of-band payload (a pickle's first byte is 0x80).
MARK = 0x01
#: Buffers at least this large are worth sending out of band: below it, the header and the
#: extra write cost more than copying the bytes into the pickle.
MIN_SIZE = 64 * 1024

_COUNT = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")
_MARK_BYTE = bytes((MARK,))

#: One piece of a payload.
Part = bytes | memoryview


def wrap(value: Any) -> Any:
    """``value`` as it should be pickled: a ``memoryview``, or a ``bytes`` or ``bytearray`` of
    at least :data:`MIN_SIZE` bytes, as a :class:`pickle.PickleBuffer` (unpickled as a
    ``memoryview``, writable if the buffer was, when sent out of band); a tuple (user data
    with its buffers, :mod:`clusterpy._userdata`) item by item; anything else as it is."""
    kind = type(value)
    if kind is tuple:
        return tuple([wrap(item) for item in value])
    if kind is memoryview or ((kind is bytes or kind is bytearray) and len(value) >= MIN_SIZE):
        return pickle.PickleBuffer(value)  # a view of any size: it cannot be pickled in band
    return value


def dumps(obj: object, pickler: type[pickle.Pickler] = pickle.Pickler) -> list[Part]:
    """Pickle ``obj`` (protocol 5) as the parts of one payload, in order; its
    :class:`pickle.PickleBuffer` s are parts of their own (they must not change until sent)."""
    out = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    if not buffers:
        return [out.getvalue()]
    return assemble(out.getvalue(), buffers)


def assemble(data: bytes, buffers: list[pickle.PickleBuffer]) -> list[Part]:
    """The parts of the out-of-band payload of the pickle ``data`` and the (non-empty list
    of) buffers its pickler handed out, in order."""
    views = [buffer.raw() for buffer in buffers]
    header = _MARK_BYTE + _COUNT.pack(len(views)) + b"".join([_LENGTH.pack(view.nbytes) for view in views])
    return [header + data, *views]


def payload_size(payload: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]) -> int:
    """Bytes in ``payload``: one buffer, or the buffers that together are the payload."""
    kind = type(payload)
    if kind is bytes or kind is bytearray:  # the common cases first, without isinstance
        return len(payload)
    if isinstance(payload, memoryview):
        return payload.nbytes
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    return sum(part.nbytes if type(part) is memoryview else len(part) for part in payload)


def is_out_of_band(payload: bytes | bytearray | memoryview) -> bool:
    """True if ``payload`` is in the out-of-band form (check before :func:`split`)."""
    return len(payload) > 0 and payload[0] == MARK


def split(payload: bytes | bytearray | memoryview) -> tuple[memoryview, list[memoryview]]:
    """Return views of the pickle and of the buffers of an out-of-band payload (writable if
    ``payload`` is: a buffer its sender marked writable then unpickles writable).

    Raises:
        ValueError: the header is malformed, or announces more bytes than the payload holds.
    """
    view = memoryview(payload).cast("B")
    size = len(view)
    if size < 1 + _COUNT.size or view[0] != MARK:
        raise ValueError("not an out-of-band payload")
    (count,) = _COUNT.unpack_from(view, 1)
    start = 1 + _COUNT.size + count * _LENGTH.size
    if count == 0 or start > size:
        raise ValueError(f"out-of-band payload announces {count} buffers it cannot hold")
    lengths = [length for (length,) in _LENGTH.iter_unpack(view[1 + _COUNT.size : start])]
    end = size - sum(lengths)
    if end < start:
        raise ValueError("out-of-band buffers are longer than the payload")
    buffers = []
    offset = end
    for length in lengths:
        buffers.append(view[offset : offset + length])
        offset += length
    return view[start:end], buffers


def load(unpickler: type[pickle.Unpickler], payload: bytes | bytearray | memoryview,
         file: Any = None) -> Any:
    """Unpickle ``payload`` (either form) with ``unpickler``; ``file`` (optional) reads the
    pickle part, given as a view, for callers with a faster reader than ``io.BytesIO``.

    Raises:
        ValueError: malformed out-of-band header, or buffers the pickle does not use.
        Exception: whatever the unpickler raises for a malformed pickle.
    """
    if not is_out_of_band(payload):
        if file is None and unpickler is pickle.Unpickler:
            return pickle.loads(payload)
        return unpickler(file(payload) if file is not None else io.BytesIO(payload)).load()
    data, buffers = split(payload)
    remaining = iter(buffers)
    if file is None and unpickler is pickle.Unpickler:
        obj = pickle.loads(data, buffers=remaining)
    else:
        obj = unpickler(file(data) if file is not None else io.BytesIO(data), buffers=remaining).load()
    if next(remaining, None) is not None:
        raise ValueError("out-of-band payload carries buffers its pickle does not use")
    return obj
