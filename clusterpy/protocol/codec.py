"""Encoding of authenticated messages: the only place that pickles protocol messages.

Messages are pickled (protocol 5) but decoded with a restricted unpickler that can build only
the dataclasses in :data:`~clusterpy.protocol.messages.MESSAGE_TYPES` and plain builtins, so
even an authenticated peer cannot make the daemon construct arbitrary objects while decoding a
message. User objects are opaque ``bytes`` inside messages, unpickled only where they are meant
to run (a worker) or be returned (the client).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ..errors import ProtocolError
from . import messages
from .messages import MESSAGE_TYPES

__all__ = ["encode", "decode"]

_MODULE = "clusterpy.protocol.messages"
_IN_PLACE = 64 * 1024


class _ViewReader:
    """The file interface the unpickler uses, over a buffer it does not copy: large bytes
    objects inside the pickle are filled straight from it with ``readinto``."""

    __slots__ = ("_view", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if n is None or n < 0 else min(start + n, len(self._view))
        self._pos = end
        return self._view[start:end].tobytes()

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as target:
            n = min(target.nbytes, len(self._view) - self._pos)
            target.cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def readline(self) -> bytes:
        start = self._pos
        end = self._view[start:].tobytes().find(b"\n")
        self._pos = len(self._view) if end < 0 else start + end + 1
        return self._view[start : self._pos].tobytes()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _MODULE and name in MESSAGE_TYPES:
            return MESSAGE_TYPES[name]
        raise ProtocolError(f"message refers to a type that is not a clusterpy message: {module}.{name}")


# Messages that can carry user bytes (arguments, results, output, files). pickle.dumps grows
# its output by reallocation, which costs ~400 us per MB; a Pickler writing into a BytesIO
# costs ~50 us per MB and ~1 us more for a small message.
_BULKY = frozenset({messages.DeployComputation, messages.FileChunk, messages.SubmitJobs, messages.JobDone,
                    messages.JobProgress, messages.JobFile})


def encode(message: object) -> bytes:
    """Serialize one message (a dataclass from :mod:`.messages`)."""
    if type(message) not in _BULKY:
        return pickle.dumps(message, protocol=5)
    out = io.BytesIO()
    pickle.Pickler(out, protocol=5).dump(message)
    return out.getvalue()


def decode(payload: bytes | bytearray | memoryview) -> Any:
    """Rebuild one message from an authenticated payload.

    Raises:
        ProtocolError: the payload is not a well-formed clusterpy message.
    """
    # BytesIO copies anything but bytes; a large bytearray or view is read in place instead.
    source = io.BytesIO(payload) if type(payload) is bytes or len(payload) < _IN_PLACE else _ViewReader(payload)
    try:
        message = _RestrictedUnpickler(source).load()
    except ProtocolError:
        raise
    except Exception as exc:  # any malformed pickle is the peer's fault, never ours
        raise ProtocolError(f"undecodable message: {exc!r}") from None
    if type(message).__name__ not in MESSAGE_TYPES or type(message) is not MESSAGE_TYPES[type(message).__name__]:
        raise ProtocolError(f"payload decoded to {type(message).__name__}, not a clusterpy message")
    return message
