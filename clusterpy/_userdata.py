"""User data as it travels: a job's arguments, its result, a provisional result.

A payload is what :func:`dumps` makes of a user's object: the ``bytes`` of its pickle, or,
when the object holds large buffers (NumPy arrays, large ``bytes`` or ``bytearray``
arguments or results), the tuple ``(pickle, buffer, ...)`` with those buffers beside the
pickle (pickle protocol 5 out-of-band buffers). The buffers are views of the user's own
memory: nothing is copied into the pickle. Message codecs carry each buffer as an
out-of-band part of their own (:mod:`clusterpy.protocol.outofband`), so it crosses every
hop (client, node, worker) without being copied into a pickle, and :func:`loads` rebuilds
the object on views of the received frame: a NumPy array is not copied at all, and stays
writable when the frame it arrived in is.

Payloads are opaque to the node: only the client and the workers call :func:`loads`.
"""

from __future__ import annotations

import pickle
from typing import Any, TypeAlias

from .protocol.outofband import MIN_SIZE, payload_size

__all__ = ["Payload", "MIN_SIZE", "dumps", "loads", "parts", "size", "lift"]

#: A pickle, or a pickle and its out-of-band buffers.
Payload: TypeAlias = "bytes | memoryview | tuple[bytes | memoryview, ...]"


class _Large:
    """A large ``bytes``/``bytearray`` that pickles out of band (pickle never sends these
    types out of band by itself) and is rebuilt as its own type: one copy, on loading."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        if protocol < 5:
            return (type(self.value), (bytes(self.value),))
        return (type(self.value), (pickle.PickleBuffer(self.value),))


def _lift_one(value: Any) -> Any:
    kind = type(value)
    if (kind is bytes or kind is bytearray) and len(value) >= MIN_SIZE:
        return _Large(value)
    return value


def lift(obj: Any) -> Any:
    """``obj`` with its large ``bytes``/``bytearray`` (itself, or items of a tuple, list or
    dict in it, two levels deep: a job's ``(args, kwargs)``) marked to travel out of band.
    Only copies containers that hold such a value."""
    kind = type(obj)
    if kind is tuple or kind is list:
        lifted = [lift(item) if type(item) in (tuple, list, dict) else _lift_one(item) for item in obj]
        if any(a is not b for a, b in zip(lifted, obj)):
            return tuple(lifted) if kind is tuple else lifted
        return obj
    if kind is dict:
        changed = {k: _lift_one(v) for k, v in obj.items()}
        if any(changed[k] is not v for k, v in obj.items()):
            return changed
        return obj
    return _lift_one(obj)


def dumps(obj: Any, dumps_fn: Any = None, *, snapshot: bool = False) -> Payload:
    """Pickle ``obj`` (protocol 5) with ``dumps_fn`` (``cloudpickle.dumps`` unless given;
    ``pickle.dumps`` for plain data), large buffers out of band.

    ``snapshot``: copy each writable buffer (a NumPy array, a ``bytearray``) into a
    ``bytearray`` now, so that later changes to the object do not reach the payload (a
    submitted job's arguments are its arguments at ``submit()``, as with
    ``ProcessPoolExecutor``); read-only buffers (``bytes``) are immutable and never copied.
    Without it the buffers are views of ``obj``'s memory, which must then not change until
    the payload is sent (a worker's result: sent before the next job starts).

    Raises:
        Exception: whatever pickling raises for an unpicklable object.
    """
    if dumps_fn is None:
        import cloudpickle

        dumps_fn = cloudpickle.dumps
    buffers: list[bytes | bytearray | memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < MIN_SIZE:
            return True  # small: in band
        if not snapshot:
            buffers.append(view)
        elif not view.readonly:
            buffers.append(bytearray(view))
        elif type(view.obj) is bytes and len(view.obj) == view.nbytes:
            buffers.append(view.obj)  # a bytes object is immutable: itself, not a copy
        else:
            buffers.append(bytes(view))
        return False

    data = dumps_fn(lift(obj), protocol=5, buffer_callback=out_of_band)
    return (data, *buffers) if buffers else data


def loads(payload: Payload) -> Any:
    """Rebuild the object :func:`dumps` pickled (a ``bytes``-like pickle or a tuple)."""
    if type(payload) is tuple:
        return pickle.loads(payload[0], buffers=payload[1:])
    return pickle.loads(payload)


def parts(payload: Payload | None) -> tuple[bytes | bytearray | memoryview, ...]:
    """The buffers of ``payload`` in order (none for None): to hash or compare it."""
    if payload is None:
        return ()
    return payload if type(payload) is tuple else (payload,)  # type: ignore[return-value]


def size(payload: Payload | None) -> int:
    """Bytes in ``payload`` (0 for None)."""
    return 0 if payload is None else payload_size(payload)
