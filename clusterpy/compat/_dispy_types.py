"""dispy's value types on top of clusterpy's: DispyJob, DispyNode, NodeAllocate, the logger.

A :class:`DispyJob` is a view of a :class:`clusterpy.ClusterJob`: its fields are read from the
clusterpy job, translated to dispy's conventions (integer status constants, the exception as
the remote traceback's text, ``job()`` returning ``None`` for a failed job instead of raising).
Callbacks get a copy of the view taken when the status changed, as dispy passed
``copy.copy(job)``; the copy shares the job's ``finish`` event.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import sys
import threading
from typing import Any

from clusterpy.errors import ConfigurationError, RemoteTraceback
from clusterpy.job import ClusterJob, JobStatus

__all__ = ["DispyJob", "DispyNode", "DispyNodeAvailInfo", "NodeAllocate", "ClusterStatus", "DispyLogger",
           "logger", "node_ipaddr", "parse_node_allocs"]


class DispyLogger:
    """dispy's ``logger``: a logging.Logger named ``"dispy"`` with the level names as attributes
    (``loglevel=dispy.logger.DEBUG``), printing to stderr as dispy did (not propagated)."""

    DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL = (logging.DEBUG, logging.INFO, logging.WARNING, logging.WARNING,
                                                   logging.ERROR, logging.CRITICAL)

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = logging.getLogger(name)
        self._ms = False
        self._thread = False
        if not self._logger.handlers:
            self._handler: logging.Handler = logging.StreamHandler(sys.stderr)
            self._logger.addHandler(self._handler)
            self._logger.propagate = False
            self._logger.setLevel(logging.INFO)
        else:
            self._handler = self._logger.handlers[0]
        self._format()

    def _format(self) -> None:
        time_format = "%Y-%m-%d %H:%M:%S"
        when = "%(asctime)s.%(msecs)03d" if self._ms else "%(asctime)s"
        who = " [%(threadName)s]" if self._thread else ""
        self._handler.setFormatter(logging.Formatter(f"{when} {self.name}{who} - %(message)s", time_format))

    def show_ms(self, flag: bool) -> None:
        self._ms = bool(flag)
        self._format()

    def show_threadname(self, flag: bool) -> None:
        self._thread = bool(flag)
        self._format()

    def setLevel(self, level: int | str) -> None:  # noqa: N802 -- logging's name
        self._logger.setLevel(level)

    @property
    def level(self) -> int:
        return self._logger.level

    def __getattr__(self, name: str) -> Any:  # debug, info, warning, error, critical, exception, log, ...
        return getattr(self._logger, name)


logger = DispyLogger("dispy")


class DispyJob:
    """A submitted job, as dispy showed it (see the module docstring).

    Fields: ``id`` (assignable), ``status`` (one of the class constants), ``result``, ``stdout``,
    ``stderr``, ``exception`` (``None``, or the remote traceback's text, or why the job did not
    finish), ``submit_time``, ``start_time``, ``end_time``, ``ip_addr``, ``finish`` (an event
    set when the job ended), ``args``/``kwargs`` (also ``_args``/``_kwargs``); clusterpy adds
    ``files`` (what the job sent with ``dispy_send_file``) and ``cluster_job``.
    """

    Created = 5
    Running = 6
    ProvisionalResult = 7
    Cancelled = 8
    Terminated = 9
    Abandoned = 10
    Finished = 11

    __slots__ = ("_job", "finish")

    def __init__(self, job: ClusterJob, finish: threading.Event | None = None) -> None:
        self._job = job
        self.finish = finish if finish is not None else threading.Event()

    def _view(self, job: ClusterJob) -> "DispyJob":
        """A copy showing ``job`` (a snapshot of this one), sharing ``finish``."""
        return DispyJob(job, self.finish)

    @property
    def cluster_job(self) -> ClusterJob:
        """The clusterpy job behind this view."""
        return self._job

    @property
    def id(self) -> Any:
        return self._job.id

    @id.setter
    def id(self, value: Any) -> None:
        self._job.id = value

    @property
    def status(self) -> int:
        return _STATUS[self._job.status]

    @property
    def result(self) -> Any:
        return self._job.result

    @property
    def exception(self) -> str | None:
        return exception_text(self._job)

    stdout = property(lambda self: self._job.stdout)
    stderr = property(lambda self: self._job.stderr)
    submit_time = property(lambda self: self._job.submit_time)
    start_time = property(lambda self: self._job.start_time)
    end_time = property(lambda self: self._job.end_time)
    ip_addr = property(lambda self: self._job.ip_addr)
    args = _args = property(lambda self: self._job.args)
    kwargs = _kwargs = property(lambda self: self._job.kwargs)
    files = property(lambda self: list(self._job.files))

    def __call__(self, clear: bool = False) -> Any:
        """Wait for the job to end; return its result (``None`` if it did not finish: see
        ``status`` and ``exception``). ``clear``: clear ``finish`` afterwards, as dispy did."""
        self.finish.wait()
        if clear:
            self.finish.clear()
        return self._job.result

    def __lt__(self, other: "DispyJob") -> bool:
        return int(self._job._key) < int(other._job._key)

    def __repr__(self) -> str:
        where = f" on {self.ip_addr}" if self.ip_addr else ""
        return f"<DispyJob id={self.id!r} {self._job.status.value}{where}>"


_STATUS = {
    JobStatus.Created: DispyJob.Created,
    JobStatus.Running: DispyJob.Running,
    JobStatus.ProvisionalResult: DispyJob.ProvisionalResult,
    JobStatus.Finished: DispyJob.Finished,
    JobStatus.Terminated: DispyJob.Terminated,
    JobStatus.Cancelled: DispyJob.Cancelled,
    JobStatus.Abandoned: DispyJob.Abandoned,
}


def exception_text(job: ClusterJob) -> str | None:
    """dispy's ``job.exception``: the text of the remote traceback, else the error's message."""
    exc = job.exception
    if exc is None:
        return None
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.tb.strip().strip('"').strip() + "\n"
    return f"{type(exc).__name__}: {exc}"


class DispyNodeAvailInfo:
    """What a node has free: CPU (percent), memory, disk and swap (bytes). clusterpy nodes do
    not report it, so ``allocate`` and ``DispyNode.avail_info`` get ``None``."""

    def __init__(self, cpu: float, memory: int, disk: int, swap: float) -> None:
        self.cpu, self.memory, self.disk, self.swap = cpu, memory, disk, swap


class DispyNode:
    """A node of the cluster, as ``cluster_status`` and ``status()`` show it.

    ``cpus``: CPUs this cluster uses there; ``avail_cpus``: the node's; ``busy``: jobs running;
    ``jobs_done``, ``cpu_time`` (seconds of job time), ``update_time``; ``tx``/``rx`` stay 0.
    """

    Initialized = DispyJob.Created - 1
    Closed = DispyJob.Finished + 5
    AvailInfo = Closed + 1

    def __init__(self, ip_addr: str, name: str, cpus: int) -> None:
        self.ip_addr = ip_addr
        self.name = name
        self.cpus = cpus
        self.avail_cpus = cpus
        self.busy = 0
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.tx = 0
        self.rx = 0
        self.update_time = 0.0
        self.avail_info: DispyNodeAvailInfo | None = None
        self.port = 0
        self._node_id: str | None = None

    def __repr__(self) -> str:
        return f"<DispyNode {self.name} {self.ip_addr}:{self.port} cpus={self.cpus}>"


#: What ``cluster.status()`` returns.
ClusterStatus = collections.namedtuple("ClusterStatus", ["nodes", "jobs_pending"])


def node_ipaddr(host: str | None) -> str | None:
    """A host's IP address (IPv4 preferred); a wildcard pattern as it is; None if unknown."""
    if not host:
        return None
    if "*" in host:
        return host
    try:
        found = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except OSError:
        return None
    best = next((a for a in found if a[0] == socket.AF_INET), found[0] if found else None)
    return None if best is None else str(best[4][0])


class NodeAllocate:
    """Which nodes a cluster uses, and how (dispy's contract).

    Args:
        host: a host name, an IP address, or a pattern with ``*`` (``"192.168.1.*"``, ``"*"``).
        port: the node's port (default: clusterpy-node's, 9700, or ``dispy_port + 1``).
        cpus: CPUs to use: > 0 at most that many, < 0 all but that many, 0 all.
        depends: files this node's computation needs besides the cluster's ``depends``.
        setup_args: the arguments of ``setup`` (and ``cleanup``) on this node.

    Subclass it and override :meth:`allocate` to decide per node; ``allocate`` may set
    ``self.depends`` and ``self.setup_args`` for the node it accepts, as dispy allowed.
    """

    def __init__(self, host: str, port: int | None = None, cpus: int = 0, depends: list[Any] | None = None,
                 setup_args: tuple[Any, ...] = ()) -> None:
        depends = [] if depends is None else depends
        if not isinstance(depends, list):
            raise ConfigurationError('NodeAllocate: "depends" must be a list of files')
        for dep in depends:
            if not os.path.isfile(dep):
                raise ConfigurationError(f'NodeAllocate: dependency "{dep}" is not a file')
        if not isinstance(setup_args, tuple):
            raise ConfigurationError('NodeAllocate: "setup_args" must be a tuple')
        self.ip_addr = node_ipaddr(host)
        if not self.ip_addr:
            logger.warning('host "%s" is invalid', host)
            self.ip_rex = ""
        else:
            self.ip_rex = re.escape(self.ip_addr).replace(r"\*", ".*")
        self.port = int(port) if port else None
        self.cpus = int(cpus) if cpus else 0
        self.depends = depends
        self.setup_args = setup_args

    @property
    def wildcard(self) -> bool:
        return bool(self.ip_addr) and "*" in str(self.ip_addr)

    def allocate(self, cluster: Any, ip_addr: str, name: str, cpus: int, avail_info: Any = None,
                 platform: str = "") -> int:
        """How many of the node's ``cpus`` the cluster uses (0: not this node)."""
        if not re.match(self.ip_rex, ip_addr):
            return 0
        if self.cpus > 0:
            return min(cpus, self.cpus)
        return max(0, cpus + self.cpus)

    def __repr__(self) -> str:
        return f"<NodeAllocate {self.ip_addr}:{self.port or ''} cpus={self.cpus}>"


def parse_node_allocs(nodes: Any) -> list[NodeAllocate]:
    """dispy's ``nodes`` forms (host, ``(host, port, cpus)``, dict, NodeAllocate, DispyNode) as
    NodeAllocate objects; ``"host:port"`` strings are accepted too."""
    if not nodes:
        nodes = ["*"]
    elif isinstance(nodes, (str, NodeAllocate, DispyNode)):
        nodes = [nodes]
    elif not isinstance(nodes, list):
        raise ConfigurationError(f"nodes must be a list of hosts or NodeAllocate objects, not {type(nodes).__name__}")
    allocs = []
    for node in nodes:
        if isinstance(node, NodeAllocate):
            allocs.append(node)
        elif isinstance(node, str):
            host, sep, port = node.rpartition(":")
            if sep and port.isdigit() and host and ":" not in host:
                allocs.append(NodeAllocate(host, int(port)))
            else:
                allocs.append(NodeAllocate(node))
        elif isinstance(node, dict):
            allocs.append(NodeAllocate(node.get("host", "*"), port=node.get("port"), cpus=node.get("cpus", 0),
                                       depends=node.get("depends", []), setup_args=node.get("setup_args", ())))
        elif isinstance(node, (tuple, list)):
            allocs.append(NodeAllocate(*node))
        elif isinstance(node, DispyNode):
            allocs.append(NodeAllocate(node.ip_addr, node.port or None))
        else:
            raise ConfigurationError(f"nodes: cannot use {node!r} (a host, (host, port, cpus), dict or NodeAllocate)")
    return [a for a in allocs if a.ip_addr]
