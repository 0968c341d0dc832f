"""A node's client sessions and the computations they own.

A computation belongs to the node, not to a connection: when its client vanishes (the
connection breaks, or the client stops pulsing for ``zombie_interval``), its jobs keep
running and their results are kept on disk for ``result_lease`` seconds. A client that comes
back (a reconnect after a partition, or ``recover_jobs`` in a new process) re-attaches with
the computation id and receives the kept results; the lease ending removes everything.

::

    Connection (one client) -> ClientSession: decode, act
        SubmitJobs -> QueuedJob (_node_jobs.py) -> node.enqueue (the run queue, _runqueue.py)
        CancelJob, RecallJobs, CloseComputation -> node.cancel, node.recall, node.close_computation
        DeployComputation, FileChunk, AddFiles -> FileStore; Computation (_node_jobs.py) in node.comps
        Attach/DetachComputation, Ping -> here; anything else (StatusRequest) -> node.handle_other
    ClientSession.send / started / deliver = its Outbox's (_node_reports.py): job reports
        batched, starts reported late, everything in order -> Connection

Nothing here unpickles user data: results are kept and sent as the opaque bytes the worker made.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Protocol

from ._node_jobs import Computation, PendingAdd, QueuedJob, job_key
from ._node_reports import START_REPORT_DELAY, KeptResults, Outbox, keep_report
from .errors import ConnectionClosedError, DependencyError, ProtocolError
from .filestore import FileStore, validate_name
from .pool import ComputationSpec, WorkerPool
from .protocol import codec
from .protocol import messages as m
from .transport.stream import Connection


class NodeServices(KeptResults, Protocol):
    """What a session needs from its node (implemented by clusterpy.node.NodeServer); its
    outbox also keeps reports there (KeptResults: ``comps``, ``max_kept_bytes``)."""

    store: FileStore | None
    pool: WorkerPool
    kept_dir: Path

    def enqueue(self, job: QueuedJob) -> None: ...
    async def cancel(self, job: QueuedJob) -> None: ...
    def recall(self, job: QueuedJob) -> bool: ...
    async def close_computation(self, comp: Computation, *, keep_files: bool) -> None: ...
    def orphan(self, comp: Computation) -> None: ...
    def handle_other(self, session: "ClientSession", msg: object) -> None: ...


# QueuedJob, Computation (_node_jobs.py), keep_report and START_REPORT_DELAY (_node_reports.py)
# are re-exported: this module is the public face of the node's session side.
__all__ = ["QueuedJob", "Computation", "ClientSession", "keep_report", "START_REPORT_DELAY"]

log = logging.getLogger("clusterpy.node")


class ClientSession:
    """One authenticated client connection and the computations it owns."""

    def __init__(self, node: NodeServices, conn: Connection) -> None:
        self.node = node
        self.conn = conn
        self.comps: dict[str, Computation] = {}
        self.last_heard = time.monotonic()
        self._closing = False
        self.outbox = outbox = Outbox(node, self, conn)
        # What leaves the session goes through its outbox (see _node_reports.Outbox). Bound
        # here, not forwarded: the run queue calls started and deliver for every job.
        self.send = outbox.send
        self.started = outbox.started
        self.deliver = outbox.deliver

    async def serve(self) -> None:
        try:
            # Most messages are handled as they are read (no task wake-up per message); those
            # whose handling awaits, and any that arrive meanwhile, come through recv().
            self.conn.deliver_eagerly(self._handle_now)
            while True:
                payload = await self.conn.recv()
                self.last_heard = time.monotonic()
                message = codec.decode(payload)
                await self._handle(message)
        except ConnectionClosedError:
            reason = "client disconnected"
        except ProtocolError as exc:
            log.warning("closing connection from %s: %s", self.conn.peername, exc)
            reason = f"protocol error: {exc}"
        except OSError as exc:
            reason = f"connection error: {exc}"
        await self.aclose(reason)

    async def aclose(self, reason: str) -> None:
        """End the session; computations it still owns are kept for their client's return."""
        if self._closing:
            return
        self._closing = True
        self.outbox.close()
        log.info("session with %s ends: %s", self.conn.peername, reason)
        for comp in list(self.comps.values()):
            self.node.orphan(comp)
        self.comps.clear()
        await self.conn.aclose()

    def _handle_now(self, payload: bytes | bytearray) -> bool:
        """Handle a message in the read callback if that needs no await (False: leave it to
        serve(); also while the client reads our replies slower than we send them, so that
        serve() waits for the connection to drain before reading on)."""
        if not self.conn.writable:
            return False
        message = codec.decode(payload)
        if type(message) is m.SubmitJobs:  # nearly every message: no dispatch chain for it
            self.last_heard = time.monotonic()
            self._submit(message)
            return True
        if isinstance(message, (m.CancelJob, m.CloseComputation)):
            return False
        self.last_heard = time.monotonic()
        self._handle_sync(message)
        return True

    async def _handle(self, msg: object) -> None:
        if isinstance(msg, m.CancelJob):
            comp = self.comps.get(msg.comp_id)
            job = comp.jobs.get(job_key(msg.comp_id, msg.job_id, msg.attempt)) if comp else None
            if job is not None:
                await self.node.cancel(job)
        elif isinstance(msg, m.CloseComputation):
            comp = self.comps.pop(msg.comp_id, None)
            if comp is not None:
                await self.node.close_computation(comp, keep_files=msg.keep_files or comp.deploy.keep_files)
        else:
            self._handle_sync(msg)
        await self.conn.drain()

    def _submit(self, msg: m.SubmitJobs) -> None:
        """Queue the jobs of a SubmitJobs (a duplicate of a job already here is ignored).

        Raises:
            ProtocolError: the computation is not (yet) ready on this node.
        """
        comp = self.comps.get(msg.comp_id)
        if comp is None or not comp.ready:
            raise ProtocolError(f"jobs for computation {msg.comp_id!r} that is not ready")
        jobs, enqueue = comp.jobs, self.node.enqueue
        for req in msg.jobs:
            key = job_key(msg.comp_id, req.job_id, req.attempt)
            if key in jobs:
                continue  # a duplicate dispatch of the same attempt: run it once
            job = jobs[key] = QueuedJob(comp, req, key)
            if comp.adds:  # submitted after an AddFiles: runs once those files are in place
                comp.held.append(job)
            else:
                enqueue(job)

    def _handle_sync(self, msg: object) -> None:
        if isinstance(msg, m.SubmitJobs):
            self._submit(msg)
        elif isinstance(msg, m.Ping):
            self.send(m.Pong(msg.sent))
        elif isinstance(msg, m.Pong):
            pass
        elif isinstance(msg, m.FileChunk):
            self._on_chunk(msg)
        elif isinstance(msg, m.AddFiles):
            self._on_add_files(msg)
        elif isinstance(msg, m.DeployComputation):
            self._on_deploy(msg)
        elif isinstance(msg, m.AttachComputation):
            self._on_attach(msg.comp_id)
        elif isinstance(msg, m.DetachComputation):
            comp = self.comps.pop(msg.comp_id, None)
            if comp is not None:
                self.node.orphan(comp)
            self.send(m.Detached(msg.comp_id))
        elif isinstance(msg, m.RecallJobs):
            comp = self.comps.get(msg.comp_id)
            given_back = tuple((job_id, attempt) for job_id, attempt in msg.jobs
                               if comp is not None and (job := comp.jobs.get(job_key(msg.comp_id, job_id, attempt)))
                               is not None and self.node.recall(job))
            if given_back:
                self.send(m.JobsRecalled(msg.comp_id, given_back))
        else:
            self.node.handle_other(self, msg)

    # ---------------------------------------------------------------- deployment

    def _on_deploy(self, msg: m.DeployComputation) -> None:
        existing = self.node.comps.get(msg.comp_id)
        if existing is not None and existing.ready:
            # The same client again (it reconnected): take the computation over.
            self.send(m.FilesNeeded(msg.comp_id, ()))
            self._attach(existing)
            self.send(m.ComputationReady(msg.comp_id))
            self._send_kept(existing)
            return
        if existing is not None:
            raise ProtocolError(f"computation {msg.comp_id!r} is already being deployed")
        store = self.node.store
        assert store is not None
        try:
            if msg.kind not in ("function", "program"):
                raise DependencyError(f"unknown computation kind {msg.kind!r}")
            for f in msg.files:
                validate_name(f.name)
            if msg.dest_path is not None and any(c.workdir.name == msg.dest_path for c in self.node.comps.values()):
                raise DependencyError(f"dest path {msg.dest_path!r} is in use by another computation on this node")
            workdir = store.create_computation_dir(msg.dest_path or msg.comp_id)
        except DependencyError as exc:
            log.warning("refused computation %r from %s: %s", msg.comp_id, self.conn.peername, exc)
            self.send(m.ComputationFailed(msg.comp_id, str(exc)))
            return
        comp = Computation(msg.comp_id, msg, workdir, self.node.kept_dir / msg.comp_id)
        self.node.comps[msg.comp_id] = comp
        self._attach(comp)
        try:
            comp.incoming.update(store.begin_missing(msg.files))
        except DependencyError as exc:
            self._fail(comp, str(exc))
            return
        self.send(m.FilesNeeded(msg.comp_id, tuple(comp.incoming)))
        if not comp.incoming:
            self._finish_deploy(comp)

    def _on_attach(self, comp_id: str) -> None:
        comp = self.node.comps.get(comp_id)
        if comp is None or not comp.ready:
            self.send(m.ComputationFailed(comp_id, "this node does not have that computation "
                                          "(it was restarted, or the result lease ended)"))
            return
        self._attach(comp)
        pending = tuple((j.request.job_id, j.request.attempt) for j in comp.jobs.values() if not j.cancelled)
        self.send(m.Attached(comp_id, pending, comp.kept))
        self._send_kept(comp)

    def _attach(self, comp: Computation) -> None:
        if comp.owner is not None and comp.owner is not self:
            comp.owner.comps.pop(comp.comp_id, None)
            log.info("computation %s moves to a new connection from %s", comp.comp_id, self.conn.peername)
        if comp.lease is not None:
            comp.lease.cancel()
            comp.lease = None
        comp.owner = self
        self.comps[comp.comp_id] = comp

    def _send_kept(self, comp: Computation) -> None:
        count = 0
        for message in comp.take_kept():
            self.send(message)
            count += 1
        if count:
            log.info("delivered %d kept results of computation %s", count, comp.comp_id)

    def _on_chunk(self, msg: m.FileChunk) -> None:
        comp = self.comps.get(msg.comp_id)
        if comp is not None and comp.ready:
            self._on_added_chunk(comp, msg)
            return
        if comp is None:
            raise ProtocolError(f"file data for computation {msg.comp_id!r} that is not being deployed")
        incoming = comp.incoming.get(msg.sha256)
        if incoming is None:
            raise ProtocolError(f"file data for {msg.sha256[:12]} that was not asked for")
        try:
            incoming.write(msg.data)  # type: ignore[attr-defined]
            if msg.last:
                incoming.finish()  # type: ignore[attr-defined]
                del comp.incoming[msg.sha256]
                if not comp.incoming:
                    self._finish_deploy(comp)
        except DependencyError as exc:
            self._fail(comp, str(exc))

    def _finish_deploy(self, comp: Computation) -> None:
        store = self.node.store
        assert store is not None
        msg = comp.deploy
        try:
            for f in msg.files:
                store.place(comp.workdir, f.name, f.sha256, f.mode)
            program = None
            if msg.kind == "program":
                if not msg.program:
                    raise DependencyError("a program computation needs a program")
                program = [str(comp.workdir / validate_name(msg.program[0])), *msg.program[1:]]
                if program[0].endswith(".py"):
                    program.insert(0, sys.executable)
            spec = ComputationSpec(msg.comp_id, msg.kind, str(comp.workdir), msg.bundle, program)
        except DependencyError as exc:
            self._fail(comp, str(exc))
            return
        self.node.pool.add_computation(spec)
        comp.ready = True
        log.info("computation %s ready (%d files)", comp.comp_id, len(msg.files))
        self.send(m.ComputationReady(comp.comp_id))

    # ---------------------------------------------------------------- files added later (scatter)

    def _on_add_files(self, msg: m.AddFiles) -> None:
        comp = self.comps.get(msg.comp_id)
        if comp is None or not comp.ready:
            raise ProtocolError(f"files added to computation {msg.comp_id!r} that is not ready")
        store = self.node.store
        assert store is not None
        add = PendingAdd(msg)
        missing: list[str] = []
        try:
            for f in msg.files:
                validate_name(f.name)
            for f in msg.files:
                if f.sha256 not in comp.incoming and f.sha256 not in missing and not store.has(f.sha256):
                    comp.incoming[f.sha256] = store.begin(f.sha256, f.size)
                    missing.append(f.sha256)
        except DependencyError as exc:
            for sha in missing:
                comp.incoming.pop(sha).abort()  # type: ignore[attr-defined]
            missing.clear()
            add.error = str(exc)
        comp.adds.append(add)
        self.send(m.FilesNeeded(msg.comp_id, tuple(missing)))
        self._place_added(comp)

    def _on_added_chunk(self, comp: Computation, msg: m.FileChunk) -> None:
        if msg.sha256 in comp.discarding:  # the rest of a transfer that failed
            if msg.last:
                comp.discarding.discard(msg.sha256)
            return
        incoming = comp.incoming.get(msg.sha256)
        if incoming is None:
            raise ProtocolError(f"file data for {msg.sha256[:12]} that was not asked for")
        try:
            incoming.write(msg.data)  # type: ignore[attr-defined]
            if msg.last:
                incoming.finish()  # type: ignore[attr-defined]
                del comp.incoming[msg.sha256]
        except DependencyError as exc:
            incoming.abort()  # type: ignore[attr-defined]
            del comp.incoming[msg.sha256]
            if not msg.last:
                comp.discarding.add(msg.sha256)
            for add in comp.adds:
                if add.error is None and any(f.sha256 == msg.sha256 for f in add.msg.files):
                    add.error = str(exc)
        self._place_added(comp)

    def _place_added(self, comp: Computation) -> None:
        """Place the files of every leading AddFiles whose transfers ended; once none is
        pending, start the jobs held behind them (in the order they came)."""
        store = self.node.store
        assert store is not None
        while comp.adds:
            add = comp.adds[0]
            if add.error is None and any(f.sha256 in comp.incoming for f in add.msg.files):
                return
            comp.adds.pop(0)
            if add.error is None:
                try:
                    for f in add.msg.files:
                        store.place(comp.workdir, f.name, f.sha256, f.mode)
                except DependencyError as exc:
                    add.error = str(exc)
            if add.error is not None:
                log.warning("computation %s: files not added: %s", comp.comp_id, add.error)
            self.send(m.FilesAdded(comp.comp_id, tuple(f.sha256 for f in add.msg.files), add.error))
        held, comp.held = comp.held, []
        for job in held:
            if not job.cancelled:
                self.node.enqueue(job)

    def _fail(self, comp: Computation, reason: str) -> None:
        log.warning("computation %s from %s failed: %s", comp.comp_id, self.conn.peername, reason)
        for incoming in comp.incoming.values():
            incoming.abort()  # type: ignore[attr-defined]
        comp.incoming.clear()
        self.comps.pop(comp.comp_id, None)
        self.node.comps.pop(comp.comp_id, None)
        if self.node.store is not None:
            self.node.store.remove_computation(comp.comp_id)
        self.send(m.ComputationFailed(comp.comp_id, reason))
