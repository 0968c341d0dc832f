"""What a peer tells about itself in the handshake (never secret, never pickled)."""

from __future__ import annotations

import platform
import socket
import sys

import cloudpickle

from . import __version__

__all__ = ["local_info", "DEFAULT_NODE_PORT", "DEFAULT_SCHEDULER_PORT"]

#: TCP port of clusterpy-node (and its UDP discovery port).
DEFAULT_NODE_PORT = 9700
#: TCP port of clusterpy-scheduler.
DEFAULT_SCHEDULER_PORT = 9702


def local_info(**extra: object) -> dict[str, str]:
    """Versions that must match between peers, plus ``extra`` fields, all as short strings."""
    info = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cloudpickle": cloudpickle.__version__,
        "clusterpy": __version__,
        "hostname": socket.gethostname()[:200],
        "platform": platform.system()[:50],
    }
    info.update({k: str(v) for k, v in extra.items()})
    return info
