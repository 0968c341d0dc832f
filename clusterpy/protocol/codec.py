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
from .messages import MESSAGE_TYPES

__all__ = ["encode", "decode"]

_MODULE = "clusterpy.protocol.messages"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _MODULE and name in MESSAGE_TYPES:
            return MESSAGE_TYPES[name]
        raise ProtocolError(f"message refers to a type that is not a clusterpy message: {module}.{name}")


def encode(message: object) -> bytes:
    """Serialize one message (a dataclass from :mod:`.messages`)."""
    return pickle.dumps(message, protocol=5)


def decode(payload: bytes | memoryview) -> Any:
    """Rebuild one message from an authenticated payload.

    Raises:
        ProtocolError: the payload is not a well-formed clusterpy message.
    """
    try:
        message = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except ProtocolError:
        raise
    except Exception as exc:  # any malformed pickle is the peer's fault, never ours
        raise ProtocolError(f"undecodable message: {exc!r}") from None
    if type(message).__name__ not in MESSAGE_TYPES or type(message) is not MESSAGE_TYPES[type(message).__name__]:
        raise ProtocolError(f"payload decoded to {type(message).__name__}, not a clusterpy message")
    return message
