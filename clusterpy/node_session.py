"""A node's client sessions and the computations they own.

A computation belongs to the node, not to a connection: when its client vanishes (the
connection breaks, or the client stops pulsing for ``zombie_interval``), its jobs keep
running and their results are kept on disk for ``result_lease`` seconds. A client that comes
back (a reconnect after a partition, or ``recover_jobs`` in a new process) re-attaches with
the computation id and receives the kept results; the lease ending removes everything.

Nothing here unpickles user data: results are kept and sent as the opaque bytes the worker made.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from .errors import ConnectionClosedError, DependencyError, ProtocolError
from .filestore import FileStore, validate_name
from .pool import ComputationSpec, JobOutcome, WorkerPool
from .protocol import codec
from .protocol import messages as m
from .transport.stream import Connection



class NodeServices(Protocol):
    """What a session needs from its node (implemented by clusterpy.node.NodeServer)."""

    comps: dict[str, "Computation"]
    store: FileStore | None
    pool: WorkerPool
    kept_dir: Path
    max_kept_bytes: int

    def enqueue(self, job: "QueuedJob") -> None: ...
    async def cancel(self, job: "QueuedJob") -> None: ...
    def recall(self, job: "QueuedJob") -> bool: ...
    async def close_computation(self, comp: "Computation", *, keep_files: bool) -> None: ...
    def orphan(self, comp: "Computation") -> None: ...
    def handle_other(self, session: "ClientSession", msg: object) -> None: ...

__all__ = ["QueuedJob", "Computation", "ClientSession", "keep_report"]

log = logging.getLogger("clusterpy.node")

_LEN = struct.Struct(">I")


def job_key(comp_id: str, job_id: str, attempt: int) -> str:
    """A job's key on this node: one attempt of one job of one computation."""
    return f"{comp_id}/{job_id}/{attempt}"


#: Seconds a job runs before the node reports it started (JobsStarted); shorter jobs are
#: reported by their JobDone alone.
START_REPORT_DELAY = 0.002
# A job this close to the delay counts as due (the timer's clock is not time.time()).
_START_SLACK = 0.0001

# Job reports are held until the connection next writes, and go out as one JobsDone per
# computation (see ClientSession.deliver). A report whose data (result and output, counting
# _REPORT_COST for the rest) is _HOLD_MAX bytes or more is not held: it goes at once, alone,
# its large blobs out of band. Held reports leave early once they count _BATCH_BYTES: at most
# 64 of them, their data (all in band) at most ~128 KB.
_HOLD_MAX = 64 * 1024
_BATCH_BYTES = 64 * 1024
_REPORT_COST = 1024


@dataclass(eq=False, slots=True)
class QueuedJob:
    """A job on this node: queued, then ``started`` (given CPU slots), then ``done`` (its
    slots are free again; its report is sent or kept). Slots: 100,000 of them may be queued."""

    comp: "Computation"
    request: m.JobRequest
    key: str  # unique on this node: comp_id/job_id/attempt
    cancelled: bool = False
    timed_out: bool = False
    started: bool = False
    behind: bool = False  # written to a busy worker, to start when its job ends (WorkerPool.try_queue)
    done: bool = False
    cpus: int = 0  # the CPU slots it takes (set when it is queued), held while it runs
    # Only for a job that had to wait for a worker (WorkerPool.run): most run without a task.
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None  # its timeout
    ended: asyncio.Future[None] | None = None  # made only when someone waits for its end


@dataclass(eq=False)
class Computation:
    comp_id: str
    deploy: m.DeployComputation
    workdir: Path
    kept_path: Path
    owner: "ClientSession | None" = None
    incoming: dict[str, object] = field(default_factory=dict)  # sha256 -> IncomingFile
    ready: bool = False
    jobs: dict[str, QueuedJob] = field(default_factory=dict)  # key -> job
    kept: int = 0
    kept_bytes: int = 0
    lease: asyncio.TimerHandle | None = None
    # Scatter (AddFiles): files being added in order, jobs held until they are in place,
    # and transfers that failed whose remaining chunks are ignored.
    adds: list["PendingAdd"] = field(default_factory=list)
    held: list[QueuedJob] = field(default_factory=list)
    discarding: set[str] = field(default_factory=set)

    def keep(self, message: m.JobDone) -> int:
        """Append a result for a client that is away; returns the bytes used."""
        data = codec.encode(message)
        fd = os.open(self.kept_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, _LEN.pack(len(data)) + data)
        finally:
            os.close(fd)
        self.kept += 1
        self.kept_bytes += len(data) + _LEN.size
        return len(data) + _LEN.size

    def take_kept(self) -> Iterator[object]:
        """Yield the kept results in order and forget them."""
        if not self.kept:
            return
        try:
            data = self.kept_path.read_bytes()
        except FileNotFoundError:
            data = b""
        self.drop_kept()
        offset = 0
        while offset + _LEN.size <= len(data):
            (size,) = _LEN.unpack_from(data, offset)
            offset += _LEN.size
            yield codec.decode(data[offset:offset + size])
            offset += size

    def drop_kept(self) -> None:
        self.kept = 0
        self.kept_bytes = 0
        try:
            self.kept_path.unlink()
        except FileNotFoundError:
            pass


class ClientSession:
    """One authenticated client connection and the computations it owns."""

    def __init__(self, node: NodeServices, conn: Connection) -> None:
        self.node = node
        self.conn = conn
        self.comps: dict[str, Computation] = {}
        self.last_heard = time.monotonic()
        self._started: dict[str, tuple[QueuedJob, float]] = {}  # job key -> (job, its start) not yet reported
        self._start_timer: asyncio.TimerHandle | None = None
        self._closing = False
        # Reports held for the next write (comp_id -> reports, in the order they came) and
        # what they count against _BATCH_BYTES; see deliver().
        self._reports: dict[str, list[m.JobDone]] = {}
        self._report_bytes = 0

    def send(self, message: object) -> None:
        if self._reports:
            self._send_reports()  # messages leave in the order they were made
        if not self.conn.closed:
            self.conn.send(codec.encode_parts(message))

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
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
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
        missing = sorted({f.sha256 for f in msg.files if not store.has(f.sha256)})
        sizes = {f.sha256: f.size for f in msg.files}
        try:
            for sha in missing:
                comp.incoming[sha] = store.begin(sha, sizes[sha])
        except DependencyError as exc:
            self._fail(comp, str(exc))
            return
        self.send(m.FilesNeeded(msg.comp_id, tuple(missing)))
        if not missing:
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

    # ---------------------------------------------------------------- job reports

    def started(self, job: QueuedJob) -> None:
        """Report the job as running, START_REPORT_DELAY seconds from now if it is still
        running then: a short job's JobDone says it all (and the client shows it Running
        first), which saves a message each way and a wake-up of the client mid-job."""
        if self.conn.closed:
            return  # the client is away: it learns of the job from its result
        self._started[job.key] = (job, time.time())
        if self._start_timer is None:
            self._start_timer = asyncio.get_running_loop().call_later(START_REPORT_DELAY, self._report_started)

    def _report_started(self) -> None:
        self._start_timer = None
        if not self._started or self.conn.closed:
            return
        # With short jobs, the job the timer was set for has ended and the oldest one running
        # now is younger than the delay: wait for that one, without waking the connection's
        # flush for nothing (this timer ticks every START_REPORT_DELAY while jobs stream by).
        _, began = next(iter(self._started.values()))
        wait = began + START_REPORT_DELAY - time.time()
        if wait > _START_SLACK:
            self._start_timer = asyncio.get_running_loop().call_later(wait, self._report_started)
            return
        self.conn.before_flush(self._flush_started)  # with whatever else goes out this turn

    def _flush_started(self, everything: bool = False) -> None:
        """Report the jobs that have run START_REPORT_DELAY seconds (``everything``: all the
        jobs running), oldest first; the timer is armed again for the rest. Jobs that ended
        already were taken out by deliver(): their JobDone went out first."""
        now = time.time()
        # Entries are in start order.
        cutoff = now if everything else now - START_REPORT_DELAY + _START_SLACK
        due: list[str] = []
        by_comp: dict[str, list[m.JobStart]] = {}
        for key, (job, began) in self._started.items():
            if began > cutoff:
                if self._start_timer is None and not self.conn.closed:
                    self._start_timer = asyncio.get_running_loop().call_later(
                        began + START_REPORT_DELAY - now, self._report_started)
                break
            due.append(key)
            by_comp.setdefault(job.comp.comp_id, []).append(m.JobStart(job.request.job_id, job.request.attempt, began))
        for key in due:
            del self._started[key]
        for comp_id, starts in by_comp.items():
            self.send(m.JobsStarted(comp_id, tuple(starts)))

    def deliver(self, message: m.JobDone | m.JobProgress | m.JobFile, key: str | None = None) -> None:
        """Send a job's message; ``key`` is its job's key, if the caller has it at hand.

        A JobDone with little data is held until the connection next writes (the end of this
        loop turn, or of the read being handled), so that the reports of jobs that end
        meanwhile travel as one JobsDone: one frame to seal, open and decode. Anything else
        this session sends first sends the held reports, so messages keep their order. A held
        report the connection no longer takes when it is sent is kept on disk, as for a client
        that is away (:func:`keep_report`).

        The caller checks ``conn.closed`` first (a result for a client that is away is kept
        instead), so this sends without checking again.

        Raises:
            ConnectionClosedError: the connection is closed or broken.
        """
        if key is None:
            key = job_key(message.comp_id, message.job_id, message.attempt)
        if type(message) is m.JobDone:
            # Its end carries its start time. With no job left to report, the timer goes too:
            # it would only wake the loop for nothing.
            if self._started.pop(key, None) is not None and not self._started and self._start_timer is not None:
                self._start_timer.cancel()
                self._start_timer = None
            # Inline, not JobDone.data_size: this runs for every job. A view or a tuple is a
            # large result (or one with out-of-band buffers): not held.
            result = message.result
            size = len(message.stdout) + len(message.stderr) + _REPORT_COST
            if result is not None:
                size += len(result) if type(result) is bytes else _HOLD_MAX
            if size < _HOLD_MAX:
                held = self._reports
                reports = held.get(message.comp_id)
                if reports is None:
                    if not held:
                        self.conn.before_flush(self._send_reports)  # raises if the connection is closed
                    reports = held[message.comp_id] = []
                reports.append(message)
                self._report_bytes += size
                if self._report_bytes >= _BATCH_BYTES:
                    self._send_reports()
                return
        elif key in self._started:
            self._flush_started(everything=True)  # Running reaches the client before the job's first message
        if self._reports:
            self._send_reports()
        self.conn.send(codec.encode_parts(message))

    def _send_reports(self) -> None:
        """Send the held reports: per computation, one JobsDone (a JobDone if it is one
        report). Runs as the connection's before_flush hook, and before anything else this
        session sends. Never raises (it runs inside the connection's flush): reports the
        connection no longer takes are kept for the client's return."""
        held = self._reports
        if not held:
            return  # sent already, before another message
        self._reports, self._report_bytes = {}, 0
        for comp_id, reports in held.items():
            self._send_held(reports[0] if len(reports) == 1 else m.JobsDone(comp_id, tuple(reports)), reports)

    def _send_held(self, message: m.JobDone | m.JobsDone, reports: list[m.JobDone]) -> None:
        try:
            self.conn.send(codec.encode_parts(message))
        except ConnectionClosedError:
            for report in reports:
                keep_report(self.node, self, report)
        except ValueError as exc:  # over the frame cap
            if len(reports) == 1:  # lost, as it was unbatched (deliver raised ValueError)
                log.error("the result of job %s/%s cannot be sent: %s", reports[0].comp_id, reports[0].job_id, exc)
                return
            for report in reports:  # together only: one by one
                self._send_held(report, [report])


@dataclass(eq=False)
class PendingAdd:
    """One AddFiles being received; ``error`` once it failed (reported in FilesAdded)."""

    msg: m.AddFiles
    error: str | None = None


def keep_report(node: NodeServices, session: ClientSession | None, message: m.JobDone) -> None:
    """Keep a job's report on disk for its client's return (``session``: the one whose
    connection would not take it), within the node's budget for kept results, as for a client
    that is away; sent instead if its computation has a live session of its own by now; dropped
    if the computation is gone (nobody wants it)."""
    comp = node.comps.get(message.comp_id)
    if comp is None:
        return
    owner = comp.owner
    if owner is not None and owner is not session and not owner.conn.closed:
        try:
            owner.deliver(message)
            return
        except (ConnectionClosedError, OSError):
            pass
    if sum(c.kept_bytes for c in node.comps.values()) + message.data_size > node.max_kept_bytes:
        log.warning("kept-results budget (%d bytes) full: dropping the result of job %s/%s", node.max_kept_bytes,
                    message.comp_id, message.job_id)
        message = m.JobDone(message.comp_id, message.job_id, message.attempt, "exception", None, None,
                            "ResultDropped", "the node's budget for kept results was full; the result was dropped",
                            None, b"", b"", message.start_time, message.end_time, message.cpu_time, message.exit_code)
    comp.keep(message)


def job_done_message(job: QueuedJob, o: JobOutcome) -> m.JobDone:
    """The report of one job's end, with the node's view of why it was stopped."""
    status, exc_message = o.status, o.exc_message
    if job.timed_out and status == "terminated":
        exc_message = f"the job ran longer than its timeout of {job.request.timeout:g}s and was terminated"
    elif job.cancelled and status in ("terminated", "cancelled"):
        status = "cancelled"
    return m.JobDone(
        job.comp.comp_id, job.request.job_id, job.request.attempt, status, o.result, o.exception,
        o.exc_type, exc_message, o.traceback, o.stdout, o.stderr, o.start_time, o.end_time,
        o.cpu_time, o.exit_code,
    )
