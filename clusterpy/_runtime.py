"""The client's event-loop side: node links and the runtime that drives the scheduling core.

Everything here lives in the cluster's event-loop thread (see :mod:`clusterpy.client` for the
public, thread-safe facade). ``_Runtime`` turns node messages into scheduling-core events and
executes the core's actions; ``_NodeLink`` is one authenticated connection to a node, kept up
(reconnecting after a loss) and deploying the computation on each new incarnation.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from typing import Any


from . import _userdata
from . import deps as deps_mod
from .core.scheduler import (
    CancelOnNode,
    CancelRequested,
    DeliverResult,
    DispatchJobs,
    JobsRecalled,
    JobsStarted,
    JobState,
    JobSubmitted,
    NodeDistrusted,
    NodeJoined,
    NodeLost,
    NodeResized,
    RecallJobs,
    ResolveJob,
    SchedulerCore,
)
from .errors import (
    AuthenticationError,
    ClusterError,
    ConfigurationError,
    JobCancelledError,
    ProtocolError,
    VersionMismatchError,
)
from .dataflow import Dependents
from .journal import JournalWriter
from .monitor import JobHistory, record_job
from .job import ClusterJob, JobStatus, apply_report
from ._midjob import MidJob
from .progress import DROPPED
from .nodelink import DeploymentRefused, NodeLink, sources_from_entries
from .protocol import codec
from .stats import StatsRecorder
from .protocol import messages as m
from .scatter import ScatterState

__all__: list[str] = []  # private: the public API is clusterpy.client.JobCluster

log = logging.getLogger("clusterpy.client")

_PERMANENT = (AuthenticationError, VersionMismatchError)
# Read per job: an Enum member through its class costs ~100 ns in Python 3.11 (EnumType's
# __getattr__ hook), a module global a tenth of that.
_CREATED, _RUNNING = JobStatus.Created, JobStatus.Running


def _score(text: str | None) -> float:
    """A node's speed score from its handshake info (1.0 if it sent none or nonsense)."""
    try:
        value = float(text) if text is not None else 1.0
    except ValueError:
        return 1.0
    return value if 0.0 < value < float("inf") else 1.0


def _parse_node(spec: str, default_port: int) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if sep and port.isdigit() and host and not host.endswith(":"):
        return host.strip("[]"), int(port)
    return spec, default_port


class _NodeLink(NodeLink):
    """A client's link to one node: :class:`~clusterpy.nodelink.NodeLink` (connect, reconnect,
    deploy, read) plus the client's bookkeeping: batched submissions, counters, this node's
    own deployment. Its owner is the :class:`_Runtime`, which deploys the computation on each
    new connection before the node may take jobs."""

    def __init__(self, runtime: "_Runtime", host: str, port: int) -> None:
        super().__init__(runtime, host, port, secret=runtime.secret, role="client",
                         expected_roles=runtime.cluster._peer_roles, ssl=runtime.tls_for(host, port),
                         connect_timeout=runtime.connect_timeout, reconnect_delay=runtime.reconnect_delay)
        self.runtime = runtime
        self.joined = False  # the computation is deployed on it: it takes jobs
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.score = 1.0  # the node's benchmark score (clusterpy.benchmark), from its handshake
        self.pending_submit: list[m.JobRequest] = []
        self.where = f"on node {self.name}"  # for the messages of its jobs' reports (made once)
        # This node's own computation and files (JobCluster._accept_node may set them; dispy's
        # NodeAllocate gives nodes their own setup_args and depends); None: the cluster's.
        self.deployment: tuple[m.DeployComputation, deps_mod.Dependencies] | None = None

    def stop(self, reason: str = "link stopped") -> None:  # type: ignore[override]
        """Stop using this node: close the computation there (its jobs end on the node), drop
        the connection (the core moves or abandons the jobs it held), and never reconnect."""
        self.pending_submit.clear()  # not sent: the core moves or abandons them with the node
        self.send(m.CloseComputation(self.runtime.comp_id))
        super().stop(reason)

    def queue_job(self, request: m.JobRequest) -> None:
        """Add a job to this loop turn's SubmitJobs batch for the node: it is encoded and sent
        just before the connection's next write (``Connection.before_flush``: at the end of
        the read being handled, or of the loop turn), or, for a batch of submissions, as
        :meth:`_Runtime.deliver` ends; the jobs dispatched together travel in one message,
        with no extra loop iteration."""
        if not self.pending_submit:
            conn = self.conn
            if conn is None or conn.closed:
                return  # the link is going down: the core moves or abandons its jobs
            submitting = self.runtime.submitting
            if submitting is not None:
                submitting.append(self)  # _Runtime.deliver sends the batch as it ends
            else:
                try:
                    conn.before_flush(self.flush)
                except ClusterError:
                    return
        self.pending_submit.append(request)

    def flush(self, now: bool = False) -> None:
        """Send the pending batch (also before a message that must follow it); ``now``: write
        it at once, rather than with the connection's end-of-turn write."""
        if self.pending_submit and self.conn is not None and not self.conn.closed:
            self.conn.send(codec.encode_parts(m.SubmitJobs(self.runtime.comp_id, tuple(self.pending_submit))),
                           now=now)
        self.pending_submit.clear()


class _Runtime:
    """Everything that lives in the cluster's event loop."""

    def __init__(self, cluster: Any) -> None:  # the JobCluster that owns this runtime
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
                                  allowed_failures=cluster.allowed_failures, steal=cluster.work_stealing)
        self.jobs: dict[str, tuple[ClusterJob, _userdata.Payload, float | None]] = {}
        # Statistics, provisional results and files, and trust (verify=, replicas=): stats.py,
        # _midjob.py, _trust_shell.py.
        self.stats = StatsRecorder()
        self.midjob = MidJob(self, cluster.files_dir, cluster.max_file_size)
        self.trust = cluster._make_trust(self)
        self.links: list[_NodeLink] = []
        self.by_node: dict[str, _NodeLink] = {}
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.queue = cluster._queue  # clusterpy._submit.SubmitQueue: admissions of jobs not yet dispatched
        self.inbox = cluster._inbox  # clusterpy._submit.LoopInbox: the one way in from other threads
        self.local_node: Any = None
        self.discovery: Any = None  # transport.udp.DiscoveryClient when discovering
        self._local_start: asyncio.Future[int] | None = None
        self.journal: JournalWriter | None = cluster._journal
        self._journal_flush_scheduled = False
        self.idle = asyncio.Event()
        # While deliver() runs: the links that queued a SubmitJobs batch (flushed at its end).
        self.submitting: list[_NodeLink] | None = None
        self._refill_due = False  # a refill of the nodes the core owes one waits for a read's end
        self.idle.set()
        self.dependents = Dependents(self)  # jobs waiting for upstream results (clusterpy.dataflow)
        self.scatter = ScatterState(self)  # scattered objects and their transfers (clusterpy.scatter)
        self.history = JobHistory()  # counts, throughput, latest failures: fed while a monitor runs
        self.monitor: Any = None  # clusterpy.monitor.MonitorServer when monitor= is given
        # Whether the cluster's _job_started and _job_done hooks can do anything (the cluster
        # decides: JobCluster._make_runtime); until then, call them.
        self.started_hook = True  # a job reported by its end alone is shown started first (_on_done)
        self.done_hook = True

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

    # ---------------------------------------------------------------- NodeLink owner

    def link_up(self, link: NodeLink) -> None:
        """Connected and authenticated: deploy the computation, then the node takes jobs."""
        assert isinstance(link, _NodeLink)
        link.score = _score(link.peer_info.get("score"))
        if not self.cluster._accept_node(link):  # the cluster does not use this node (NodeAllocate)
            link.stopped = True
            link.declare_lost("not used by this cluster")
            self.drop_link(link)
            return
        self.spawn(self._deploy_on(link))

    async def _deploy_on(self, link: _NodeLink) -> None:
        deploy, dependencies = link.deployment or (self.deploy_message, self.dependencies)
        try:
            await link.deploy(deploy, sources_from_entries(dependencies.files))
        except DeploymentRefused as exc:
            link.error = exc  # the node refused the computation: retrying cannot help
            log.error("node %s: %s", link.name, exc)
            link.stopped = True
            link.declare_lost(str(exc))
            self.link_failed(link, exc)
            return
        except ClusterError:
            return  # the connection went down meanwhile: the link reconnects and deploys again
        if link.up and not self.closing:
            link.joined = True
            self.node_joined(link)

    def link_message(self, link: NodeLink, msg: object) -> None:
        assert isinstance(link, _NodeLink)
        if link.joined:
            if type(msg) is m.JobDone:  # every job's report (a JobsDone's too: NodeLink unpacks it)
                self._on_done(link, msg)
            else:
                self.on_message(link, msg)

    def link_down(self, link: NodeLink, reason: str) -> None:
        assert isinstance(link, _NodeLink)
        self.link_lost(link, reason)

    def link_refused(self, link: NodeLink, exc: BaseException) -> None:
        assert isinstance(link, _NodeLink)
        self.link_failed(link, exc)

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
            if type(action) is DispatchJobs:  # nearly every action: one per refill of a node
                self._dispatch(action.node_id, action.jobs)
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
                holder = self.by_node.get(action.node_id)
                if holder is not None:
                    holder.flush()
                    holder.send(m.CancelJob(self.comp_id, action.job_id, action.attempt))
            elif isinstance(action, RecallJobs):
                holder = self.by_node.get(action.node_id)
                if holder is not None:
                    holder.flush()
                    holder.send(m.RecallJobs(self.comp_id, action.jobs))
            elif isinstance(action, DeliverResult):
                pass  # handled by the caller, which holds the report
            else:  # pragma: no cover - a new action type must be handled here
                raise TypeError(action)

    def _dispatch(self, node_id: str, jobs: tuple[tuple[str, int], ...]) -> None:
        """Send these (job id, attempt) to the node, in its SubmitJobs batch of this turn."""
        link = self.by_node[node_id]
        pending = link.pending_submit
        cpus = self.cluster.cpus_per_job
        held = self.jobs
        stats = self.stats
        dequeued = 0
        for job_id, attempt in jobs:
            job, args, timeout = held[job_id]
            first = job._queued
            if first:  # its first dispatch: it no longer counts against max_queued
                job._queued = False
                dequeued += 1
            # (A plain pickle, the common case, is measured without a call.)
            stats.dispatched(node_id, job, len(args) if type(args) is bytes else _userdata.size(args), first)
            request = m.JobRequest(job_id, attempt, args, timeout, cpus)
            if pending:  # the link's batch of this turn is open: join it
                pending.append(request)
            else:
                link.queue_job(request)
            if self.journal is not None:
                self.record("dispatch", job_id, node_id, attempt)
        if dequeued:
            self.queue.release(dequeued)

    def deliver(self, items: list[tuple[Any, ...]]) -> None:
        """A batch of submissions from user threads (JobCluster._submit_admitted), in order."""
        submitting: list[_NodeLink] = []
        self.submitting = submitting
        try:
            for job, blob, timeout, node, upstream in items:
                try:
                    if upstream is not None:
                        self.dependents.hold(job, upstream, timeout, node)
                    else:
                        self.submit(job, blob, timeout, node)
                except Exception as exc:  # a bug of ours: fail this job loudly, keep the others
                    log.exception("could not submit job %r", job.id)
                    if not job.done():
                        self.finish(job, JobStatus.Terminated,
                                    exc=ClusterError(f"job {job.id!r} could not be submitted: {exc!r}"))
        finally:
            # The batch is complete: its jobs leave now, not a loop iteration later (a caller
            # may be waiting for the first result). queue_job scheduled no end-of-turn flush
            # for them: whatever happened, they must be sent here.
            self.submitting = None
            for link in submitting:
                link.flush(now=True)

    def submit(self, job: ClusterJob, args: _userdata.Payload, timeout: float | None, node: str | None) -> None:
        jobs = self.jobs
        if not jobs:  # idle is set only while no job is held (finish, TrustShell._ended)
            self.idle.clear()
        jobs[job._key] = (job, args, timeout)
        if self.journal is not None:
            self.record("submit", job._key, job.id, args, timeout)
        if self.trust is not None and node is None:  # verify / replicas (a pinned job is not re-run elsewhere)
            self.stats.submitted(job, _userdata.size(args))  # other jobs are recorded at first dispatch
            self.trust.submit(job, args, timeout)
            self._check_all_failed()
            return
        if node is None:  # the common case: the core's entry for a plain job, no event object
            actions = self.core.submit(job._key)
        else:
            actions = self.core.handle(JobSubmitted(job._key, node_id=self._find_node(node) or node))
        if actions:
            self.execute(actions)
        if not self.by_node:  # (the check's own first test, without a call per job)
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
        link.pending_submit.clear()  # never sent: the core moves or abandons those jobs below
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
            self.execute(self.core.handle(JobsStarted(link.node_id, tuple((s.job_id, s.attempt) for s in msg.jobs))))
            for s in msg.jobs:
                entry = self.jobs.get(s.job_id)
                if entry is not None and entry[0].status is JobStatus.Created:
                    self._mark_running(entry[0], link, s.start_time)
        elif isinstance(msg, m.JobsRecalled):
            self.execute(self.core.handle(JobsRecalled(link.node_id, msg.jobs)))
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
        # The per-job path of every result: keep it lean (attributes read once, nothing
        # formatted unless it is reported, no event or action object the core can do without).
        node_id = link.node_id
        assert node_id is not None
        job_id, state = msg.job_id, msg.status
        took = msg.end_time - msg.start_time
        core = self.core
        current, actions = core.report(node_id, job_id, msg.attempt, state == "died",
                                       took if state == "finished" or state == "exception" else None, False)
        if core.owed and not self._refill_due:
            self._refill_after_read(link)
        if not current:
            if state == "died" and job_id in self.jobs:
                log.warning("job %s killed its worker on %s; trying it again", msg.job_id, link.name)
            log.debug("discarded a late report of job %s attempt %d from %s", msg.job_id, msg.attempt, link.name)
            self.execute(actions)
            return
        entry = self.jobs.get(job_id)
        if entry is None:  # resolved meanwhile (cancelled, settled by the trust layer): this report is late
            log.debug("report of job %s from %s came after the job ended; ignored", job_id, link.name)
            self.execute(actions)
            return
        job = entry[0]
        trust = self.trust
        if job.status is _CREATED and state != "cancelled" and (
                job._fut is not None or self.started_hook or trust is not None):
            # A short job is reported by its end alone (the node reports starts a moment late):
            # it still goes through Running where that can be seen: its future's state, the
            # cluster's _job_started hook (dispy's job_status), a replica the trust layer holds
            # before its verdict. Otherwise the report below sets its start time and node.
            self._mark_running(job, link, msg.start_time)
        if self.midjob.receiving:
            self.midjob.ended(job_id)
        cpu_time = msg.cpu_time
        link.jobs_done += 1
        link.cpu_time += cpu_time
        self.stats.reported(node_id, job._key, msg.data_size, cpu_time, took)
        if trust is not None and trust.manages(job):
            trust.on_done(link, msg)  # one replica's report: the trust core decides
            self.execute(actions)
            return
        if self.journal is not None:
            self.record("done", job_id, node_id, msg)
            # In the file before the caller can see the result: the node forgets a result once
            # sent, so a crash right after job() returned must not lose it.
            self.journal.flush()
        status, result, exc = apply_report(job, msg, ip_addr=link.ip_addr, node_id=node_id,
                                           hostname=link.hostname, where=link.where)
        self.finish(job, status, result=None if result is DROPPED else result, exc=exc)
        if actions:
            self.execute(actions)

    def _refill_after_read(self, link: _NodeLink) -> None:
        """Refill the nodes whose freed slots the core left owed (``report(..., refill=False)``)
        once every report of this read from the node is handled, just before the read's
        answers are written: a read's reports (a JobsDone, 2-3 reports in a stream of short
        jobs) then cost one refill and one dispatch instead of one per report."""
        self._refill_due = True
        try:
            assert link.conn is not None  # (its reports are being read)
            link.conn.before_flush(self._refill)
        except ClusterError:  # the connection is down: no read to wait for
            self._refill()

    def _refill(self) -> None:
        self._refill_due = False
        actions = self.core.refill()
        if actions:
            self.execute(actions)

    def _mark_running(self, job: ClusterJob, link: _NodeLink, start_time: float) -> None:
        job.status = _RUNNING
        job.start_time = start_time
        job.ip_addr = link.ip_addr
        job._set_running()  # its future, if any, is running: Future.cancel() now returns False
        self.cluster._job_started(job, link)

    def finish(self, job: ClusterJob, status: JobStatus, *, result: Any = None, exc: BaseException | None = None) -> None:
        entry = self.jobs.pop(job._key, None)
        unsent = None  # the size of its arguments if it was held here and never dispatched
        if job._queued:  # ended before any dispatch (cancelled, failed upstream, no usable node)
            job._queued = False
            self.queue.release(1)
            unsent = None if entry is None else _userdata.size(entry[1])
        if job.end_time is None:
            job.end_time = time.time()
        job._end(status, result, exc)
        if self.monitor is not None:  # nobody reads the history without a monitor
            record_job(self.history, job, time.monotonic())
        self.stats.finished(job, unsent)
        if self.done_hook:
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
            link.stopped = True  # no reconnection from here on
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
