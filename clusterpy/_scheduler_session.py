"""The scheduler's side of one client connection (``SharedJobCluster``), and the records of
the computations and jobs the scheduler holds for its clients.

A :class:`ClientSession` reads a client's messages (deploy, files, jobs, cancel, detach and
attach) and hands the scheduling to its :class:`~clusterpy.scheduler.SchedulerServer`, which
owns the nodes and the shared :class:`~clusterpy.core.scheduler.SchedulerCore`. Results travel
back through the server (``SchedulerServer._to_client``), which keeps them while a computation
has no client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .core.scheduler import Action, CancelRequested, JobSubmitted, SchedulerCore
from .errors import ConnectionClosedError, DependencyError, ProtocolError
from .filestore import FileStore, validate_name
from .protocol import codec
from .protocol import messages as m
from .transport.stream import Connection

__all__ = ["ClientSession", "SharedComp", "SharedJob", "Server"]

log = logging.getLogger("clusterpy.scheduler")


@dataclass(eq=False)
class SharedComp:
    comp_id: str
    deploy: m.DeployComputation
    owner: "ClientSession | None" = None
    ready: bool = False
    incoming: dict[str, Any] = field(default_factory=dict)
    deployed: dict[str, str] = field(default_factory=dict)  # node_id -> "deploying" | "ready"
    waiting: dict[str, list[m.JobRequest]] = field(default_factory=dict)  # node_id -> jobs held for deployment
    kept: list[object] = field(default_factory=list)  # reports for an absent client
    kept_bytes: int = 0
    lease: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class SharedJob:
    comp: SharedComp
    request: m.JobRequest  # as the client sent it (its attempt number)
    started: float | None = None  # when its node started it (for the monitor)


class Server(Protocol):
    """What a session asks of its scheduler (clusterpy.scheduler.SchedulerServer, which
    creates the sessions: named here as a protocol so that imports run one way)."""

    core: SchedulerCore
    store: FileStore | None
    comps: dict[str, SharedComp]
    jobs: dict[str, SharedJob]

    def execute(self, actions: list[Action]) -> None: ...
    def close_computation(self, comp: SharedComp) -> None: ...
    def orphan(self, comp: SharedComp) -> None: ...


class ClientSession:
    def __init__(self, sched: Server, conn: Connection) -> None:
        self.sched = sched
        self.conn = conn
        self.comps: dict[str, SharedComp] = {}
        self.last_heard = time.monotonic()

    def send(self, message: object) -> None:
        if not self.conn.closed:
            self.conn.send(codec.encode_parts(message))

    def _handle_now(self, payload: bytes | bytearray) -> bool:
        if not self.conn.writable:
            return False  # serve() drains first
        self.last_heard = time.monotonic()
        self._handle(codec.decode(payload))
        return True

    async def serve(self) -> None:
        reason = "client disconnected"
        try:
            # Handled as they are read while replies flow; through recv() (and drain()) when not.
            self.conn.deliver_eagerly(self._handle_now)
            while True:
                payload = await self.conn.recv()
                self.last_heard = time.monotonic()
                self._handle(codec.decode(payload))
                await self.conn.drain()
        except ConnectionClosedError:
            pass
        except (ProtocolError, OSError) as exc:
            reason = str(exc)
            log.warning("closing connection from %s: %s", self.conn.peername, exc)
        log.info("client %s gone: %s", self.conn.peername, reason)
        for comp in list(self.comps.values()):
            if comp.owner is self:
                self.sched.orphan(comp)
        await self.conn.aclose()

    def _handle(self, msg: object) -> None:
        sched = self.sched
        if isinstance(msg, m.SubmitJobs):
            comp = self.comps.get(msg.comp_id)
            if comp is None or not comp.ready:
                raise ProtocolError(f"jobs for computation {msg.comp_id!r} that is not ready")
            for request in msg.jobs:
                key = f"{comp.comp_id}/{request.job_id}"
                if key in sched.jobs:
                    continue
                sched.jobs[key] = SharedJob(comp, request)
                sched.execute(sched.core.handle(JobSubmitted(key, reentrant=comp.deploy.reentrant, owner=comp.comp_id)))
        elif isinstance(msg, m.Ping):
            self.send(m.Pong(msg.sent))
        elif isinstance(msg, m.DeployComputation):
            self._on_deploy(msg)
        elif isinstance(msg, m.FileChunk):
            self._on_chunk(msg)
        elif isinstance(msg, m.CancelJob):
            if msg.comp_id in self.comps:
                sched.execute(sched.core.handle(CancelRequested(f"{msg.comp_id}/{msg.job_id}")))
        elif isinstance(msg, m.CloseComputation):
            comp = self.comps.pop(msg.comp_id, None)
            if comp is not None:
                sched.close_computation(comp)
        elif isinstance(msg, m.DetachComputation):
            comp = self.comps.pop(msg.comp_id, None)
            if comp is not None and comp.owner is self:
                sched.orphan(comp)
            self.send(m.Detached(msg.comp_id))
        elif isinstance(msg, m.AttachComputation):
            comp = sched.comps.get(msg.comp_id)
            if comp is None or not comp.ready:
                self.send(m.ComputationFailed(msg.comp_id, "the scheduler does not have that computation"))
                return
            self._attach(comp)
            pending = tuple((j.request.job_id, j.request.attempt) for j in sched.jobs.values() if j.comp is comp)
            self.send(m.Attached(comp.comp_id, pending, len(comp.kept)))
            self._send_kept(comp)
        elif not isinstance(msg, m.Pong):
            raise ProtocolError(f"unexpected message from a client: {type(msg).__name__}")

    def _attach(self, comp: SharedComp) -> None:
        if comp.lease is not None:
            comp.lease.cancel()
            comp.lease = None
        if comp.owner is not None and comp.owner is not self:
            comp.owner.comps.pop(comp.comp_id, None)
        comp.owner = self
        self.comps[comp.comp_id] = comp

    def _send_kept(self, comp: SharedComp) -> None:
        kept, comp.kept, comp.kept_bytes = comp.kept, [], 0
        for message in kept:
            self.send(message)

    def _on_deploy(self, msg: m.DeployComputation) -> None:
        sched = self.sched
        assert sched.store is not None
        existing = sched.comps.get(msg.comp_id)
        if existing is not None and existing.ready:
            self.send(m.FilesNeeded(msg.comp_id, ()))
            self._attach(existing)
            self.send(m.ComputationReady(msg.comp_id))
            self._send_kept(existing)
            return
        if existing is not None:
            raise ProtocolError(f"computation {msg.comp_id!r} is already being deployed")
        try:
            for f in msg.files:
                validate_name(f.name)
            comp = SharedComp(msg.comp_id, msg, incoming=sched.store.begin_missing(msg.files))
        except DependencyError as exc:
            log.warning("refused computation %r: %s", msg.comp_id, exc)
            self.send(m.ComputationFailed(msg.comp_id, str(exc)))
            return
        sched.comps[msg.comp_id] = comp
        self._attach(comp)
        self.send(m.FilesNeeded(msg.comp_id, tuple(comp.incoming)))
        if not comp.incoming:
            self._ready(comp)

    def _on_chunk(self, msg: m.FileChunk) -> None:
        comp = self.comps.get(msg.comp_id)
        incoming = comp.incoming.get(msg.sha256) if comp is not None else None
        if comp is None or incoming is None:
            raise ProtocolError(f"unexpected file data for computation {msg.comp_id!r}")
        try:
            incoming.write(msg.data)
            if msg.last:
                incoming.finish()
                del comp.incoming[msg.sha256]
                if not comp.incoming:
                    self._ready(comp)
        except DependencyError as exc:
            for other in comp.incoming.values():
                other.abort()
            self.comps.pop(comp.comp_id, None)
            self.sched.comps.pop(comp.comp_id, None)
            self.send(m.ComputationFailed(comp.comp_id, str(exc)))

    def _ready(self, comp: SharedComp) -> None:
        comp.ready = True
        log.info("computation %s from %s ready", comp.comp_id, self.conn.peername)
        self.send(m.ComputationReady(comp.comp_id))
