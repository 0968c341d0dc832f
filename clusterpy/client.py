"""JobCluster: the client. A thin asyncio shell around the scheduling core.

::

    user thread                     cluster loop thread (asyncio)
    -----------                     -----------------------------------------------
    submit(*args) --pickle args-->  _Runtime.submit -> SchedulerCore.handle(JobSubmitted)
                                        actions -> DispatchJobs -> batched SubmitJobs per node
    job() <-- concurrent Future --  _NodeLink (one authenticated Connection per node)
                                        JobDone -> SchedulerCore.handle(JobReported)
                                        DeliverResult -> unpickle, resolve the job's future
                                        callback(job) on the callback thread

The event loop runs in a background thread so that plain scripts work; asyncio programs use
the same object with ``await job`` and ``async with``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import site
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterable

import cloudpickle

from . import deps as deps_mod
from .core.scheduler import (
    CancelOnNode,
    CancelRequested,
    DeliverResult,
    DispatchJobs,
    JobReported,
    JobsStarted,
    JobState,
    JobSubmitted,
    NodeJoined,
    NodeLost,
    ResolveJob,
    SchedulerCore,
)
from .errors import (
    AuthenticationError,
    ClusterClosedError,
    ClusterError,
    ConfigurationError,
    ConnectionClosedError,
    JobCancelledError,
    NodeLostError,
    ProtocolError,
    VersionMismatchError,
)
from .filestore import validate_comp_id
from .identity import DEFAULT_NODE_PORT, local_info
from .journal import JournalWriter
from .job import ClusterJob, JobStatus, apply_report
from .protocol import codec
from .protocol import messages as m
from .secret import load_secret
from .discovery import DEFAULT_RELAY_PORT, DiscoveryKey, plan_nodes
from .transport.stream import Connection, connect

__all__ = ["JobCluster"]

log = logging.getLogger("clusterpy.client")

_PERMANENT = (AuthenticationError, VersionMismatchError)


def _parse_node(spec: str, default_port: int) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if sep and port.isdigit() and host and not host.endswith(":"):
        return host.strip("[]"), int(port)
    return spec, default_port


def _pickle_by_value_if_local(obj: Any) -> None:
    """Ship functions from the user's own modules by value, as cloudpickle does for __main__.

    A module that is not installed (not under the standard library or site-packages) exists
    only on the client, so the nodes could not import it to find the function by reference.
    """
    name = getattr(obj, "__module__", None)
    module = sys.modules.get(name) if name else None
    path = getattr(module, "__file__", None)
    if module is None or not path or name == "__main__":
        return
    path = os.path.realpath(path)
    installed = {os.path.realpath(p) for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                               sysconfig.get_paths()["platlib"], *site.getsitepackages())}
    if any(path.startswith(prefix + os.sep) for prefix in installed) or name.split(".")[0] == "clusterpy":
        return
    cloudpickle.register_pickle_by_value(module)


class _NodeLink:
    """The connection to one node: handshake, deployment of the computation, then messages."""

    def __init__(self, runtime: "_Runtime", host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self.conn: Connection | None = None
        self.node_id: str | None = None
        self.hostname = host
        self.ip_addr = host
        self.cpus = 0
        self.joined = False
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.pending_submit: list[m.JobRequest] = []
        self.error: BaseException | None = None
        self.last_heard = 0.0
        self.lost_reason: str | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def run(self) -> None:
        """Connect, deploy, serve; after a loss, reconnect (the node may come back, or be
        restarted as a new incarnation) until the cluster closes or the node refuses us."""
        rt = self.runtime
        while not rt.closing:
            conn = await self._connect()
            if conn is None:
                return
            self.conn = conn
            self.node_id = conn.peer_info.get("node_id", self.name)
            self.hostname = conn.peer_info.get("hostname", self.host)
            peer = conn.peername
            self.ip_addr = peer[0] if peer else self.host
            self.cpus = max(1, int(conn.peer_info.get("cpus", "1")))
            try:
                await self._deploy(conn)
            except ClusterError as exc:
                await conn.aclose()
                if isinstance(exc, (ConnectionClosedError, ProtocolError)):
                    await asyncio.sleep(rt.reconnect_delay)
                    continue
                self.error = exc  # the node refused the computation: retrying cannot help
                log.error("node %s: %s", self.name, exc)
                rt.link_failed(self, exc)
                return
            except OSError:
                await conn.aclose()
                await asyncio.sleep(rt.reconnect_delay)
                continue
            self.joined = True
            self.last_heard = time.monotonic()
            rt.node_joined(self)
            reason = "connection closed"
            try:
                while True:
                    payload = await conn.recv()
                    self.last_heard = time.monotonic()
                    rt.on_message(self, codec.decode(payload))
            except ConnectionClosedError:
                reason = self.lost_reason or "connection closed by the node"
            except (ProtocolError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                await conn.aclose()
                rt.link_lost(self, reason)
                self.lost_reason = None
            await asyncio.sleep(rt.reconnect_delay)

    async def _connect(self) -> Connection | None:
        rt = self.runtime
        delay = rt.reconnect_delay
        while not rt.closing:
            try:
                return await connect(
                    self.host, self.port, secret=rt.secret, role="client", info=local_info(),
                    expected_peer_roles=frozenset({"node"}), handshake_timeout=rt.connect_timeout,
                )
            except _PERMANENT as exc:
                self.error = exc
                log.error("node %s refused us and will not be retried: %s", self.name, exc)
                rt.link_failed(self, exc)
                return None
            except (ClusterError, OSError, asyncio.TimeoutError) as exc:
                self.error = exc
                log.debug("node %s not reachable yet: %s", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    def declare_lost(self, reason: str) -> None:
        """Drop the connection (the read loop then reports the node lost)."""
        if self.conn is not None and not self.conn.closed:
            self.lost_reason = reason
            self.conn.close()

    async def _deploy(self, conn: Connection) -> None:
        rt = self.runtime
        conn.send(codec.encode(rt.deploy_message))
        await conn.drain()
        needed = codec.decode(await conn.recv())
        if isinstance(needed, m.ComputationFailed):
            raise ClusterError(f"node {self.name} refused the computation: {needed.reason}")
        if not isinstance(needed, m.FilesNeeded):
            raise ProtocolError(f"expected FilesNeeded, got {type(needed).__name__}")
        by_hash = {f.sha256: f for f in rt.dependencies.files}
        for sha in needed.sha256s:
            entry = by_hash.get(sha)
            if entry is None:
                raise ProtocolError(f"node asked for a file we did not offer ({sha[:12]})")
            for chunk in deps_mod.iter_chunks(entry, rt.chunk_size):
                conn.send(codec.encode(m.FileChunk(rt.comp_id, sha, chunk, False)))
                await conn.drain()
            conn.send(codec.encode(m.FileChunk(rt.comp_id, sha, b"", True)))
            await conn.drain()
        reply = codec.decode(await conn.recv())
        if isinstance(reply, m.ComputationFailed):
            raise ClusterError(f"node {self.name} refused the computation: {reply.reason}")
        if not isinstance(reply, m.ComputationReady):
            raise ProtocolError(f"expected ComputationReady, got {type(reply).__name__}")

    def flush(self) -> None:
        if self.pending_submit and self.conn is not None and not self.conn.closed:
            self.conn.send(codec.encode(m.SubmitJobs(self.runtime.comp_id, tuple(self.pending_submit))))
        self.pending_submit.clear()

    def send(self, message: object) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.send(codec.encode(message))


class _Runtime:
    """Everything that lives in the cluster's event loop."""

    def __init__(self, cluster: "JobCluster") -> None:
        self.cluster = cluster
        self.secret = cluster._secret
        self.connect_timeout = cluster.connect_timeout
        self.pulse_interval = cluster.pulse_interval
        self.node_timeout = cluster.node_timeout
        self.reconnect_delay = min(1.0, cluster.pulse_interval)
        self.chunk_size = 1 << 20
        self.comp_id = cluster._comp_id
        self.deploy_message = cluster._deploy_message
        self.dependencies = cluster._dependencies
        self.core = SchedulerCore(prefetch=cluster.prefetch, reentrant=cluster.reentrant,
                                  allowed_failures=cluster.allowed_failures)
        self.jobs: dict[str, tuple[ClusterJob, bytes, float | None]] = {}
        self.links: list[_NodeLink] = []
        self.by_node: dict[str, _NodeLink] = {}
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._flush_scheduled = False
        self._dirty: set[_NodeLink] = set()
        self.local_node: Any = None
        self.discovery: Any = None  # transport.udp.DiscoveryClient when discovering
        self._local_start: asyncio.Future[int] | None = None
        self.journal: JournalWriter | None = cluster._journal
        self._journal_flush_scheduled = False
        self.idle = asyncio.Event()
        self.idle.set()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self, addresses: list[tuple[str, int]], local: bool) -> None:
        if local:
            addresses = [*addresses, ("127.0.0.1", await self._start_local())]
        for host, port in addresses:
            self.add_link(host, port)
        self.spawn(self._pulse())
        if self.cluster._discovery is not None:
            from .transport.udp import DiscoveryClient

            self.discovery = DiscoveryClient(self.secret, on_found=self._discovered, explicit=addresses,
                                             **self.cluster._discovery)
            await self.discovery.start()
            if self.cluster._local_fallback is not None:
                self.spawn(self._local_fallback(self.cluster._local_fallback))

    async def _start_local(self) -> int:
        from .node import NodeServer  # the embedded node; workers are real processes

        dest = tempfile.mkdtemp(prefix="clusterpy-local-")
        self.local_node = NodeServer(secret=self.secret, host="127.0.0.1", port=0,
                                     cpus=self.cluster.local_cpus, dest_path=dest, discovery=False)
        self.local_node._own_dest = dest
        await self.local_node.start()
        return int(self.local_node.port)

    async def _local_fallback(self, wait: float) -> None:
        """No node named and none discovered within ``wait`` seconds: use the embedded node."""
        await asyncio.sleep(wait)
        if self.closing or self.links:
            return
        log.info("no node discovered within %gs: starting the embedded local node", wait)
        # Not cancelled by aclose (a half-started node would leak workers): aclose awaits it.
        self._local_start = asyncio.ensure_future(self._start_local())
        port = await asyncio.shield(self._local_start)
        if not self.closing:
            self.add_link("127.0.0.1", port)

    def _discovered(self, found: Any) -> None:
        if not self.closing:
            self.add_link(found.host, found.port)

    async def _pulse(self) -> None:
        """Ping every node each pulse; a node silent past node_timeout is lost.

        A slow node still answers (its event loop never runs jobs), so only a dead, stopped
        or unreachable node misses pulses."""
        while True:
            await asyncio.sleep(self.pulse_interval)
            now = time.monotonic()
            for link in list(self.by_node.values()):
                silent = now - link.last_heard
                if silent > self.node_timeout:
                    log.warning("node %s silent for %.1fs (limit %.1fs): declaring it lost",
                                link.name, silent, self.node_timeout)
                    link.declare_lost(f"no pulse for {silent:.1f}s")
                else:
                    link.send(m.Ping(time.time()))

    def add_link(self, host: str, port: int) -> _NodeLink:
        link = _NodeLink(self, host, port)
        self.links.append(link)
        self.spawn(link.run())
        return link

    # ---------------------------------------------------------------- core plumbing

    def record(self, *fields: Any) -> None:
        """Journal one event; it reaches the file at the end of this loop turn."""
        if self.journal is None:
            return
        self.journal.append(*fields)
        if not self._journal_flush_scheduled:
            self._journal_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_journal)

    def _flush_journal(self) -> None:
        self._journal_flush_scheduled = False
        if self.journal is not None:
            self.journal.sync(1.0)

    def execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, DispatchJobs):
                link = self.by_node[action.node_id]
                for job_id, attempt in action.jobs:
                    _job, args, timeout = self.jobs[job_id]
                    link.pending_submit.append(m.JobRequest(job_id, attempt, args, timeout, self.cluster.cpus_per_job))
                    self.record("dispatch", job_id, action.node_id, attempt)
                self._dirty.add(link)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._flush)
            elif isinstance(action, ResolveJob):
                job = self.jobs[action.job_id][0]
                self.record("resolved", action.job_id, action.state.value, action.reason)
                if action.state is JobState.CANCELLED:
                    self.finish(job, JobStatus.Cancelled, exc=JobCancelledError(f"job {job.id!r} was cancelled"))
                else:
                    self.finish(job, JobStatus.Abandoned, exc=NodeLostError(f"job {job.id!r} abandoned: {action.reason}"))
            elif isinstance(action, CancelOnNode):
                link = self.by_node.get(action.node_id)
                if link is not None:
                    link.flush()
                    link.send(m.CancelJob(self.comp_id, action.job_id, action.attempt))
            elif isinstance(action, DeliverResult):
                pass  # handled by the caller, which holds the report
            else:  # pragma: no cover - a new action type must be handled here
                raise TypeError(action)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for link in self._dirty:
            link.flush()
        self._dirty.clear()

    def submit(self, job: ClusterJob, args: bytes, timeout: float | None, node: str | None) -> None:
        self.jobs[job._key] = (job, args, timeout)
        self.idle.clear()
        self.record("submit", job._key, job.id, args, timeout)
        node_id = None if node is None else (self._find_node(node) or node)
        self.execute(self.core.handle(JobSubmitted(job._key, node_id=node_id)))
        self._check_all_failed()

    def _find_node(self, node: str) -> str | None:
        for link in self.links:
            if link.joined and node in (link.node_id, link.host, link.ip_addr, link.hostname, link.name):
                return link.node_id
        return None

    def cancel(self, job: ClusterJob) -> None:
        if job._key in self.jobs:
            self.execute(self.core.handle(CancelRequested(job._key)))

    def node_joined(self, link: _NodeLink) -> None:
        assert link.node_id is not None
        if link.node_id in self.by_node:
            log.warning("node %s is already in the cluster (same node id); ignoring the second link", link.name)
            return
        self.by_node[link.node_id] = link
        self.record("node", link.node_id, link.host, link.port, link.ip_addr, link.hostname)
        log.info("node %s (%s, %d CPUs) joined", link.name, link.hostname, link.cpus)
        # A node fits cpus // cpus_per_job jobs at once (the node itself enforces the CPUs).
        self.execute(self.core.handle(NodeJoined(link.node_id, max(1, link.cpus // self.cluster.cpus_per_job))))

    def link_lost(self, link: _NodeLink, reason: str) -> None:
        if self.discovery is not None and link.node_id is not None:
            self.discovery.forget(link.node_id)  # its next answer may bring it back
        if link.node_id is not None and self.by_node.get(link.node_id) is link:
            del self.by_node[link.node_id]
            if not self.closing:
                log.warning("node %s lost: %s", link.name, reason)
            self.execute(self.core.handle(NodeLost(link.node_id, reason)))
        self._check_all_failed()

    def link_failed(self, link: _NodeLink, exc: BaseException) -> None:
        self._check_all_failed()

    def _check_all_failed(self) -> None:
        """If every node refused us for good, waiting jobs would wait forever: fail them."""
        if self.closing or self.by_node or not self.links:
            return
        if all(isinstance(link.error, _PERMANENT) for link in self.links):
            errors = "; ".join(f"{link.name}: {link.error}" for link in self.links)
            for key in list(self.jobs):
                job = self.jobs[key][0]
                self.core.handle(CancelRequested(key))
                self.finish(job, JobStatus.Abandoned, exc=ConfigurationError(f"no usable node ({errors})"))

    # ---------------------------------------------------------------- node messages

    def on_message(self, link: _NodeLink, msg: object) -> None:
        assert link.node_id is not None
        if isinstance(msg, m.JobDone):
            self._on_done(link, msg)
        elif isinstance(msg, m.JobsStarted):
            self.core.handle(JobsStarted(link.node_id, tuple((s.job_id, s.attempt) for s in msg.jobs)))
            for s in msg.jobs:
                entry = self.jobs.get(s.job_id)
                if entry is not None and entry[0].status is JobStatus.Created:
                    entry[0].status = JobStatus.Running
                    entry[0].start_time = s.start_time
                    entry[0].ip_addr = link.ip_addr
        elif isinstance(msg, m.Ping):
            link.send(m.Pong(msg.sent))
        elif isinstance(msg, m.Pong):
            pass
        else:
            raise ProtocolError(f"unexpected message from a node: {type(msg).__name__}")

    def _on_done(self, link: _NodeLink, msg: m.JobDone) -> None:
        assert link.node_id is not None
        actions = self.core.handle(JobReported(link.node_id, msg.job_id, msg.attempt,
                                               worker_died=msg.status == "died"))
        if not actions or not isinstance(actions[0], DeliverResult):
            if msg.status == "died" and msg.job_id in self.jobs:
                log.warning("job %s killed its worker on %s; trying it again", msg.job_id, link.name)
            log.debug("discarded a late report of job %s attempt %d from %s", msg.job_id, msg.attempt, link.name)
            self.execute(actions)
            return
        job = self.jobs[msg.job_id][0]
        self.record("done", msg.job_id, link.node_id, msg)
        link.jobs_done += 1
        link.cpu_time += msg.cpu_time
        status, result, exc = apply_report(job, msg, ip_addr=link.ip_addr, node_id=link.node_id,
                                           hostname=link.hostname, where=f"on node {link.name}")
        self.finish(job, status, result=result, exc=exc)
        self.execute(actions[1:])

    def finish(self, job: ClusterJob, status: JobStatus, *, result: Any = None, exc: BaseException | None = None) -> None:
        self.jobs.pop(job._key, None)
        job.status = status
        if job.end_time is None:
            job.end_time = time.time()
        job.result, job.exception = result, exc
        if not job._future.done():
            if exc is None:
                job._future.set_result(result)
            else:
                job._future.set_exception(exc)
        self.cluster._job_done(job)
        if not self.jobs:
            self.idle.set()

    # ---------------------------------------------------------------- shutdown

    async def aclose(self, terminate: bool) -> None:
        if terminate:
            for key in list(self.jobs):
                self.cancel(self.jobs[key][0])
        await self.idle.wait() if not terminate else await asyncio.wait_for(self.idle.wait(), 10)
        self.closing = True
        for link in self.links:
            if link.conn is not None and not link.conn.closed:
                link.flush()
                link.send(m.CloseComputation(self.comp_id))
                try:
                    await link.conn.drain()
                except (ClusterError, OSError):
                    pass
                await link.conn.aclose()
        if self.discovery is not None:
            await self.discovery.aclose()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._local_start is not None:
            await asyncio.gather(self._local_start, return_exceptions=True)
        if self.local_node is not None:
            await self.local_node.aclose()
            import shutil

            shutil.rmtree(self.local_node._own_dest, ignore_errors=True)


class JobCluster:
    """Run ``computation`` (a function or a program's path) on the cluster's nodes.

    Args:
        computation: a Python callable (shipped with cloudpickle) or the path of a program
            (run with each job's arguments; its exit code is the job's result).
        nodes: node addresses, ``"host"`` or ``"host:port"``, connected directly (across
            networks), and wildcard patterns (``"192.168.1.*"``, ``"10.0.*:9700"``) that select
            which discovered nodes to use. Default: discover every node (see ``discover``) and,
            if none answers within ``discovery_wait`` seconds, start an embedded local node.
        depends: files, directories, modules, packages, functions and classes the computation
            needs on the nodes.
        setup: run once in every worker before its first job (``setup(*setup_args)``); globals it
            sets are visible to the computation. ``cleanup`` runs when the cluster closes.
        callback: ``callback(job)`` is called (in a separate thread) as each job ends.
        secret: the cluster secret (else ``secret_file``, ``CLUSTERPY_SECRET``,
            ``CLUSTERPY_SECRET_FILE``, or the per-user secret file).
        local: start a private node on 127.0.0.1 with ``local_cpus`` (default all) CPUs.
        reentrant: resubmit the jobs of a lost node elsewhere (they must be idempotent).
        timeout: default per-job time limit in seconds (``submit(..., timeout=)`` overrides).
        allowed_failures: a reentrant job lost with this many nodes (or workers) is failed
            instead of being tried again.
        pulse_interval: seconds between pings to each node.
        node_timeout: a node silent this long is declared lost (default 5 pulses, at least 3 s).
        recover_file: keep a journal there, so that if this process dies,
            ``clusterpy.recover_jobs(recover_file)`` collects the jobs' results. Removed on a
            clean close.
        prefetch: jobs sent ahead per CPU to hide the network round trip.
        cpus_per_job: CPUs each job occupies on its node (a node with fewer runs it alone).
        dest_path: one directory name: the computation's files go to, and its jobs run in,
            that directory under each node's dest path, kept after the cluster closes
            (default: a private directory, removed).

        discover: find nodes by UDP broadcast (and ``relays``); nodes that announce themselves
            later join the running cluster. Default: on when ``nodes`` is empty (and
            ``local`` is not True), has a wildcard pattern, or ``relays`` are given.
        discovery_port: the nodes' UDP discovery port (default ``port``, 9700).
        discovery_interfaces: where to broadcast: interface names (wildcards allowed),
            addresses or CIDR networks, as a list or a comma-separated string; ``"none"``: no
            broadcast (relays only). Default: ``$CLUSTERPY_DISCOVERY_INTERFACES``, else every
            IPv4 interface, loopback included.
        discovery_interval: seconds between discovery requests (0: only at start).
        discovery_wait: with no ``nodes`` and ``local=None``, how long to wait for a discovered
            node before starting the embedded local node.
        relays: ``"host[:port]"`` of clusterpy-netrelay daemons (default port 9701) that
            rebroadcast this client's requests on their networks.
        cluster_name: discovery only sees nodes with the same secret *and* the same name.

    Raises:
        ConfigurationError: bad arguments, or no secret could be found.
        DependencyError: a dependency cannot be shipped.
    """

    def __init__(
        self,
        computation: Callable[..., Any] | str | os.PathLike[str],
        nodes: Iterable[str] | None = None,
        depends: Iterable[Any] = (),
        *,
        setup: Callable[..., Any] | None = None,
        setup_args: tuple[Any, ...] = (),
        cleanup: Callable[[], Any] | None = None,
        callback: Callable[[ClusterJob], Any] | None = None,
        secret: str | bytes | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        local: bool | None = None,
        local_cpus: int | None = None,
        port: int = DEFAULT_NODE_PORT,
        reentrant: bool = False,
        allowed_failures: int = 3,
        timeout: float | None = None,
        prefetch: int = 1,
        keep_files: bool = False,
        cpus_per_job: int = 1,
        dest_path: str | None = None,
        connect_timeout: float = 10.0,
        pulse_interval: float = 2.0,
        node_timeout: float | None = None,
        recover_file: str | os.PathLike[str] | None = None,
        discover: bool | None = None,
        discovery_port: int | None = None,
        discovery_interfaces: str | Iterable[str] | None = None,
        discovery_interval: float = 30.0,
        discovery_wait: float = 1.0,
        relays: str | Iterable[str] = (),
        cluster_name: str = "",
        loglevel: int | str | None = None,
    ) -> None:
        if loglevel is not None:
            logging.getLogger("clusterpy").setLevel(loglevel)
        self._secret = load_secret(secret, secret_file=secret_file)
        node_list = [nodes] if isinstance(nodes, str) else list(nodes or [])
        try:  # discovery and the embedded node (clusterpy.discovery.plan_nodes)
            plan = plan_nodes(node_list, discover=discover, local=local, relays=bool(relays), wait=discovery_wait)
            DiscoveryKey.derive(b"", cluster_name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        local, self._local_fallback = plan.local, plan.fallback
        self.addresses = [_parse_node(n, port) for n in plan.explicit]
        self._discovery = None if not plan.discover else dict(
            port=discovery_port or port, interfaces=discovery_interfaces, interval=discovery_interval,
            relays=[_parse_node(r, DEFAULT_RELAY_PORT) for r in ([relays] if isinstance(relays, str) else relays)],
            patterns=plan.patterns, cluster_name=cluster_name)
        self.callback = callback
        self.reentrant = reentrant
        self.allowed_failures = allowed_failures
        self.default_timeout = timeout
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        if pulse_interval <= 0:
            raise ConfigurationError("pulse_interval must be positive")
        self.pulse_interval = pulse_interval
        self.node_timeout = node_timeout if node_timeout is not None else max(5 * pulse_interval, 3.0)
        self.local_cpus = local_cpus
        if isinstance(cpus_per_job, bool) or not isinstance(cpus_per_job, int) or cpus_per_job < 1:
            raise ConfigurationError(f"cpus_per_job must be a positive int, not {cpus_per_job!r}")
        self.cpus_per_job = cpus_per_job
        if dest_path is not None:
            try:
                validate_comp_id(dest_path)
            except ClusterError as exc:
                raise ConfigurationError(f"dest_path must be one directory name: {exc}") from None
        self.dest_path = dest_path
        self._comp_id = f"c{uuid.uuid4().hex}"
        self._closed = False
        self._jobs_submitted = 0
        self._jobs_lock = threading.Lock()
        self._callbacks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clusterpy-callback") if callback else None
        self._dependencies, self._deploy_message = self._package(computation, depends, setup, setup_args, cleanup, keep_files)
        self._journal = None
        if recover_file is not None:
            self._journal = JournalWriter(recover_file, self._secret, comp_id=self._comp_id,
                                          computation=self.computation_name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="clusterpy-loop", daemon=True)
        self._thread.start()
        self._rt: _Runtime = self._call(self._make_runtime)
        try:
            self._await(self._rt.start(self.addresses, local))
        except BaseException:
            self._stop_loop()
            raise

    # ---------------------------------------------------------------- packaging

    def _package(self, computation: Any, depends: Iterable[Any], setup: Any, setup_args: tuple[Any, ...],
                 cleanup: Any, keep_files: bool) -> tuple[deps_mod.Dependencies, m.DeployComputation]:
        depends = list(depends)
        if callable(computation):
            # Modules in depends travel as files: the computation directory is on the worker's sys.path.
            found = deps_mod.collect(depends)
            for fn in (computation, setup, cleanup, *found.objects):
                _pickle_by_value_if_local(fn)
            bundle = cloudpickle.dumps({
                "compute": computation, "setup": setup, "cleanup": cleanup,
                "depends": list(found.objects), "setup_args": tuple(setup_args),
            })
            self.computation_name = getattr(computation, "__name__", repr(computation))
            deploy = m.DeployComputation(self._comp_id, "function", self._metas(found), bundle, None, keep_files,
                                         self.dest_path)
        elif isinstance(computation, (str, os.PathLike)):
            path = os.fspath(computation)
            if not os.path.isfile(path):
                raise ConfigurationError(f"program {path!r} does not exist or is not a file")
            found = deps_mod.collect(depends, program=path)
            self.computation_name = os.path.basename(path)
            deploy = m.DeployComputation(self._comp_id, "program", self._metas(found), None,
                                         (os.path.basename(path),), keep_files, self.dest_path)
        else:
            raise ConfigurationError(f"computation must be a callable or a program's path, not {type(computation).__name__}")
        return found, deploy

    @staticmethod
    def _metas(found: deps_mod.Dependencies) -> tuple[m.FileMeta, ...]:
        return tuple(m.FileMeta(f.name, f.sha256, f.size, f.mode) for f in found.files)

    # ---------------------------------------------------------------- loop thread

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _make_runtime(self) -> _Runtime:
        return _Runtime(self)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the loop thread and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return fut.result()

    def _await(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    # ---------------------------------------------------------------- public API

    def submit(self, *args: Any, **kwargs: Any) -> ClusterJob:
        """Submit one job with these arguments; returns at once with the job.

        ``timeout=`` here is not passed to the computation: use :meth:`submit_job` to give
        per-job options. Raises ClusterClosedError after :meth:`close`.
        """
        return self.submit_job(args, kwargs)

    def submit_node(self, node: str, *args: Any, **kwargs: Any) -> ClusterJob:
        """Submit a job to run on one node (address, host name or node id); abandoned if that node is unknown or lost."""
        return self.submit_job(args, kwargs, node=node)

    def submit_job(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
                   timeout: float | None = None, node: str | None = None, job_id: Any = None) -> ClusterJob:
        """Submit a job with explicit options: ``timeout`` (seconds), ``node``, ``job_id``."""
        if self._closed:
            raise ClusterClosedError("this cluster is closed; create a new JobCluster to submit jobs")
        kwargs = kwargs or {}
        job = ClusterJob(self, args, kwargs, time.time())
        if job_id is not None:
            job.id = job_id
        try:
            blob = cloudpickle.dumps((args, kwargs), protocol=5)
        except Exception as exc:
            raise ClusterError(f"the arguments of job {job.id!r} cannot be pickled: {exc!r}") from exc
        limit = timeout if timeout is not None else self.default_timeout
        with self._jobs_lock:
            self._jobs_submitted += 1
        self._loop.call_soon_threadsafe(self._rt.submit, job, blob, limit, node)
        return job

    async def submit_async(self, *args: Any, **kwargs: Any) -> ClusterJob:
        """asyncio flavour of :meth:`submit` (submission never blocks)."""
        return self.submit(*args, **kwargs)

    def cancel(self, job: ClusterJob) -> bool:
        """Cancel a job: dropped if queued, terminated on its node if running. False if it had ended."""
        if job.done():
            return False
        self._loop.call_soon_threadsafe(self._rt.cancel, job)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has ended; False on timeout."""
        try:
            self._await(self._rt.idle.wait(), timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def _job_done(self, job: ClusterJob) -> None:
        if self._callbacks is not None and self.callback is not None:
            self._callbacks.submit(self._safe_callback, job)

    def _safe_callback(self, job: ClusterJob) -> None:
        try:
            assert self.callback is not None
            self.callback(job)
        except Exception:
            log.exception("callback for job %r raised", job.id)

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes in the cluster now, with their statistics."""
        return self._call(lambda: [
            {"name": link.name, "ip_addr": link.ip_addr, "hostname": link.hostname, "node_id": link.node_id,
             "cpus": link.cpus, "jobs_done": link.jobs_done, "cpu_time": link.cpu_time,
             "busy": self._rt.core.inflight(link.node_id) if link.node_id in self._rt.by_node else 0,
             "connected": link.node_id in self._rt.by_node}
            for link in self._rt.links if link.joined
        ])

    def stats(self) -> dict[str, Any]:
        nodes = self.nodes()
        return {
            "computation": self.computation_name,
            "jobs_submitted": self._jobs_submitted,
            "jobs_done": sum(n["jobs_done"] for n in nodes),
            "cpu_time": sum(n["cpu_time"] for n in nodes),
            "nodes": nodes,
        }

    def print_status(self) -> None:
        """Print, per node, its CPUs, jobs done and CPU time (as dispy's print_status)."""
        s = self.stats()
        rows = [(n["hostname"], n["name"], n["cpus"], n["jobs_done"], n["cpu_time"]) for n in s["nodes"]]
        print(f"\n{'Node':<28} {'Address':<22} {'CPUs':>4} {'Jobs':>7} {'CPU sec':>9} {'Sec/Job':>8}")
        print("-" * 83)
        for host, addr, cpus, done, cpu in rows:
            per = cpu / done if done else 0.0
            print(f"{host[:28]:<28} {addr[:22]:<22} {cpus:>4} {done:>7} {cpu:>9.3f} {per:>8.3f}")
        print("-" * 83)
        print(f"Total: {s['jobs_done']} of {s['jobs_submitted']} jobs done, {s['cpu_time']:.3f} CPU seconds\n")

    def close(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Wait for the submitted jobs (or cancel them, with ``terminate``), then release the
        nodes: their workers run ``cleanup`` and the computation's files are removed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._await(self._rt.aclose(terminate), timeout)
            if self._journal is not None:
                self._journal.close(remove=True)
        finally:
            self._stop_loop()
            if self._callbacks is not None:
                self._callbacks.shutdown(wait=True)

    def __enter__(self) -> "JobCluster":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(terminate=exc_type is not None)

    async def __aenter__(self) -> "JobCluster":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await asyncio.to_thread(self.close, None, exc_type is not None)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_loop", None) is not None:
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass
