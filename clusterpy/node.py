"""clusterpy-node: the daemon that runs jobs for authenticated clients.

Data flow inside one node::

    TCP (authenticated Connection, one per client)
        -> ClientSession (node_session.py): decode message, act
            DeployComputation / FileChunk -> FileStore (content-addressed cache, per-computation dir)
            SubmitJobs -> the node-wide FIFO run queue (RunQueue, _runqueue.py; a slot per CPU)
                -> WorkerPool.try_run (persistent worker processes; no task per job: the
                   callback that reads a worker's reply frees the slot, hands the worker the
                   next queued job and queues the JobDone, all in one loop turn; WorkerPool.run
                   in a task only when the job must wait for a worker or a computation load)
                -> WorkerPool.try_queue when every slot is taken: the head of the queue is
                   written to a worker running a short job of its computation, to start the
                   moment that one ends (the worker does not wait for the node in between)
                -> JobDone to the owning client through its session's Outbox (_node_reports.py:
                   the reports of one loop turn leave together, as one JobsDone; with nothing
                   else running, at once, in the turn that read the worker's reply), or kept on
                   disk while that client is away (crash recovery, partitions)
            CancelJob / timeout -> WorkerPool.terminate

NodeServer (here) keeps the server's lifecycle, the connections, the computations' lifecycle
(leases, closing) and the status; it owns the run queue and every task. The records the parts
share (Computation, QueuedJob) are in _node_jobs.py.

The node never unpickles user data: job arguments and results are opaque bytes passed between
the client and a worker process. Every connection runs the authenticated handshake first;
nothing from a peer is decoded before its frames are verified (see clusterpy.transport.stream).
"""

from __future__ import annotations

import argparse
import asyncio
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
from ._runqueue import RunQueue
from .node_session import ClientSession, Computation
from .benchmark import run_benchmark
from .pool import WorkerPool
from .progress import DEFAULT_MAX_SEND_FILE
from .protocol import messages as m
from .protocol.framing import DEFAULT_MAX_FRAME
from .config import OptionParser, byte_size, log_level, non_negative_int, positive_float, positive_int
from .config import run_daemon
from .errors import ConfigurationError
from . import tls
from .core.admission import Admission
from .transport.stream import accept
from .transport.udp import DiscoveryResponder, add_discovery_arguments, discovery_options

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
        max_send_file: largest file a job may send back (``clusterpy.send_file``); a bigger
            one makes the call raise FileTooLargeError in the job.
        score: the node's speed score told to clients; None: run :mod:`clusterpy.benchmark`
            at start.
        slowdown, inject_faults: testing aids only (``--slowdown``, ``--inject-faults``): every
            job takes ``slowdown`` times as long (and the score is divided by it); with
            ``"corrupt-results"`` every result is altered, so that ``verify`` and voting catch it.
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
        quota: int | None = None,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        cafile: str | os.PathLike[str] | None = None,
        discovery: bool = True,
        discovery_port: int | None = None,
        advertise: str | None = None,
        announce_interval: float = 60.0,
        discovery_interfaces: str | list[str] | None = None,
        cluster_name: str = "",
        max_send_file: int = DEFAULT_MAX_SEND_FILE,
        score: float | None = None,
        slowdown: float = 1.0,
        inject_faults: str | None = None,
    ) -> None:
        """Discovery (see clusterpy.transport.udp.DiscoveryResponder): answer on UDP
        ``discovery_port`` (default: ``port``, or 9700 if ``port`` is 0) and announce on the
        interfaces ``host`` covers; ``advertise`` is the address announced instead of ours.

        Security options (docs/SECURITY.md): ``certfile``/``keyfile``/``cafile`` turn on mutual
        TLS (arguments only: the environment is read by the command line, not here);
        ``handshake_timeout`` bounds TLS plus the clusterpy handshake; at most
        ``max_pending_handshakes`` unauthenticated connections, the oldest dropped first;
        ``max_file_size`` and ``quota`` bound what clients store (None: FileStore's defaults).

        Raises:
            ConfigurationError: an incomplete or unloadable TLS configuration.
        """
        self.secret = secret
        tls_files = tls.resolve_files(certfile, keyfile, cafile, environ={})
        self.ssl = None if tls_files is None else tls.server_context(
            tls_files.certfile or "", tls_files.keyfile, tls_files.cafile)
        self._admission: Admission[asyncio.StreamWriter] = Admission(max_pending_handshakes)
        self._admitted: dict[asyncio.StreamWriter, asyncio.Task[object]] = {}
        self.discovery: DiscoveryResponder | None = None
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
        if inject_faults not in (None, "corrupt-results"):
            raise ConfigurationError(f"unknown fault to inject: {inject_faults!r} (known: corrupt-results)")
        self.slowdown = max(1.0, float(slowdown))
        self.score = score
        job_options: dict[str, object] = {"max_file": max_send_file}
        if self.slowdown > 1.0:
            job_options["slowdown"] = self.slowdown
        if inject_faults:
            job_options["fault"] = inject_faults
        self.pool = WorkerPool(self.cpus, job_options=job_options)
        self.comps: dict[str, Computation] = {}
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[ClientSession] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._closed = asyncio.Event()
        self.run_queue = run_queue = RunQueue(self, self.pool, self.cpus, spawn=self._spawn, closed=self._closed)
        # What a ClientSession asks of the run queue (NodeServices), bound here rather than
        # forwarded: a session calls enqueue for every job.
        self.enqueue, self.cancel, self.recall = run_queue.enqueue, run_queue.cancel, run_queue.recall
        self.clients_served = 0
        self.max_file_size = max_file_size  # None: the FileStore's default
        self.quota = quota  # None: the FileStore's default
        # --serve N: computations closed so far, and a callback told each time (the shell stops at N).
        self.computations_closed = 0
        self.on_computation_closed: Callable[[int], None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.dest_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(self.kept_dir, ignore_errors=True)  # a previous incarnation's: nobody can claim them
        self.kept_dir.mkdir(mode=0o700)
        limits = {"max_file_size": self.max_file_size, "quota": self.quota}
        self.store = FileStore(self.dest_path, **{k: v for k, v in limits.items() if v is not None})
        # The benchmark (~50-100 ms, in a thread) overlaps the workers' start-up.
        bench = None if self.score is not None else asyncio.ensure_future(
            asyncio.to_thread(run_benchmark, slowdown=self.slowdown))
        try:
            await self.pool.start()
        finally:
            if bench is not None:
                self.score = await bench
        if bench is not None:
            log.info("speed score %.1f (clusterpy.benchmark%s)", self.score,
                     f", --slowdown {self.slowdown:g}" if self.slowdown > 1.0 else "")
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._spawn(self._watch_zombies())
        if self._discovery_opts is not None:
            self.discovery = DiscoveryResponder(self.secret, host=self.host, tcp_port=self.port, cpus=self.cpus,
                                                node_id=self.node_id, **self._discovery_opts)
            await self.discovery.start()
        log.info(
            "clusterpy-node %s listening on %s:%d with %d CPUs (node id %s, files in %s, %s)",
            __version__, self.host, self.port, self.cpus, self.node_id[:12], self.dest_path,
            "mutual TLS" if self.ssl is not None else "no TLS",
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
        return local_info(node_id=self.node_id, cpus=self.cpus, score=self.score if self.score is not None else 1.0)

    def _spawn(self, coro: object) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- connections

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's connection callback; synchronous on purpose: it runs before asyncio first
        reads the socket, so with TLS the transport is paused in time (see stream.accept)."""
        if self._closed.is_set():
            writer.transport.abort()
            return
        if self.ssl is not None:
            writer.transport.pause_reading()
        self._admitted[writer] = self._spawn(self._serve_connection(reader, writer))
        now = time.monotonic()
        victim = self._admission.admit(writer, now)
        if victim is not None:
            old, age = victim
            old.transport.abort()  # also when its task has not started yet
            task = self._admitted.pop(old, None)
            if task is not None:
                task.cancel()
            dropped = self._admission.report_due(now)
            if dropped:
                log.warning("%d unauthenticated connections pending (the limit): dropped %d oldest, the last "
                            "from %s after %.1fs", self._admission.limit, dropped,
                            old.get_extra_info("peername"), age)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            conn = await accept(
                reader, writer,
                secret=self.secret, role="node", info=self.info(),
                expected_peer_roles=frozenset({"client", "scheduler"}),
                handshake_timeout=self.handshake_timeout, max_frame=self.max_frame, ssl=self.ssl,
            )
        except (ClusterError, OSError, asyncio.TimeoutError) as exc:
            log.warning("refused connection from %s: %s", peer, exc)
            return
        finally:
            self._admission.finished(writer)
            self._admitted.pop(writer, None)
        session = ClientSession(self, conn)
        self._sessions.add(session)
        tls_info = conn.tls
        log.info("client %s (%s) connected%s", conn.peer_info.get("hostname", "?"), peer,
                 "" if tls_info is None else f" over {tls_info['version']} as {tls_info['peer']!r}")
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

    @property
    def jobs_done(self) -> int:
        """Jobs that ran here and ended (since the start)."""
        return self.run_queue.jobs_done

    def status_reply(self, sent: float = 0.0) -> m.StatusReply:
        """The node's state now, for ``clusterpy status`` (``sent`` is echoed back)."""
        running = sum(1 for c in self.comps.values() for j in c.jobs.values() if j.started and not j.done)
        try:
            load = os.getloadavg()
        except OSError:  # not available on this platform
            load = (0.0, 0.0, 0.0)
        info = self.info()
        return m.StatusReply(
            sent, self.node_id, info["hostname"], __version__, self.cpus, running, self.run_queue.busy_cpus,
            self.run_queue.queued, self.run_queue.jobs_done, len(self._sessions), (load[0], load[1], load[2]),
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
        running = [self.run_queue.ending(j) for j in comp.jobs.values() if (j.started or j.behind) and not j.done]
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


# -------------------------------------------------------------------- command line


def build_parser() -> OptionParser:
    """The clusterpy-node command line; every option also from CLUSTERPY_<NAME> or --config."""
    opts = OptionParser(
        "clusterpy-node", "node", "Run clusterpy jobs for authenticated clients on this machine.",
        epilog="The secret comes from --secret-file, CLUSTERPY_SECRET, CLUSTERPY_SECRET_FILE, or the per-user\n"
               "file ~/.config/clusterpy/secret (created on first use), in that order.\n"
               "On SIGTERM or SIGINT the node stops: running jobs are terminated, clients' connections are\n"
               "closed (their jobs count as lost), and every worker process exits before the node does.",
    )
    opts.add("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    opts.add("--port", type=_port, default=DEFAULT_NODE_PORT, help="TCP port (0 picks a free port)")
    opts.add("--cpus", type=positive_int, metavar="N", help="jobs run at once, each in its own worker process (default: all CPUs)")
    opts.add("--dest-path", metavar="DIR",
             help=f"directory for computations' files and the file cache (default {default_dest_path()})")
    opts.add("--clean", flag=True, default=False,
             help="empty the dest path first (refused for a directory clusterpy-node did not make)")
    opts.add("--keep-files", flag=True, default=False, help="keep computations' files after their client closes")
    opts.add("--serve", type=positive_int, metavar="N",
             help="exit after serving N computations (each ends when its client closes it or its lease ends)")
    opts.add("--max-frame", type=byte_size, default=DEFAULT_MAX_FRAME, metavar="BYTES",
             help="largest message accepted from an authenticated peer: bytes, or 64M...")
    opts.add("--zombie-interval", type=positive_float, default=60.0, metavar="SECONDS",
             help="a client silent this long (no pulse) is treated as gone")
    opts.add("--result-lease", type=positive_float, default=3600.0, metavar="SECONDS",
             help="how long a gone client's jobs, results and files are kept for it to recover them (recover_jobs)")
    opts.add("--max-kept-bytes", type=byte_size, default=1 << 30, metavar="BYTES",
             help="disk budget for results kept for gone clients")
    opts.add("--max-send-file", type=byte_size, default=DEFAULT_MAX_SEND_FILE, metavar="BYTES",
             help="largest file a job may send back to its client (clusterpy.send_file)")
    opts.add("--slowdown", type=positive_float, default=1.0, metavar="FACTOR",
             help="TESTING AID: make every job take FACTOR times as long (and the speed score FACTOR times lower)")
    opts.add("--inject-faults", choices=["corrupt-results"], metavar="FAULT",
             help="TESTING AID: corrupt-results alters every job's result, to test verify= and replicas=")
    opts.add("--secret-file", metavar="FILE", env=False, help="file holding the cluster secret")
    opts.add("--log-level", type=log_level, default="INFO", metavar="LEVEL",
             help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    opts.add("--log-file", metavar="FILE", help="append log messages to this file instead of stderr")
    add_discovery_arguments(opts.parser)
    tls.add_daemon_security_arguments(opts)
    return opts


def _port(text: str | int) -> int:
    port = non_negative_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {port}")
    return port


#: Written into the dest path by the daemon: only such a directory may be wiped by --clean.
CLEAN_MARKER = ".clusterpy-node"


def _clean(dest: Path) -> None:
    """Empty ``dest`` (--clean), if it is a directory this daemon made (it has the marker file).

    Raises:
        ConfigurationError: ``dest`` holds files but no marker: it may be someone's data.
        OSError: something could not be removed.
    """
    if not dest.is_dir():
        return
    entries = [e for e in dest.iterdir() if e.name != CLEAN_MARKER]
    if entries and not (dest / CLEAN_MARKER).is_file():
        raise ConfigurationError(
            f"refusing to --clean {dest}: clusterpy-node did not make it (no {CLEAN_MARKER} file); "
            "empty it yourself or choose another --dest-path")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    log.info("--clean: emptied %s (%d entries)", dest, len(entries))


async def _serve(args: argparse.Namespace, secret: bytes) -> None:
    """Run the node until SIGTERM/SIGINT (or --serve N computations), then close it fully."""
    node = NodeServer(
        secret=secret, host=args.host, port=args.port, cpus=args.cpus,
        dest_path=args.dest_path, keep_files=args.keep_files, max_frame=args.max_frame,
        zombie_interval=args.zombie_interval, result_lease=args.result_lease, max_kept_bytes=args.max_kept_bytes,
        max_send_file=args.max_send_file, slowdown=args.slowdown, inject_faults=args.inject_faults,
        **discovery_options(args), **tls.daemon_security_options(args),
    )
    if args.clean:
        _clean(node.dest_path)
    stop = asyncio.Event()
    why: list[str] = []

    def request_stop(reason: str) -> None:
        if not why:
            why.append(reason)
            log.info("stopping: %s", reason)
        stop.set()

    if args.serve is not None:
        node.on_computation_closed = lambda n: request_stop(f"served {n} computations (--serve)") if n >= args.serve else None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, signal.Signals(sig).name)
    try:
        await node.start()
        (node.dest_path / CLEAN_MARKER).touch()
        print(f"clusterpy-node listening on {node.host}:{node.port} cpus={node.cpus} id={node.node_id}", flush=True)
        await stop.wait()
    finally:
        await node.aclose()  # terminates running jobs, closes sessions, waits for every worker
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """The clusterpy-node console script: exit status 0 after a clean stop, 1 if the node could
    not run, 2 for a bad command line (one line and the usage)."""
    return run_daemon(build_parser(), argv, _serve)


if __name__ == "__main__":
    sys.exit(main())
