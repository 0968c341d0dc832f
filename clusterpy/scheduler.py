"""clusterpy-scheduler: many clients share one set of nodes (dispy's dispyscheduler).

To a client (``SharedJobCluster``) the scheduler looks like one large node: it speaks the same
messages (DeployComputation, SubmitJobs, JobDone, ...). Behind it, the scheduler owns the node
links and places every client's jobs with the same :class:`~clusterpy.core.scheduler.SchedulerCore`
that a ``JobCluster`` uses, with one queue per computation served round-robin (fairness)::

    client sessions --SubmitJobs--> SchedulerCore (owner = computation) --DispatchJobs-->
        deploy the computation on that node if needed (files from the scheduler's cache)
        --SubmitJobs--> node --JobDone--> SchedulerCore --DeliverResult--> the owning client

Each client's computation has its own id, files and directories on the nodes; a client sees,
cancels and recovers only its own jobs. When a client vanishes its jobs go on and their results
are kept (in memory, bounded) for ``result_lease`` seconds, for ``recover_jobs`` through the
scheduler. The scheduler never unpickles user data.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from . import __version__, tls
from .core.scheduler import (
    CancelOnNode,
    CancelRequested,
    DeliverResult,
    DispatchJobs,
    JobReported,
    JobsRecalled,
    JobsStarted,
    JobState,
    NodeJoined,
    NodeLost,
    RecallJobs,
    ResolveJob,
    SchedulerCore,
)
from .config import OptionParser, log_level, non_negative_int, positive_float, run_daemon
from .discovery import DEFAULT_RELAY_PORT, plan_nodes
from .errors import ClusterError
from .filestore import FileStore
from .identity import DEFAULT_NODE_PORT, DEFAULT_SCHEDULER_PORT, local_info
from .monitor import JobHistory, SchedulerSource, parse_monitor, report_ended, require_aiohttp, resolved_ended, start_monitor
from ._scheduler_session import ClientSession, SharedComp, SharedJob
from .nodelink import DeploymentRefused, NodeLink, sources_from_store
from .protocol import messages as m
from .transport.stream import accept

__all__ = ["SchedulerServer", "main"]

log = logging.getLogger("clusterpy.scheduler")


class SchedulerServer:
    """The shared scheduler. ``async with SchedulerServer(...)`` or start()/aclose()."""

    def __init__(
        self,
        *,
        secret: bytes,
        nodes: list[tuple[str, int]],
        host: str = "127.0.0.1",
        port: int = DEFAULT_SCHEDULER_PORT,
        dest_path: str | os.PathLike[str] | None = None,
        pulse_interval: float = 2.0,
        node_timeout: float | None = None,
        zombie_interval: float = 60.0,
        result_lease: float = 3600.0,
        max_kept_bytes: int = 256 << 20,
        client_window: int = 1024,
        prefetch: int = 1,
        allowed_failures: int = 3,
        handshake_timeout: float = 10.0,
        monitor: bool | int | str = False,
        discovery: dict[str, Any] | None = None,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        cafile: str | os.PathLike[str] | None = None,
    ) -> None:
        """``certfile``/``keyfile``/``cafile``: mutual TLS both towards clients (as a server)
        and towards the nodes (as a client, with the same certificate: keygen's node
        certificates allow both). See docs/SECURITY.md.

        Raises:
            ConfigurationError: an incomplete or unloadable TLS configuration.
        """
        tls_files = tls.resolve_files(certfile, keyfile, cafile, environ={})
        self.ssl = None if tls_files is None else tls.server_context(
            tls_files.certfile or "", tls_files.keyfile, tls_files.cafile)
        self._node_ssl = None if tls_files is None else tls.client_context(
            tls_files.cafile, tls_files.certfile, tls_files.keyfile)
        self._monitor_spec = parse_monitor(monitor)  # the web monitor (clusterpy.monitor), if any
        if self._monitor_spec is not None:
            require_aiohttp()
        self.monitor: Any = None
        self.history = JobHistory()
        self.secret = secret
        self.node_addresses = nodes
        # DiscoveryClient options (transport/udp.py) to find nodes by broadcast or relays, as a client does.
        self._discovery_options = discovery
        self.discovery: Any = None
        self.host, self.port = host, port
        self._own_dest = dest_path is None
        self.dest_path = Path(dest_path) if dest_path else Path(tempfile.mkdtemp(prefix="clusterpy-scheduler-"))
        self.pulse_interval = pulse_interval
        self.node_timeout = node_timeout if node_timeout is not None else max(5 * pulse_interval, 3.0)
        self.zombie_interval = zombie_interval
        self.result_lease = result_lease
        self.max_kept_bytes = max_kept_bytes
        self.client_window = client_window
        self.handshake_timeout = handshake_timeout
        self.scheduler_id = uuid.uuid4().hex
        self.core = SchedulerCore(prefetch=prefetch, allowed_failures=allowed_failures)
        self.store: FileStore | None = None
        self.links: list[NodeLink] = []
        self.by_node: dict[str, NodeLink] = {}
        self.comps: dict[str, SharedComp] = {}
        self.jobs: dict[str, SharedJob] = {}
        self.sessions: set[ClientSession] = set()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        self._to_send: dict[tuple[str, str], list[m.JobRequest]] = {}
        self._flush_scheduled = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._monitor_spec is not None:  # first: if it cannot bind, nothing else has started
            self.monitor = await start_monitor(SchedulerSource(self), self._monitor_spec)
        self.dest_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = FileStore(self.dest_path)
        for host, port in self.node_addresses:
            self._add_link(host, port)
        if self._discovery_options is not None:
            from .transport.udp import DiscoveryClient

            self.discovery = DiscoveryClient(self.secret, on_found=self._discovered, explicit=self.node_addresses,
                                             **self._discovery_options)
            await self.discovery.start()
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._pulse())
        log.info("clusterpy-scheduler %s listening on %s:%d for %d nodes", __version__, self.host, self.port,
                 len(self.node_addresses))

    def _add_link(self, host: str, port: int) -> NodeLink:
        link = NodeLink(self, host, port, secret=self.secret, role="scheduler", ssl=self._node_ssl,
                        reconnect_delay=min(1.0, self.pulse_interval))
        self.links.append(link)
        self._spawn(link.run())
        return link

    def _discovered(self, found: Any) -> None:
        """A node answered discovery (or announced itself): use it unless we already do."""
        if self._closed.is_set() or any((l.host, l.port) == (found.host, found.port) for l in self.links):
            return
        log.info("discovered node %s:%d (%d CPUs)", found.host, found.port, found.cpus)
        self._add_link(found.host, found.port)

    async def aclose(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.discovery is not None:
            await self.discovery.aclose()
        if self.monitor is not None:
            await self.monitor.aclose()
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            await session.conn.aclose()
        for comp in list(self.comps.values()):
            self.close_computation(comp)
        for link in self.links:
            await link.drain() if link.up else None
            link.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._own_dest:
            import shutil

            shutil.rmtree(self.dest_path, ignore_errors=True)

    async def __aenter__(self) -> "SchedulerServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        await self._closed.wait()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pulse(self) -> None:
        while True:
            await asyncio.sleep(self.pulse_interval)
            now = time.monotonic()
            for link in list(self.by_node.values()):
                if now - link.last_heard > self.node_timeout:
                    log.warning("node %s silent for %.1fs: declaring it lost", link.name, now - link.last_heard)
                    link.declare_lost(f"no pulse for {now - link.last_heard:.1f}s")
                else:
                    link.send(m.Ping(time.time()))
            for session in list(self.sessions):
                if now - session.last_heard > self.zombie_interval:
                    log.warning("client %s silent: treating it as gone", session.conn.peername)
                    session.conn.close()

    # ---------------------------------------------------------------- node links (LinkOwner)

    def link_up(self, link: NodeLink) -> None:
        assert link.node_id is not None
        if link.node_id in self.by_node:
            log.warning("node %s appears twice (same node id); ignoring %s", link.node_id[:12], link.name)
            link.stop()
            return
        self.by_node[link.node_id] = link
        log.info("node %s (%s, %d CPUs) joined", link.name, link.hostname, link.cpus)
        self.execute(self.core.handle(NodeJoined(link.node_id, link.cpus)))

    def link_down(self, link: NodeLink, reason: str) -> None:
        if link.node_id is None or self.by_node.get(link.node_id) is not link:
            return
        del self.by_node[link.node_id]
        log.warning("node %s lost: %s", link.name, reason)
        for comp in self.comps.values():
            comp.deployed.pop(link.node_id, None)
            comp.waiting.pop(link.node_id, None)
        self.execute(self.core.handle(NodeLost(link.node_id, reason)))

    def link_refused(self, link: NodeLink, exc: BaseException) -> None:
        log.error("node %s refused the scheduler: %s", link.name, exc)

    def link_message(self, link: NodeLink, msg: object) -> None:
        assert link.node_id is not None
        if isinstance(msg, m.JobDone):  # (a JobsDone's reports come one by one: NodeLink unpacks it)
            key = f"{msg.comp_id}/{msg.job_id}"
            actions = self.core.handle(JobReported(link.node_id, key, msg.attempt, worker_died=msg.status == "died"))
            if actions and isinstance(actions[0], DeliverResult):
                job = self.jobs.pop(key, None)
                if job is not None:
                    self.history.add(report_ended(key, msg, link.node_id, job.comp.comp_id), time.monotonic())
                    self._to_client(job.comp, dataclasses.replace(msg, attempt=job.request.attempt))
                actions = actions[1:]
            self.execute(actions)
        elif isinstance(msg, (m.JobProgress, m.JobFile)):
            # A running job's provisional results and files go to its client as they come,
            # under the attempt number the client knows; those of a stale attempt are dropped.
            key = f"{msg.comp_id}/{msg.job_id}"
            job = self.jobs.get(key)
            if job is not None and self.core.attempt_of(key) == msg.attempt:
                self._to_client(job.comp, dataclasses.replace(msg, attempt=job.request.attempt))
        elif isinstance(msg, m.JobsRecalled):
            recalled = tuple((f"{msg.comp_id}/{job_id}", attempt) for job_id, attempt in msg.jobs)
            self.execute(self.core.handle(JobsRecalled(link.node_id, recalled)))
        elif isinstance(msg, m.JobsStarted):
            started = tuple((f"{msg.comp_id}/{s.job_id}", s.attempt) for s in msg.jobs)
            actions = self.core.handle(JobsStarted(link.node_id, started))  # may recall jobs (stealing)
            for s in msg.jobs:
                if (held := self.jobs.get(f"{msg.comp_id}/{s.job_id}")) is not None:
                    held.started = s.start_time
            comp = self.comps.get(msg.comp_id)
            if comp is not None:
                client_view = tuple(m.JobStart(s.job_id, self.jobs[f"{msg.comp_id}/{s.job_id}"].request.attempt, s.start_time)
                                    for s in msg.jobs if f"{msg.comp_id}/{s.job_id}" in self.jobs)
                self._to_client(comp, m.JobsStarted(msg.comp_id, client_view))
            self.execute(actions)
        elif not isinstance(msg, m.Pong):
            log.debug("ignored %s from node %s", type(msg).__name__, link.name)

    # ---------------------------------------------------------------- core actions

    def execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, DispatchJobs):
                self._dispatch(action)
            elif isinstance(action, ResolveJob):
                job = self.jobs.pop(action.job_id, None)
                if job is not None:
                    status = "cancelled" if action.state is JobState.CANCELLED else "abandoned"
                    self.history.add(resolved_ended(action.job_id, job.request.job_id, status == "cancelled",
                                                    action.reason, job.comp.comp_id), time.monotonic())
                    now = time.time()
                    self._to_client(job.comp, m.JobDone(
                        job.comp.comp_id, job.request.job_id, job.request.attempt, status, None, None,
                        "NodeLostError", action.reason, None, b"", b"", now, now, 0.0, None))
            elif isinstance(action, CancelOnNode):
                link = self.by_node.get(action.node_id)
                job = self.jobs.get(action.job_id)
                if link is not None and job is not None:
                    self._flush()
                    link.send(m.CancelJob(job.comp.comp_id, job.request.job_id, action.attempt))
            elif isinstance(action, RecallJobs):
                link = self.by_node.get(action.node_id)
                if link is None:
                    continue
                self._flush()
                by_comp: dict[str, list[tuple[str, int]]] = {}
                for key, attempt in action.jobs:
                    if (held := self.jobs.get(key)) is not None:
                        by_comp.setdefault(held.comp.comp_id, []).append((held.request.job_id, attempt))
                for comp_id, jobs in by_comp.items():
                    link.send(m.RecallJobs(comp_id, tuple(jobs)))

    def _dispatch(self, action: DispatchJobs) -> None:
        link = self.by_node[action.node_id]
        for key, attempt in action.jobs:
            job = self.jobs[key]
            comp = job.comp
            request = m.JobRequest(job.request.job_id, attempt, job.request.args, job.request.timeout)
            state = comp.deployed.get(action.node_id)
            if state == "ready":
                self._to_send.setdefault((action.node_id, comp.comp_id), []).append(request)
            else:
                comp.waiting.setdefault(action.node_id, []).append(request)
                if state is None:
                    comp.deployed[action.node_id] = "deploying"
                    self._spawn(self._deploy(comp, link))
        if self._to_send and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for (node_id, comp_id), requests in self._to_send.items():
            link = self.by_node.get(node_id)
            if link is not None:
                link.send(m.SubmitJobs(comp_id, tuple(requests)))
        self._to_send.clear()

    async def _deploy(self, comp: SharedComp, link: NodeLink) -> None:
        node_id = link.node_id
        assert node_id is not None and self.store is not None
        try:
            await link.deploy(comp.deploy, sources_from_store(self.store, comp.deploy.files))
        except DeploymentRefused as exc:
            # The computation cannot run there: its held jobs fail, visibly, with the node's reason.
            held = comp.waiting.pop(node_id, [])
            comp.deployed.pop(node_id, None)
            for request in held:
                key = f"{comp.comp_id}/{request.job_id}"
                now = time.time()
                report = m.JobDone(comp.comp_id, request.job_id, request.attempt, "setup_failed", None, None,
                                   "DependencyError", str(exc), None, b"", b"", now, now, 0.0, None)
                if key in self.jobs:
                    self.link_message(link, report)
            return
        except ClusterError:
            return  # the link went down: link_down moves or abandons the held jobs
        if comp.deployed.get(node_id) == "deploying" and self.comps.get(comp.comp_id) is comp:
            comp.deployed[node_id] = "ready"
            held = comp.waiting.pop(node_id, [])
            if held:
                link.send(m.SubmitJobs(comp.comp_id, tuple(held)))

    def _to_client(self, comp: SharedComp, message: object) -> None:
        owner = comp.owner
        if owner is not None and not owner.conn.closed:
            owner.send(message)
        elif isinstance(message, m.JobDone):
            size = message.data_size
            if sum(c.kept_bytes for c in self.comps.values()) + size > self.max_kept_bytes:
                log.warning("kept-results budget full: dropping the result of job %s", message.job_id)
                message = message.dropped("scheduler")
                size = 0
            comp.kept.append(message)
            comp.kept_bytes += size

    # ---------------------------------------------------------------- computations

    def close_computation(self, comp: SharedComp) -> None:
        if self.comps.get(comp.comp_id) is not comp:
            return
        del self.comps[comp.comp_id]
        if comp.lease is not None:
            comp.lease.cancel()
        for key in self.core.jobs_of(comp.comp_id):
            self.execute(self.core.handle(CancelRequested(key)))
        for node_id in comp.deployed:
            link = self.by_node.get(node_id)
            if link is not None:
                link.send(m.CloseComputation(comp.comp_id, comp.deploy.keep_files))
        for incoming in comp.incoming.values():
            incoming.abort()
        for key in [k for k, j in self.jobs.items() if j.comp is comp]:
            del self.jobs[key]
        log.info("computation %s closed", comp.comp_id)

    def orphan(self, comp: SharedComp) -> None:
        comp.owner = None
        if not comp.ready:
            self.close_computation(comp)
            return
        loop = asyncio.get_running_loop()
        comp.lease = loop.call_later(self.result_lease, self._lease_ended, comp)

    def _lease_ended(self, comp: SharedComp) -> None:
        if comp.owner is None:
            log.info("lease of computation %s ended", comp.comp_id)
            self.close_computation(comp)

    # ---------------------------------------------------------------- clients

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Synchronous on purpose: with TLS the transport is paused before asyncio first reads
        it (see stream.accept)."""
        if self.ssl is not None:
            writer.transport.pause_reading()
        self._spawn(self._serve_client(reader, writer))

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await accept(reader, writer, secret=self.secret, role="scheduler",
                                info=local_info(node_id=self.scheduler_id, cpus=self.client_window),
                                expected_peer_roles=frozenset({"client"}), handshake_timeout=self.handshake_timeout,
                                ssl=self.ssl)
        except (ClusterError, OSError, asyncio.TimeoutError) as exc:
            log.warning("refused connection from %s: %s", writer.get_extra_info("peername"), exc)
            return
        session = ClientSession(self, conn)
        self.sessions.add(session)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)


# -------------------------------------------------------------------- command line


def _address(spec: str, default_port: int = DEFAULT_NODE_PORT) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return spec, default_port


def build_parser() -> OptionParser:
    """The clusterpy-scheduler command line; every option also from CLUSTERPY_<NAME> or --config ([scheduler])."""
    opts = OptionParser(
        "clusterpy-scheduler", "scheduler", "Share clusterpy nodes among many clients (SharedJobCluster).",
        epilog="Nodes: name them with -n HOST[:PORT] (repeat), or let the scheduler discover them by UDP\n"
               "broadcast (--discover, on by default when no node is named; -n 10.0.0.* filters what it finds).\n"
               "The secret comes from --secret-file, CLUSTERPY_SECRET, CLUSTERPY_SECRET_FILE, or the per-user file.",
    )
    opts.add("--host", default="127.0.0.1", env="CLUSTERPY_SCHEDULER_HOST", help="address to listen on for clients")
    opts.add("--port", type=non_negative_int, default=DEFAULT_SCHEDULER_PORT, env="CLUSTERPY_SCHEDULER_PORT",
             help="TCP port for clients (0 picks a free port)")
    opts.add("-n", "--nodes", many=True, metavar="HOST[:PORT]", default=[],
             help="a node to use, or a wildcard pattern filtering discovered nodes (repeat for several)")
    opts.add("--discover", flag=True, help="find nodes by UDP broadcast (default: when no node is named)")
    opts.add("--discovery-interfaces", metavar="LIST",
             help="interfaces (names, addresses, CIDR) to broadcast on (default $CLUSTERPY_DISCOVERY_INTERFACES, else all)")
    opts.add("--relay", many=True, metavar="HOST[:PORT]", default=[],
             help="a clusterpy-netrelay to ask for nodes on another network (repeat for several)")
    opts.add("--cluster-name", default="", help="discover only nodes started with this --cluster-name")
    opts.add("--secret-file", metavar="FILE", env=False, help="file holding the cluster secret")
    opts.add("--dest-path", metavar="DIR", help="directory for the clients' files (default: a temporary one)")
    opts.add("--pulse-interval", type=positive_float, default=2.0, metavar="SECONDS", help="seconds between pings to each node")
    opts.add("--node-timeout", type=positive_float, metavar="SECONDS", help="a node silent this long is lost (default 5 pulses)")
    opts.add("--zombie-interval", type=positive_float, default=60.0, metavar="SECONDS", help="a client silent this long is gone")
    opts.add("--result-lease", type=positive_float, default=3600.0, metavar="SECONDS",
             help="how long a gone client's jobs and results are kept for recover_jobs")
    opts.add("--log-level", type=log_level, default="INFO", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    opts.add("--log-file", metavar="FILE", help="append log messages to this file instead of stderr")
    opts.parser.add_argument("--monitor", nargs="?", const=True, default=False, metavar="[HOST:]PORT",
                             help="serve the web monitor (default 127.0.0.1, a free port); its URL is printed. "
                                  "Needs pip install 'clusterpy[monitor]'")
    tls.add_tls_arguments(opts)
    return opts


async def _serve(args: argparse.Namespace, secret: bytes) -> None:
    plan = plan_nodes(args.nodes, discover=args.discover, local=False, relays=bool(args.relay), wait=0)
    discovery = None if not plan.discover else dict(
        port=DEFAULT_NODE_PORT, interfaces=args.discovery_interfaces, interval=30.0,
        relays=[_address(r, DEFAULT_RELAY_PORT) for r in args.relay], patterns=plan.patterns,
        cluster_name=args.cluster_name)
    sched = SchedulerServer(secret=secret, nodes=[_address(n) for n in plan.explicit], host=args.host, port=args.port,
                            discovery=discovery,
                            dest_path=args.dest_path, pulse_interval=args.pulse_interval,
                            node_timeout=args.node_timeout, zombie_interval=args.zombie_interval,
                            result_lease=args.result_lease, monitor=args.monitor,
                            **tls.daemon_security_options(args, limits=False))
    await sched.start()
    print(f"clusterpy-scheduler listening on {sched.host}:{sched.port} id={sched.scheduler_id}", flush=True)
    if sched.monitor is not None:
        print(f"clusterpy-scheduler monitor at {sched.monitor.url}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(sched.aclose()))
    await sched.serve_forever()
    await sched.aclose()


def main(argv: list[str] | None = None) -> int:
    """The clusterpy-scheduler console script: 0 after a clean stop, 1 if it could not run,
    2 for a bad command line."""
    return run_daemon(build_parser(), argv, _serve)


if __name__ == "__main__":
    sys.exit(main())
