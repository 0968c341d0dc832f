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
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

from . import _tracebacks
from . import deps as deps_mod
from . import tls
from .core.scheduler import (
    CancelOnNode,
    CancelRequested,
    DeliverResult,
    DispatchJobs,
    JobReported,
    JobsStarted,
    JobState,
    JobSubmitted,
    NodeDistrusted,
    NodeJoined,
    NodeLost,
    NodeResized,
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
from .dataflow import Dependents, find_upstream
from .journal import JournalWriter
from .monitor import ClusterSource, JobHistory, job_ended, parse_monitor, require_aiohttp, start_monitor
from .job import ClusterJob, JobStatus, apply_report
from ._midjob import MidJob
from .progress import DROPPED
from .protocol import codec
from .stats import ClusterStats, StatsRecorder
from .protocol import messages as m
from .scatter import ScatterState
from .secret import load_secret
from .discovery import DEFAULT_RELAY_PORT, DiscoveryKey, plan_nodes
from .transport.stream import Connection, connect

__all__ = ["JobCluster"]

log = logging.getLogger("clusterpy.client")

_PERMANENT = (AuthenticationError, VersionMismatchError)


def _score(text: str | None) -> float:
    """A node's speed score from its handshake info (1.0 if it sent none or nonsense)."""
    try:
        value = float(text) if text is not None else 1.0
    except ValueError:
        return 1.0
    return value if 0.0 < value < float("inf") else 1.0


def _trust_options(verify: Any, replicas: int, fraction: float, max_reruns: int, distrust_after: int,
                   rerun_untrusted: bool) -> dict[str, Any] | None:
    """JobCluster's trust arguments, checked; None when neither verify nor replicas is asked for."""
    if verify is not None and not callable(verify):
        raise ConfigurationError(f"verify must be callable, not {type(verify).__name__}")
    for name, value, low in (("replicas", replicas, 1), ("max_reruns", max_reruns, 0), ("distrust_after", distrust_after, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an int of at least {low}, not {value!r}")
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"replicate_fraction must be between 0 and 1, not {fraction!r}")
    if verify is None and (replicas == 1 or fraction == 0):
        return None  # plain jobs: no trust layer at all
    return dict(verify=verify, replicas=replicas, replicate_fraction=float(fraction), max_reruns=max_reruns,
                distrust_after=distrust_after, rerun_untrusted=bool(rerun_untrusted))


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
        self.score = 1.0  # the node's benchmark score (clusterpy.benchmark), from its handshake
        self.pending_submit: list[m.JobRequest] = []
        self.error: BaseException | None = None
        self.last_heard = 0.0
        self.lost_reason: str | None = None
        self.stopped = False  # stop(): the cluster no longer uses this node
        # This node's own computation and files (JobCluster._accept_node may set them; dispy's
        # NodeAllocate gives nodes their own setup_args and depends); None: the cluster's.
        self.deployment: tuple[m.DeployComputation, deps_mod.Dependencies] | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def run(self) -> None:
        """Connect, deploy, serve; after a loss, reconnect (the node may come back, or be
        restarted as a new incarnation) until the cluster closes or the node refuses us."""
        rt = self.runtime
        while not rt.closing and not self.stopped:
            conn = await self._connect()
            if conn is None:
                return
            self.conn = conn
            self.node_id = conn.peer_info.get("node_id", self.name)
            self.hostname = conn.peer_info.get("hostname", self.host)
            peer = conn.peername
            self.ip_addr = peer[0] if peer else self.host
            self.cpus = max(1, int(conn.peer_info.get("cpus", "1")))
            self.score = _score(conn.peer_info.get("score"))
            if not rt.cluster._accept_node(self):  # the cluster does not use this node (NodeAllocate)
                await conn.aclose()
                rt.drop_link(self)
                return
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
                    message = codec.decode(payload)
                    try:
                        rt.on_message(self, message)
                    except Exception:  # a bug of ours must be loud, but must not stall the cluster
                        log.exception("error handling %s from node %s", type(message).__name__, self.name)
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
        while not rt.closing and not self.stopped:
            try:
                return await connect(
                    self.host, self.port, secret=rt.secret, role="client", info=local_info(),
                    expected_peer_roles=rt.cluster._peer_roles, handshake_timeout=rt.connect_timeout,
                    ssl=rt.tls_for(self.host, self.port),
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

    def stop(self, reason: str) -> None:
        """Stop using this node: close the computation there (its jobs end on the node), drop
        the connection (the core moves or abandons the jobs it held), and never reconnect."""
        self.stopped = True
        self.pending_submit.clear()  # not sent: the core moves or abandons them with the node
        self.send(m.CloseComputation(self.runtime.comp_id))
        self.declare_lost(reason)

    def declare_lost(self, reason: str) -> None:
        """Drop the connection (the read loop then reports the node lost)."""
        if self.conn is not None and not self.conn.closed:
            self.lost_reason = reason
            self.conn.close()

    async def _deploy(self, conn: Connection) -> None:
        rt = self.runtime
        deploy, dependencies = self.deployment or (rt.deploy_message, rt.dependencies)
        conn.send(codec.encode(deploy))
        await conn.drain()
        needed = codec.decode(await conn.recv())
        if isinstance(needed, m.ComputationFailed):
            raise ClusterError(f"node {self.name} refused the computation: {needed.reason}")
        if not isinstance(needed, m.FilesNeeded):
            raise ProtocolError(f"expected FilesNeeded, got {type(needed).__name__}")
        by_hash = {f.sha256: f for f in dependencies.files}
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
        # Statistics, provisional results and files, and trust (verify=, replicas=): stats.py,
        # _midjob.py, _trust_shell.py.
        self.stats = StatsRecorder()
        self.midjob = MidJob(self, cluster.files_dir, cluster.max_file_size)
        self.trust = cluster._make_trust(self)
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
        self.dependents = Dependents(self)  # jobs waiting for upstream results (clusterpy.dataflow)
        self.scatter = ScatterState(self)  # scattered objects and their transfers (clusterpy.scatter)
        self.history = JobHistory()  # counts, throughput and latest failures, for the monitor
        self.monitor: Any = None  # clusterpy.monitor.MonitorServer when monitor= is given

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
        # A link reconnects by itself (a restarted node answers again with a new incarnation).
        if not self.closing and not any((k.host, k.port) == (found.host, found.port) for k in self.links):
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

    def tls_for(self, host: str, port: int) -> Any:
        """The client's TLS context for a node; None (plain TCP) for the embedded local node,
        which has no certificate and is reachable only on this machine's loopback."""
        local = self.local_node
        if local is not None and host == "127.0.0.1" and port == local.port:
            return None
        return self.cluster._ssl

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
                    self.stats.dispatched(action.node_id, _job._key, len(args))
                    link.pending_submit.append(m.JobRequest(job_id, attempt, args, timeout, self.cluster.cpus_per_job))
                    self.record("dispatch", job_id, action.node_id, attempt)
                self._dirty.add(link)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._flush)
            elif isinstance(action, ResolveJob):
                entry = self.jobs.get(action.job_id)
                if entry is None:  # already resolved (a replica the trust layer settled, a cancel)
                    log.debug("job %s ended twice (%s); the first end stands", action.job_id, action.state.value)
                    continue
                job = entry[0]
                self.record("resolved", action.job_id, action.state.value, action.reason)
                self.midjob.ended(action.job_id)
                exc: BaseException
                if action.state is JobState.CANCELLED:
                    status, exc = JobStatus.Cancelled, JobCancelledError(f"job {job.id!r} was cancelled")
                else:
                    status, exc = JobStatus.Abandoned, self.cluster._lost_error(f"job {job.id!r} abandoned: {action.reason}")
                if self.trust is not None and self.trust.manages(job):
                    self.trust.on_resolved(action, status, exc)  # one replica of it: the trust core decides
                else:
                    self.finish(job, status, exc=exc)
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
        self.stats.submitted(job._key, job.id, job.submit_time, len(args))
        if self.trust is not None and node is None:  # verify / replicas (a pinned job is not re-run elsewhere)
            self.trust.submit(job, args, timeout)
            self._check_all_failed()
            return
        node_id = None if node is None else (self._find_node(node) or node)
        self.execute(self.core.handle(JobSubmitted(job._key, node_id=node_id)))
        self._check_all_failed()

    def _find_node(self, node: str) -> str | None:
        for link in self.links:
            if link.joined and node in (link.node_id, link.host, link.ip_addr, link.hostname, link.name):
                return link.node_id
        return None

    def cancel(self, job: ClusterJob) -> None:
        if self.dependents.cancel(job):
            return
        if self.trust is not None and job._key in self.trust.tasks:
            self.trust.cancel(job)
            return
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
        self.scatter.on_join(link)  # scattered objects reach the node before its first job
        # A node fits cpus // cpus_per_job jobs at once (the node itself enforces the CPUs).
        self.execute(self.core.handle(NodeJoined(link.node_id, max(1, link.cpus // self.cluster.cpus_per_job),
                                                 speed=link.score)))
        if self.trust is not None and self.trust.core.distrusted(link.node_id):
            # It came back (same node id): still untrusted. Trust-managed jobs exclude it anyway.
            self.execute(self.core.handle(NodeDistrusted(link.node_id, "it returned wrong results before")))
        self.cluster._node_changed(link, True)

    def link_lost(self, link: _NodeLink, reason: str) -> None:
        self.scatter.link_lost(link)
        if link.node_id is not None and self.by_node.get(link.node_id) is link:
            del self.by_node[link.node_id]
            if not self.closing:
                log.warning("node %s lost: %s", link.name, reason)
            self.execute(self.core.handle(NodeLost(link.node_id, reason)))
            self.cluster._node_changed(link, False)
        self._check_all_failed()

    def link_failed(self, link: _NodeLink, exc: BaseException) -> None:
        self._check_all_failed()

    def drop_link(self, link: _NodeLink) -> None:
        """Forget a link the cluster refused (``JobCluster._accept_node``): discovery or
        ``add_link`` may bring the node back later."""
        if link in self.links:
            self.links.remove(link)
        self._check_all_failed()

    def resize_node(self, node_id: str, cpus: int) -> bool:
        """Run at most ``cpus`` jobs at once on the node from now on (0: none); jobs already
        sent run to their end. False if the node is not in the cluster."""
        link = self.by_node.get(node_id)
        if link is None:
            return False
        link.cpus = max(0, cpus)
        self.execute(self.core.handle(NodeResized(node_id, max(0, cpus) // self.cluster.cpus_per_job)))
        return True

    def jobs_on(self, node_id: str) -> list[ClusterJob]:
        """The unfinished jobs sent to the node (running, or about to), in submission order."""
        found = []
        for key, (job, _args, _timeout) in self.jobs.items():
            try:
                if self.core.node_of(key) == node_id:
                    found.append(job)
            except KeyError:  # held by the trust layer or dataflow, not by the core
                continue
        return found

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
                    future = entry[0]._future
                    if not future.done() and not future.running():
                        future.set_running_or_notify_cancel()  # Future.cancel() now returns False
                    self.cluster._job_started(entry[0], link)
        elif isinstance(msg, m.Ping):
            link.send(m.Pong(msg.sent))
        elif isinstance(msg, m.Pong):
            pass
        elif isinstance(msg, m.FilesNeeded):
            self.scatter.on_files_needed(link, msg)
        elif isinstance(msg, m.FilesAdded):
            self.scatter.on_files_added(link, msg)
        elif isinstance(msg, m.JobProgress):
            self.midjob.on_progress(link, msg)
        elif isinstance(msg, m.JobFile):
            self.midjob.on_file(link, msg)
        else:
            raise ProtocolError(f"unexpected message from a node: {type(msg).__name__}")

    def _on_done(self, link: _NodeLink, msg: m.JobDone) -> None:
        assert link.node_id is not None
        ran = msg.end_time - msg.start_time if msg.status in ("finished", "exception") else None
        actions = self.core.handle(JobReported(link.node_id, msg.job_id, msg.attempt,
                                               worker_died=msg.status == "died", duration=ran))
        if not actions or not isinstance(actions[0], DeliverResult):
            if msg.status == "died" and msg.job_id in self.jobs:
                log.warning("job %s killed its worker on %s; trying it again", msg.job_id, link.name)
            log.debug("discarded a late report of job %s attempt %d from %s", msg.job_id, msg.attempt, link.name)
            self.execute(actions)
            return
        entry = self.jobs.get(msg.job_id)
        if entry is None:  # resolved meanwhile (cancelled, settled by the trust layer): this report is late
            log.debug("report of job %s from %s came after the job ended; ignored", msg.job_id, link.name)
            self.execute(actions[1:])
            return
        job = entry[0]
        self.midjob.ended(msg.job_id)
        link.jobs_done += 1
        link.cpu_time += msg.cpu_time
        self.stats.reported(link.node_id, job._key, len(msg.result or b"") + len(msg.stdout) + len(msg.stderr),
                            msg.cpu_time, msg.end_time - msg.start_time)
        if self.trust is not None and self.trust.manages(job):
            self.trust.on_done(link, msg)  # one replica's report: the trust core decides
            self.execute(actions[1:])
            return
        self.record("done", msg.job_id, link.node_id, msg)
        status, result, exc = apply_report(job, msg, ip_addr=link.ip_addr, node_id=link.node_id,
                                           hostname=link.hostname, where=f"on node {link.name}")
        self.finish(job, status, result=None if result is DROPPED else result, exc=exc)
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
        self.history.add(job_ended(job), time.monotonic())
        self.stats.finished(job._key, status.value, job.node_id, job.start_time, job.end_time)
        self.cluster._job_done(job)
        if not self.jobs and not self.dependents:
            self.idle.set()

    # ---------------------------------------------------------------- shutdown

    async def aclose(self, terminate: bool) -> None:
        if terminate:
            self.dependents.cancel_all()
            for key in list(self.jobs):
                self.cancel(self.jobs[key][0])
        await self.idle.wait() if not terminate else await asyncio.wait_for(self.idle.wait(), 10)
        self.closing = True
        if self.monitor is not None:
            await self.monitor.aclose()
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
        self.scatter.remove_files()
        self.midjob.close()


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
        certfile, keyfile, cafile: mutual TLS to the nodes (else ``CLUSTERPY_CERTFILE``,
            ``CLUSTERPY_KEYFILE``, ``CLUSTERPY_CAFILE``; none set: no TLS). See
            docs/SECURITY.md and ``clusterpy keygen``.
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
        monitor: serve a live web page of the cluster (``True``: on 127.0.0.1, a free port; a
            port number; or ``"HOST:PORT"``); its URL, with an access token, is logged and in
            :attr:`monitor_url`. Needs ``pip install clusterpy[monitor]``. See docs/MONITOR.md.

        Results you can trust and work that stops early (docs/TRUST.md):
        verify: ``verify(result, *args, **kwargs)`` checks each result on this machine (in a
            thread); a result that fails is run again on another node (up to ``max_reruns``
            times; then the job fails with VerificationError) and its node is no longer trusted.
        replicas, replicate_fraction: run that fraction of the jobs (spread evenly; default all)
            on ``replicas`` different nodes; the majority's result is kept and a node that
            disagrees is no longer trusted. Only for computations whose correct result is
            unique (same arguments, same result: compared as pickled bytes).
        max_reruns: extra runs a job may get to find a trustworthy result.
        distrust_after: wrong results (failed checks, outvoted) that make a node untrusted; an
            untrusted node gets no more jobs (``stats().untrusted_nodes``).
        rerun_untrusted: results of a node still pending when it becomes untrusted are run
            again elsewhere.
        only_if: ``only_if(result)`` runs on the node; a result it rejects is dropped there
            (never sent): the job's result is None, and ``map`` leaves it out.
        return_files: run each job in a private directory on its node and bring back every
            file it makes there (as ``clusterpy.send_file`` does).
        files_dir: where files jobs send back are written, as ``<files_dir>/<job id>/<name>``
            (default: ``dest_path`` under the current directory, or the current directory).
        max_file_size: largest file accepted from a job (the node has its own limit too).

    Raises:
        ConfigurationError: bad arguments, or no secret could be found.
        DependencyError: a dependency cannot be shipped.
    """

    # A JobCluster talks to nodes; SharedJobCluster overrides these to talk to a scheduler.
    _peer_roles: frozenset[str] = frozenset({"node"})
    _lost_error: type[NodeLostError] = NodeLostError

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
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        cafile: str | os.PathLike[str] | None = None,
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
        monitor: bool | int | str = False,
        verify: Callable[..., Any] | None = None,
        replicas: int = 1,
        replicate_fraction: float = 1.0,
        max_reruns: int = 2,
        distrust_after: int = 1,
        rerun_untrusted: bool = True,
        only_if: Callable[[Any], Any] | None = None,
        return_files: bool = False,
        files_dir: str | os.PathLike[str] | None = None,
        max_file_size: int = 1 << 30,
    ) -> None:
        if loglevel is not None:
            logging.getLogger("clusterpy").setLevel(loglevel)
        monitor_spec = parse_monitor(monitor)
        if monitor_spec is not None:
            require_aiohttp()  # fail before anything starts
        self.monitor_url: str | None = None
        self._secret = load_secret(secret, secret_file=secret_file)
        self._ssl = tls.client_context_from(certfile, keyfile, cafile)
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
        self._trust_options = _trust_options(verify, replicas, replicate_fraction, max_reruns, distrust_after,
                                             rerun_untrusted)
        if only_if is not None and not callable(only_if):
            raise ConfigurationError(f"only_if must be callable, not {type(only_if).__name__}")
        self._only_if, self._return_files = only_if, bool(return_files)
        self.files_dir = os.path.abspath(os.fspath(files_dir) if files_dir is not None else (dest_path or "."))
        self.max_file_size = max_file_size
        self._stop_generation = 0  # cluster.stop() calls so far (a map in progress stops submitting)
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
            if monitor_spec is not None:  # first: if it cannot bind, nothing else has started
                self._rt.monitor = self._await(start_monitor(ClusterSource(self._rt), monitor_spec))
                self.monitor_url = self._rt.monitor.url
            self._await(self._rt.start(self.addresses, local))
        except BaseException:
            if self._rt.monitor is not None:
                self._await(self._rt.monitor.aclose(), 5)
            self._stop_loop()
            raise

    # ---------------------------------------------------------------- packaging

    def _package(self, computation: Any, depends: Iterable[Any], setup: Any, setup_args: tuple[Any, ...],
                 cleanup: Any, keep_files: bool) -> tuple[deps_mod.Dependencies, m.DeployComputation]:
        depends = list(depends)
        if callable(computation):
            # Modules in depends travel as files: the computation directory is on the worker's sys.path.
            found = deps_mod.collect(depends)
            for fn in (computation, setup, cleanup, self._only_if, *found.objects):
                _pickle_by_value_if_local(fn)
            _tracebacks.remember((computation, setup, cleanup, *found.objects))  # for remote tracebacks
            bundle = cloudpickle.dumps({
                "compute": computation, "setup": setup, "cleanup": cleanup,
                "depends": list(found.objects), "setup_args": tuple(setup_args),
                "only_if": self._only_if, "return_files": self._return_files,
            })
            self.computation_name = getattr(computation, "__name__", repr(computation))
            deploy = m.DeployComputation(self._comp_id, "function", self._metas(found), bundle, None,
                                         keep_files=keep_files, reentrant=self.reentrant, dest_path=self.dest_path)
        elif isinstance(computation, (str, os.PathLike)):
            path = os.fspath(computation)
            if not os.path.isfile(path):
                raise ConfigurationError(f"program {path!r} does not exist or is not a file")
            found = deps_mod.collect(depends, program=path)
            self.computation_name = os.path.basename(path)
            options = None  # only_if / return_files for a program travel in an otherwise empty bundle
            if self._only_if is not None or self._return_files:
                _pickle_by_value_if_local(self._only_if)
                options = cloudpickle.dumps({"only_if": self._only_if, "return_files": self._return_files})
            deploy = m.DeployComputation(self._comp_id, "program", self._metas(found), options,
                                         (os.path.basename(path),), keep_files=keep_files,
                                         reentrant=self.reentrant, dest_path=self.dest_path)
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

    def _make_trust(self, rt: _Runtime) -> Any:
        if self._trust_options is None:
            return None
        from ._trust_shell import TrustShell

        return TrustShell(rt, **self._trust_options)

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
        limit = timeout if timeout is not None else self.default_timeout
        try:
            blob = cloudpickle.dumps((args, kwargs), protocol=5)
        except Exception as exc:
            upstream = find_upstream(args, kwargs)  # jobs or futures as arguments: dataflow
            if not upstream:
                raise ClusterError(f"the arguments of job {job.id!r} cannot be pickled: {exc!r}") from exc
            with self._jobs_lock:
                self._jobs_submitted += 1
            self._loop.call_soon_threadsafe(self._rt.dependents.hold, job, upstream, limit, node)
            return job
        with self._jobs_lock:
            self._jobs_submitted += 1
        self._loop.call_soon_threadsafe(self._rt.submit, job, blob, limit, node)
        return job

    async def submit_async(self, *args: Any, **kwargs: Any) -> ClusterJob:
        """asyncio flavour of :meth:`submit` (submission never blocks)."""
        return self.submit(*args, **kwargs)

    # ------------------------------------------- executor, map, waiting, scatter (clusterpy.executor, .scatter)

    def executor(self) -> Any:
        """A ``concurrent.futures.Executor`` that runs any function on this cluster
        (:class:`clusterpy.ClusterExecutor`); its ``shutdown`` leaves the cluster open."""
        from .executor import ClusterExecutor

        return ClusterExecutor._borrow(self)

    def map(self, *iterables: Iterable[Any], chunksize: int = 1, timeout: float | None = None,
            buffersize: int | None = None, stop_when: Callable[[Any], Any] | None = None) -> Iterator[Any]:
        """The computation applied to the items of ``iterables`` (``computation(x, y)`` for each
        ``x, y`` of ``zip(xs, ys)``), results in order; ``chunksize`` items per job, at most
        ``buffersize`` jobs in flight; ``timeout`` as in ``Executor.map``. A failing item's
        exception notes its index and value. Raises ValueError for a chunksize below 1.

        ``stop_when(result)`` (early exit): once a result satisfies it, the map's jobs still
        queued are dropped and its running ones terminated on their nodes; the iterator then
        yields the results that were ready, in order, and ends when none of its jobs runs any
        more (:class:`clusterpy.early_exit.StoppableMap`: ``.stopped``, ``.stopped_by``).
        Results dropped on the nodes by ``only_if`` are left out."""
        if stop_when is not None:
            from .early_exit import StoppableMap

            return StoppableMap(self, iterables, stop_when=stop_when, chunksize=chunksize, timeout=timeout,
                                buffersize=buffersize)
        from .executor import map_computation

        results = map_computation(self, iterables, chunksize=chunksize, timeout=timeout, buffersize=buffersize)
        return results if self._only_if is None else (r for r in results if r is not DROPPED)

    def as_completed(self, jobs: Iterable[Any], timeout: float | None = None) -> Any:
        """The jobs (or futures) as they end: ``for job in ...`` or ``async for job in ...``;
        raises TimeoutError if they have not all ended within ``timeout`` seconds."""
        from .executor import as_completed

        return as_completed(jobs, timeout)

    async def gather(self, jobs: Iterable[Any], *, return_exceptions: bool = False) -> list[Any]:
        """``await`` every job's result, in order (``asyncio.gather`` semantics); cancelling the
        awaiting task cancels the jobs still pending, on their nodes too."""
        from .executor import gather

        return await gather(jobs, return_exceptions=return_exceptions)

    def scatter(self, obj: Any, timeout: float | None = None) -> Any:
        """Send ``obj`` to every node once; return a :class:`clusterpy.scatter.Scattered` handle
        that jobs receive as the object (nodes that join later get it too). Returns when the
        connected nodes hold it. Raises ClusterError if a node cannot store it."""
        from .scatter import scatter

        return scatter(self, obj, timeout)

    broadcast = scatter

    async def scatter_async(self, obj: Any) -> Any:
        """asyncio flavour of :meth:`scatter` (pickling runs in a thread)."""
        from .scatter import scatter_async

        return await scatter_async(self, obj)

    def cancel(self, job: ClusterJob) -> bool:
        """Cancel a job: dropped if queued, terminated on its node if running. False if it had ended."""
        if job.done() and not job._future.cancelled():  # a cancelled future still cancels its job
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

    # Hooks for subclasses (clusterpy.compat.dispy), called in the loop thread; they must not block.

    def _accept_node(self, link: _NodeLink) -> bool:
        """A node connected (``link.cpus``, ``hostname``, ``ip_addr`` are known) and the
        computation is not deployed there yet. An override may lower ``link.cpus`` and set
        ``link.deployment``; False: the cluster does not use this node (the link is dropped)."""
        return True

    def _node_changed(self, link: _NodeLink, joined: bool) -> None:
        """A node joined the cluster (its computation is ready) or left it."""

    def _job_started(self, job: ClusterJob, link: _NodeLink) -> None:
        """A job started running on the node of ``link``."""

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes in the cluster now, with their statistics."""
        return self._call(lambda: [
            {"name": link.name, "ip_addr": link.ip_addr, "hostname": link.hostname, "node_id": link.node_id,
             "cpus": link.cpus, "jobs_done": link.jobs_done, "cpu_time": link.cpu_time,
             "busy": self._rt.core.inflight(link.node_id) if link.node_id in self._rt.by_node else 0,
             "connected": link.node_id in self._rt.by_node}
            for link in self._rt.links if link.joined
        ])

    def stats(self) -> ClusterStats:
        """Statistics per node (speed score and observed job time, trust, jobs, transfers) and
        per job (times, runs, verification), as a :class:`clusterpy.stats.ClusterStats`;
        ``.to_json(path)`` writes them. ``stats()["nodes"][0]["cpus"]`` style access works too."""
        from .stats import collect

        return self._call(collect, self._rt)

    def stop(self) -> int:
        """Stop all work now (early exit): queued jobs are dropped, running ones are terminated
        on their nodes (both end Cancelled), and a ``map`` in progress submits no more. The
        cluster stays open for new jobs. Returns how many jobs were stopped; ``wait()`` returns
        once their nodes confirmed. Callable from a callback too."""
        self._stop_generation += 1
        if threading.current_thread() is self._thread:
            return self._stop_now()
        return int(self._call(self._stop_now))

    def _stop_now(self) -> int:
        rt = self._rt
        self._note_stop()
        rt.dependents.cancel_all()
        jobs = {id(entry[0]): entry[0] for entry in rt.jobs.values() if not entry[0].done()}
        for job in jobs.values():
            rt.cancel(job)
        return len(jobs)

    def _note_stop(self) -> None:
        self._rt.stats.stops += 1

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
