"""clusterpy-node: the daemon that runs jobs for authenticated clients.

Data flow inside one node::

    TCP (authenticated Connection, one per client)
        -> ClientSession (node_session.py): decode message, act
            DeployComputation / FileChunk -> FileStore (content-addressed cache, per-computation dir)
            SubmitJobs -> node-wide FIFO run queue (a slot per CPU)
                -> WorkerPool.run (persistent worker processes) -> JobDone to the owning client,
                   or kept on disk while that client is away (crash recovery, partitions)
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
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import ClusterError, ProtocolError
from .filestore import FileStore
from .identity import DEFAULT_NODE_PORT, local_info
from .node_session import ClientSession, Computation, QueuedJob, job_done_message
from .pool import JobOutcome, WorkerJob, WorkerPool
from .protocol import messages as m
from .protocol.framing import DEFAULT_MAX_FRAME
from .secret import load_secret
from .transport.stream import accept
from .transport.udp import discovery_options

__all__ = ["NodeServer", "main"]

log = logging.getLogger("clusterpy.node")


def default_dest_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clusterpy" / "node"


class NodeServer:
    """A node: listens, authenticates clients, runs their jobs in a worker pool.

    Use ``async with NodeServer(...) as node`` or ``await start()`` / ``await aclose()``.
    ``node.port`` is the bound port (useful with ``port=0``).

    Args:
        zombie_interval: a client silent this long (no pulse) is treated as gone.
        result_lease: how long a gone client's computation, its running jobs and kept results
            stay on the node for it to come back (``recover_jobs``); then they are removed.
        max_kept_bytes: disk budget for results kept for gone clients; past it a result is
            replaced by a small "dropped" report.
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
        zombie_interval: float = 60.0,
        result_lease: float = 3600.0,
        max_kept_bytes: int = 1 << 30,
        max_file_size: int | None = None,
        discovery: bool = True,
        discovery_port: int | None = None,
        advertise: str | None = None,
        announce_interval: float = 60.0,
        discovery_interfaces: str | list[str] | None = None,
        cluster_name: str = "",
    ) -> None:
        """Discovery (see clusterpy.transport.udp.DiscoveryResponder): answer on UDP
        ``discovery_port`` (default: ``port``, or 9700 if ``port`` is 0) and announce on the
        interfaces ``host`` covers; ``advertise`` is the address announced instead of ours."""
        self.secret = secret
        self.discovery = None
        self._discovery_opts = None if not discovery else dict(
            port=discovery_port or port or DEFAULT_NODE_PORT, advertise=advertise, announce_interval=announce_interval,
            interfaces=discovery_interfaces, cluster_name=cluster_name)
        self.host = host
        self.port = port
        self.cpus = cpus or os.cpu_count() or 1
        self.dest_path = Path(dest_path) if dest_path else default_dest_path()
        self.kept_dir = self.dest_path / ".kept"
        self.keep_files = keep_files
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_pending_handshakes = max_pending_handshakes
        self.zombie_interval = zombie_interval
        self.result_lease = result_lease
        self.max_kept_bytes = max_kept_bytes
        self.node_id = uuid.uuid4().hex  # a new incarnation each start
        self.started_at = time.time()
        self.store: FileStore | None = None
        self.pool = WorkerPool(self.cpus)
        self.comps: dict[str, Computation] = {}
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[ClientSession] = set()
        self._handshaking = 0
        self._run_queue: collections.deque[QueuedJob] = collections.deque()
        self._slots = self.cpus
        self._tasks: set[asyncio.Task[object]] = set()
        self._closed = asyncio.Event()
        self.jobs_done = 0
        self.clients_served = 0
        self.max_file_size = max_file_size  # None: the FileStore's default
        # --serve N: computations closed so far, and a callback told each time (the shell stops at N).
        self.computations_closed = 0
        self.on_computation_closed: Callable[[int], None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.dest_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(self.kept_dir, ignore_errors=True)  # a previous incarnation's: nobody can claim them
        self.kept_dir.mkdir(mode=0o700)
        self.store = FileStore(self.dest_path, **({} if self.max_file_size is None else {"max_file_size": self.max_file_size}))
        await self.pool.start()
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._spawn(self._watch_zombies())
        if self._discovery_opts is not None:
            from .transport.udp import DiscoveryResponder

            self.discovery = DiscoveryResponder(self.secret, host=self.host, tcp_port=self.port, cpus=self.cpus,
                                                node_id=self.node_id, **self._discovery_opts)
            await self.discovery.start()
        log.info(
            "clusterpy-node %s listening on %s:%d with %d CPUs (node id %s, files in %s)",
            __version__, self.host, self.port, self.cpus, self.node_id[:12], self.dest_path,
        )

    async def aclose(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.discovery is not None:
            await self.discovery.aclose()
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            await session.aclose("node shutting down")
        for comp in list(self.comps.values()):
            await self.close_computation(comp, keep_files=comp.deploy.keep_files)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.aclose()
        if self._server is not None:
            await self._server.wait_closed()
        shutil.rmtree(self.kept_dir, ignore_errors=True)
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
        session = ClientSession(self, conn)
        self._sessions.add(session)
        log.info("client %s (%s) connected", conn.peer_info.get("hostname", "?"), peer)
        try:
            await session.serve()
        finally:
            self._sessions.discard(session)
            self.clients_served += 1

    def handle_other(self, session: ClientSession, msg: object) -> None:
        """Messages that are about the node rather than a computation."""
        if isinstance(msg, m.StatusRequest):
            session.send(self.status_reply(msg.sent))
            return
        raise ProtocolError(f"unexpected message from a client: {type(msg).__name__}")

    def status_reply(self, sent: float = 0.0) -> m.StatusReply:
        """The node's state now, for ``clusterpy status`` (``sent`` is echoed back)."""
        running = sum(1 for c in self.comps.values() for j in c.jobs.values() if j.task is not None and not j.task.done())
        try:
            load = os.getloadavg()
        except OSError:  # not available on this platform
            load = (0.0, 0.0, 0.0)
        info = self.info()
        return m.StatusReply(
            sent, self.node_id, info["hostname"], __version__, self.cpus, running, self.cpus - self._slots,
            len(self._run_queue), self.jobs_done, len(self._sessions), (load[0], load[1], load[2]),
            time.time() - self.started_at,
        )

    async def _watch_zombies(self) -> None:
        """A client that stops pulsing is gone, even if its TCP connection looks open."""
        period = max(0.05, min(self.zombie_interval / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in list(self._sessions):
                if now - session.last_heard > self.zombie_interval:
                    log.warning("client %s silent for %.1fs: treating it as gone", session.conn.peername,
                                now - session.last_heard)
                    session.conn.close()

    # ---------------------------------------------------------------- computations

    def orphan(self, comp: Computation) -> None:
        """Its client is gone: jobs go on, results are kept until the lease ends."""
        if comp.owner is None:
            return
        comp.owner = None
        if not comp.ready:
            self._spawn(self.close_computation(comp, keep_files=False))
            return
        log.info("computation %s has no client: keeping it %.0fs for its return", comp.comp_id, self.result_lease)
        loop = asyncio.get_running_loop()
        comp.lease = loop.call_later(self.result_lease, self._lease_ended, comp)

    def _lease_ended(self, comp: Computation) -> None:
        if comp.owner is None and self.comps.get(comp.comp_id) is comp:
            log.info("lease of computation %s ended: removing its jobs, results and files", comp.comp_id)
            self._spawn(self.close_computation(comp, keep_files=comp.deploy.keep_files))

    async def close_computation(self, comp: Computation, *, keep_files: bool) -> None:
        if self.comps.get(comp.comp_id) is not comp:
            return
        del self.comps[comp.comp_id]
        if comp.lease is not None:
            comp.lease.cancel()
        if comp.owner is not None:
            comp.owner.comps.pop(comp.comp_id, None)
            comp.owner = None
        for job in list(comp.jobs.values()):
            await self.cancel(job)
        running = [j.task for j in comp.jobs.values() if j.task is not None]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for incoming in comp.incoming.values():
            incoming.abort()  # type: ignore[attr-defined]
        comp.drop_kept()
        if comp.ready:
            await self.pool.remove_computation(comp.comp_id)
        # A directory the client named (dest_path) is kept: it holds what the jobs wrote there.
        if not (keep_files or self.keep_files or comp.deploy.dest_path) and self.store is not None:
            self.store.remove_computation(comp.comp_id)
        log.info("computation %s closed", comp.comp_id)
        self.computations_closed += 1
        if self.on_computation_closed is not None:
            self.on_computation_closed(self.computations_closed)

    # ---------------------------------------------------------------- run queue

    def enqueue(self, job: QueuedJob) -> None:
        self._run_queue.append(job)
        self._pump()

    def _cpus_of(self, job: QueuedJob) -> int:
        """CPU slots a job occupies: what it asked for, at most the whole node (then it runs alone)."""
        return min(max(1, job.request.cpus), self.cpus)

    def _pump(self) -> None:
        # Strict FIFO: a job that needs more free CPUs than there are waits at the head, so
        # a stream of 1-CPU jobs cannot starve it.
        while self._run_queue:
            job = self._run_queue[0]
            if job.cancelled:
                self._run_queue.popleft()
                continue
            if self._cpus_of(job) > self._slots:
                break
            self._run_queue.popleft()
            self._slots -= self._cpus_of(job)
            job.task = self._spawn(self._run(job))  # type: ignore[assignment]

    async def _run(self, job: QueuedJob) -> None:
        req = job.request
        timer = None
        try:
            if job.comp.owner is not None:
                job.comp.owner.started(job)
            if req.timeout is not None and req.timeout > 0:
                timer = asyncio.get_running_loop().call_later(req.timeout, self._time_out, job)
            outcome = await self.pool.run(WorkerJob(job.key, job.comp.comp_id, req.args))
        finally:
            if timer is not None:
                timer.cancel()
            self._slots += self._cpus_of(job)
            self._pump()
        self.jobs_done += 1
        await self._report(job, outcome)

    def _time_out(self, job: QueuedJob) -> None:
        job.timed_out = True
        self._spawn(self.pool.terminate(job.key))

    async def cancel(self, job: QueuedJob) -> None:
        """Cancel a queued job at once, or terminate the worker running it."""
        job.cancelled = True
        if job.task is None:
            try:
                self._run_queue.remove(job)
            except ValueError:
                pass
            now = time.time()
            await self._report(job, JobOutcome(
                job.key, "cancelled", None, None, None, None, None, b"", b"", now, now, 0.0, None))
        else:
            await self.pool.terminate(job.key)

    async def _report(self, job: QueuedJob, outcome: JobOutcome) -> None:
        comp = job.comp
        comp.jobs.pop(job.key, None)
        if self.comps.get(comp.comp_id) is not comp:
            return  # the computation was closed: nobody wants this result
        message = job_done_message(job, outcome)
        owner = comp.owner
        if owner is not None and not owner.conn.closed:
            owner.deliver(message)
            try:
                await owner.conn.drain()
            except (ClusterError, OSError):
                pass
            return
        used = sum(c.kept_bytes for c in self.comps.values())
        if used + len(message.result or b"") + len(message.stdout) + len(message.stderr) > self.max_kept_bytes:
            log.warning("kept-results budget (%d bytes) full: dropping the result of job %s", self.max_kept_bytes, job.key)
            message = m.JobDone(comp.comp_id, message.job_id, message.attempt, "exception", None, None,
                                "ResultDropped", "the node's budget for kept results was full; the result was dropped",
                                None, b"", b"", message.start_time, message.end_time, message.cpu_time, message.exit_code)
        comp.keep(message)


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
    p.add_argument("--zombie-interval", type=float, default=60.0,
                   help="seconds without a pulse after which a client is treated as gone (default 60)")
    p.add_argument("--result-lease", type=float, default=3600.0,
                   help="seconds a gone client's jobs, results and files are kept for it to recover "
                   "them with recover_jobs (default 3600)")
    p.add_argument("--max-kept-bytes", type=int, default=1 << 30,
                   help="disk budget for results kept for gone clients (default 1 GiB)")
    p.add_argument("--log-level", default=os.environ.get("CLUSTERPY_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")
    from .transport.udp import add_discovery_arguments

    add_discovery_arguments(p)
    return p


async def _serve(args: argparse.Namespace, secret: bytes) -> None:
    node = NodeServer(
        secret=secret, host=args.host, port=args.port, cpus=args.cpus,
        dest_path=args.dest_path, keep_files=args.keep_files, max_frame=args.max_frame,
        zombie_interval=args.zombie_interval, result_lease=args.result_lease, max_kept_bytes=args.max_kept_bytes,
        **discovery_options(args),
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
