"""The web monitor: a live page (and a JSON endpoint) for a JobCluster or clusterpy-scheduler.

::

    JobCluster(..., monitor=True)                 clusterpy-scheduler --monitor [PORT]
      _Runtime.finish --record_job--> JobHistory    SchedulerServer (JobDone / ResolveJob) --Ended--> JobHistory
              \\                                       /
               ClusterSource / SchedulerSource: snapshot(), cancel(key), stop_node(name)
                                   |  (same event loop: no locks)
               MonitorServer (aiohttp): Guard (Host, token, origin) -> routes -> SSE push

The client feeds its history only while a monitor runs (``record_job``: a count per job; a
failure is formatted only when a page reads it). The HTTP part needs aiohttp (``pip install
clusterpy[monitor]``) and is imported only when a monitor starts; :class:`JobHistory` and the
adapters are plain Python, always available.
See docs/MONITOR.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ._history import Ended, JobHistory, Throughput
from ._sources import (
    ClusterSource,
    MonitorSource,
    SchedulerSource,
    job_ended,
    record_job,
    report_ended,
    resolved_ended,
)

if TYPE_CHECKING:
    from ._server import MonitorServer

__all__ = [
    "MonitorSpec", "parse_monitor", "start_monitor", "MonitorServer", "MonitorSource", "ClusterSource",
    "SchedulerSource", "JobHistory", "Ended", "Throughput", "job_ended", "record_job", "report_ended",
    "resolved_ended",
]

log = logging.getLogger("clusterpy.monitor")

INSTALL_HINT = "the web monitor needs aiohttp: pip install 'clusterpy[monitor]'"


@dataclass(frozen=True)
class MonitorSpec:
    """Where to serve the monitor: ``host`` (default loopback) and ``port`` (0: any free one)."""

    host: str = "127.0.0.1"
    port: int = 0


def parse_monitor(value: Any) -> MonitorSpec | None:
    """Read a ``monitor=`` argument: False/None (off), True (loopback, a free port), a port
    number, or ``"PORT"`` / ``"HOST:PORT"`` / ``"[V6]:PORT"``.

    Raises:
        ConfigurationError: anything else, or a port out of range.
    """
    if value is None or value is False:
        return None
    if value is True:
        return MonitorSpec()
    host, port_text = "127.0.0.1", None
    if isinstance(value, int):
        port_text = str(value)
    elif isinstance(value, str):
        h, sep, p = value.rpartition(":")
        host, port_text = (h.strip("[]") or "127.0.0.1", p) if sep else ("127.0.0.1", value)
    if port_text is None or not port_text.strip().isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigurationError(f"monitor must be True, a port (0-65535) or 'HOST:PORT', not {value!r}")
    return MonitorSpec(host, int(port_text))


def _server_class() -> type["MonitorServer"]:
    try:
        from ._server import MonitorServer
    except ImportError as exc:
        if getattr(exc, "name", None) and not str(exc.name).startswith("aiohttp"):
            raise
        raise ConfigurationError(INSTALL_HINT) from None
    return MonitorServer


def require_aiohttp() -> None:
    """Raise ConfigurationError (with the install hint) now if the monitor could not start."""
    _server_class()


async def start_monitor(source: MonitorSource, spec: MonitorSpec, **options: Any) -> "MonitorServer":
    """Start a :class:`MonitorServer` for ``source`` in the running loop and log its URL.

    Raises:
        ConfigurationError: aiohttp is missing, or the address cannot be bound.
    """
    server = _server_class()(source, host=spec.host, port=spec.port, **options)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigurationError(f"the monitor cannot listen on {spec.host}:{spec.port}: {exc}") from None
    # WARNING, not INFO: the URL is a credential, and a script with no logging set up still shows it.
    log.warning("monitor at %s (anyone with this URL can see and cancel the jobs)", server.url)
    return server


def __getattr__(name: str) -> Any:
    if name == "MonitorServer":
        return _server_class()
    raise AttributeError(f"module 'clusterpy.monitor' has no attribute {name!r}")
