"""clusterpy-node: the daemon that runs jobs for authenticated clients.

Data flow inside one node::

    TCP (authenticated Connection, one per client)
        -> _ClientSession: decode message, act
            DeployComputation / FileChunk -> FileStore (content-addressed cache, per-computation dir)
            SubmitJobs -> node-wide FIFO run queue (a slot per CPU)
                -> WorkerPool.run (persistent worker processes) -> JobDone back to that client
            CancelJob / timeout -> WorkerPool.terminate

The node never unpickles user data: job arguments and results are opaque bytes passed between
the client and a worker process. Every connection runs the authenticated handshake first;
nothing from a peer is decoded before its frames are verified (see clusterpy.transport.stream).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import ClusterError, ConnectionClosedError, DependencyError, ProtocolError
from .filestore import FileStore, validate_name
from .identity import DEFAULT_NODE_PORT, local_info
from .pool import ComputationSpec, JobOutcome, WorkerJob, WorkerPool
from .protocol import codec
from .protocol import messages as m
from .protocol.framing import DEFAULT_MAX_FRAME
from .secret import load_secret
from .transport.stream import Connection, accept

__all__ = ["NodeServer", "main"]

log = logging.getLogger("clusterpy.node")

CHUNK = 1 << 20


def default_dest_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clusterpy" / "node"


@dataclass(eq=False)
class _QueuedJob:
    session: "_ClientSession"
    comp_id: str
    request: m.JobRequest
    key: str  # unique on this node: comp_id/job_id/attempt
    cancelled: bool = False
    timed_out: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class _Computation:
    comp_id: str
    deploy: m.DeployComputation
    workdir: Path
    incoming: dict[str, object] = field(default_factory=dict)  # sha256 -> IncomingFile
    ready: bool = False
    jobs: dict[str, _QueuedJob] = field(default_factory=dict)  # key -> job


class NodeServer:
    """A node: listens, authenticates clients, runs their jobs in a worker pool.

    Use ``async with NodeServer(...) as node`` or ``await start()`` / ``await aclose()``.
    ``node.port`` is the bound port (useful with ``port=0``).
    """

    def __init__(
        self,
        *,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = DEFAULT_NODE_PORT,
        cpus: int | None = None,
        dest_path: str | os.PathLike[str] | None = None,
        keep_files: bool = False,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = 10.0,
        max_pending_handshakes: int = 64,
    ) -> None:
        self.secret = secret
        self.host = host
        self.port = port
        self.cpus = cpus or os.cpu_count() or 1
        self.dest_path = Path(dest_path) if dest_path else default_dest_path()
        self.keep_files = keep_files
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_pending_handshakes = max_pending_handshakes
        self.node_id = uuid.uuid4().hex  # a new incarnation each start
        self.store: FileStore | None = None
        self.pool = WorkerPool(self.cpus)
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[_ClientSession] = set()
        self._handshaking = 0
        self._run_queue: collections.deque[_QueuedJob] = collections.deque()
        self._slots = self.cpus
        self._tasks: set[asyncio.Task[object]] = set()
        self._closed = asyncio.Event()
        self.jobs_done = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.dest_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = FileStore(self.dest_path)
        await self.pool.start()
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info(
            "clusterpy-node %s listening on %s:%d with %d CPUs (node id %s, files in %s)",
            __version__, self.host, self.port, self.cpus, self.node_id[:12], self.dest_path,
        )

    async def aclose(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            await session.aclose("node shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.aclose()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("clusterpy-node on %s:%d stopped", self.host, self.port)

    async def __aenter__(self) -> "NodeServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        await self._closed.wait()

    def info(self) -> dict[str, str]:
        return local_info(node_id=self.node_id, cpus=self.cpus)

    def _spawn(self, coro: object) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._closed.is_set():
            writer.close()
            return
        if self._handshaking >= self.max_pending_handshakes:
            log.warning("refused %s: %d unauthenticated connections already pending", peer, self._handshaking)
            writer.close()
            return
        self._handshaking += 1
        try:
            conn = await accept(
                reader, writer,
                secret=self.secret, role="node", info=self.info(),
                expected_peer_roles=frozenset({"client", "scheduler"}),
                handshake_timeout=self.handshake_timeout, max_frame=self.max_frame,
            )
        except (ClusterError, OSError, asyncio.TimeoutError) as exc:
            log.warning("refused connection from %s: %s", peer, exc)
            return
        finally:
            self._handshaking -= 1
        session = _ClientSession(self, conn)
        self._sessions.add(session)
        log.info("client %s (%s) connected", conn.peer_info.get("hostname", "?"), peer)
        try:
            await session.serve()
        finally:
            self._sessions.discard(session)

    # ---------------------------------------------------------------- run queue

    def enqueue(self, job: _QueuedJob) -> None:
        self._run_queue.append(job)
        self._pump()

    def _pump(self) -> None:
        while self._slots > 0 and self._run_queue:
            job = self._run_queue.popleft()
            if job.cancelled:
                continue
            self._slots -= 1
            job.task = self._spawn(self._run(job))  # type: ignore[assignment]

    async def _run(self, job: _QueuedJob) -> None:
        session, req = job.session, job.request
        timer = None
        try:
            session.started(job)
            if req.timeout is not None and req.timeout > 0:
                loop = asyncio.get_running_loop()
                timer = loop.call_later(req.timeout, self._time_out, job)
            outcome = await self.pool.run(WorkerJob(job.key, job.comp_id, req.args))
        finally:
            if timer is not None:
                timer.cancel()
            self._slots += 1
            self._pump()
        self.jobs_done += 1
        await session.finished(job, outcome)

    def _time_out(self, job: _QueuedJob) -> None:
        job.timed_out = True
        self._spawn(self.pool.terminate(job.key))

    async def cancel(self, job: _QueuedJob) -> None:
        """Cancel a queued job at once, or terminate the worker running it."""
        job.cancelled = True
        if job.task is None:
            try:
                self._run_queue.remove(job)
            except ValueError:
                pass
            now = time.time()
            await job.session.finished(job, JobOutcome(
                job.key, "cancelled", None, None, None, None, None, b"", b"", now, now, 0.0, None))
        else:
            await self.pool.terminate(job.key)


class _ClientSession:
    """One authenticated client connection and the computations it deployed."""

    def __init__(self, node: NodeServer, conn: Connection) -> None:
        self.node = node
        self.conn = conn
        self.comps: dict[str, _Computation] = {}
        self._started: list[tuple[str, m.JobStart]] = []
        self._closing = False

    def send(self, message: object) -> None:
        if not self.conn.closed:
            self.conn.send(codec.encode(message))

    async def serve(self) -> None:
        try:
            while True:
                payload = await self.conn.recv()
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
        if self._closing:
            return
        self._closing = True
        log.info("session with %s ends: %s", self.conn.peername, reason)
        for comp in list(self.comps.values()):
            await self._close_computation(comp, keep_files=comp.deploy.keep_files)
        await self.conn.aclose()

    async def _handle(self, msg: object) -> None:
        if isinstance(msg, m.SubmitJobs):
            comp = self._comp(msg.comp_id)
            if comp is None or not comp.ready:
                raise ProtocolError(f"jobs for computation {msg.comp_id!r} that is not ready")
            for req in msg.jobs:
                key = f"{comp.comp_id}/{req.job_id}/{req.attempt}"
                job = _QueuedJob(self, comp.comp_id, req, key)
                comp.jobs[key] = job
                self.node.enqueue(job)
        elif isinstance(msg, m.FileChunk):
            self._on_chunk(msg)
        elif isinstance(msg, m.DeployComputation):
            self._on_deploy(msg)
        elif isinstance(msg, m.CancelJob):
            comp = self._comp(msg.comp_id)
            job = comp.jobs.get(f"{msg.comp_id}/{msg.job_id}/{msg.attempt}") if comp else None
            if job is not None:
                await self.node.cancel(job)
        elif isinstance(msg, m.CloseComputation):
            comp = self._comp(msg.comp_id)
            if comp is not None:
                await self._close_computation(comp, keep_files=msg.keep_files or comp.deploy.keep_files)
        elif isinstance(msg, m.Ping):
            self.send(m.Pong(msg.sent))
        elif isinstance(msg, m.Pong):
            pass
        else:
            raise ProtocolError(f"unexpected message from a client: {type(msg).__name__}")
        await self.conn.drain()

    def _comp(self, comp_id: str) -> _Computation | None:
        return self.comps.get(comp_id)

    # ---------------------------------------------------------------- deployment

    def _on_deploy(self, msg: m.DeployComputation) -> None:
        assert self.node.store is not None
        store = self.node.store
        if msg.comp_id in self.comps:
            raise ProtocolError(f"computation {msg.comp_id!r} deployed twice")
        try:
            if msg.kind not in ("function", "program"):
                raise DependencyError(f"unknown computation kind {msg.kind!r}")
            for f in msg.files:
                validate_name(f.name)
            workdir = store.create_computation_dir(msg.comp_id)
        except DependencyError as exc:
            log.warning("refused computation %r from %s: %s", msg.comp_id, self.conn.peername, exc)
            self.send(m.ComputationFailed(msg.comp_id, str(exc)))
            return
        comp = _Computation(msg.comp_id, msg, workdir)
        self.comps[msg.comp_id] = comp
        missing = sorted({f.sha256 for f in msg.files if not store.has(f.sha256)})
        try:
            for f in msg.files:
                if f.sha256 in missing and f.sha256 not in comp.incoming:
                    comp.incoming[f.sha256] = store.begin(f.sha256, f.size)
        except DependencyError as exc:
            self._fail(comp, str(exc))
            return
        self.send(m.FilesNeeded(msg.comp_id, tuple(missing)))
        if not missing:
            self._finish_deploy(comp)

    def _on_chunk(self, msg: m.FileChunk) -> None:
        comp = self._comp(msg.comp_id)
        if comp is None or comp.ready:
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

    def _finish_deploy(self, comp: _Computation) -> None:
        assert self.node.store is not None
        msg = comp.deploy
        try:
            for f in msg.files:
                self.node.store.place(comp.workdir, f.name, f.sha256, f.mode)
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

    def _fail(self, comp: _Computation, reason: str) -> None:
        log.warning("computation %s from %s failed: %s", comp.comp_id, self.conn.peername, reason)
        for incoming in comp.incoming.values():
            incoming.abort()  # type: ignore[attr-defined]
        comp.incoming.clear()
        self.comps.pop(comp.comp_id, None)
        if self.node.store is not None:
            self.node.store.remove_computation(comp.comp_id)
        self.send(m.ComputationFailed(comp.comp_id, reason))

    async def _close_computation(self, comp: _Computation, *, keep_files: bool) -> None:
        self.comps.pop(comp.comp_id, None)
        for job in list(comp.jobs.values()):
            await self.node.cancel(job)
        running = [j.task for j in comp.jobs.values() if j.task is not None]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for incoming in comp.incoming.values():
            incoming.abort()  # type: ignore[attr-defined]
        if comp.ready:
            await self.node.pool.remove_computation(comp.comp_id)
        if not (keep_files or self.node.keep_files) and self.node.store is not None:
            self.node.store.remove_computation(comp.comp_id)
        log.info("computation %s closed", comp.comp_id)

    # ---------------------------------------------------------------- job reports

    def started(self, job: _QueuedJob) -> None:
        if not self._started:
            asyncio.get_running_loop().call_soon(self._flush_started)
        self._started.append((job.comp_id, m.JobStart(job.request.job_id, job.request.attempt, time.time())))

    def _flush_started(self) -> None:
        by_comp: dict[str, list[m.JobStart]] = {}
        for comp_id, start in self._started:
            by_comp.setdefault(comp_id, []).append(start)
        self._started.clear()
        for comp_id, starts in by_comp.items():
            self.send(m.JobsStarted(comp_id, tuple(starts)))

    async def finished(self, job: _QueuedJob, o: JobOutcome) -> None:
        comp = self.comps.get(job.comp_id)
        if comp is not None:
            comp.jobs.pop(job.key, None)
        status = o.status
        exc_message = o.exc_message
        if job.timed_out and status == "terminated":
            exc_message = f"the job ran longer than its timeout of {job.request.timeout:g}s and was terminated"
        elif job.cancelled and status in ("terminated", "cancelled"):
            status = "cancelled"
        if self._started:
            self._flush_started()  # Running must reach the client before Done
        self.send(m.JobDone(
            job.comp_id, job.request.job_id, job.request.attempt, status, o.result, o.exception,
            o.exc_type, exc_message, o.traceback, o.stdout, o.stderr, o.start_time, o.end_time,
            o.cpu_time, o.exit_code,
        ))
        try:
            await self.conn.drain()
        except (ConnectionClosedError, OSError):
            pass


# -------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clusterpy-node",
        description="Run clusterpy jobs for authenticated clients on this machine.",
        epilog="The secret comes from --secret-file, CLUSTERPY_SECRET, CLUSTERPY_SECRET_FILE, or the "
        "per-user file ~/.config/clusterpy/secret (created on first use), in that order.",
    )
    p.add_argument("--host", default=os.environ.get("CLUSTERPY_HOST", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; use 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CLUSTERPY_PORT", DEFAULT_NODE_PORT)),
                   help=f"TCP port (default {DEFAULT_NODE_PORT}; 0 picks a free port)")
    p.add_argument("--cpus", type=int, default=None, help="worker processes, one per CPU (default: all CPUs)")
    p.add_argument("--dest-path", default=os.environ.get("CLUSTERPY_DEST_PATH"),
                   help=f"directory for computations' files and the file cache (default {default_dest_path()})")
    p.add_argument("--secret-file", default=None, help="file holding the cluster secret")
    p.add_argument("--keep-files", action="store_true", help="keep computations' files after their client closes")
    p.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                   help="largest message accepted from an authenticated peer, in bytes")
    p.add_argument("--log-level", default=os.environ.get("CLUSTERPY_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")
    return p


async def _serve(args: argparse.Namespace, secret: bytes) -> None:
    node = NodeServer(
        secret=secret, host=args.host, port=args.port, cpus=args.cpus,
        dest_path=args.dest_path, keep_files=args.keep_files, max_frame=args.max_frame,
    )
    await node.start()
    print(f"clusterpy-node listening on {node.host}:{node.port} cpus={node.cpus} id={node.node_id}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.aclose()))
    await node.serve_forever()
    await node.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cpus is not None and args.cpus < 1:
        build_parser().error("--cpus must be at least 1")
    try:
        secret = load_secret(secret_file=args.secret_file)
        asyncio.run(_serve(args, secret))
    except ClusterError as exc:
        print(f"clusterpy-node: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"clusterpy-node: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
