"""JobCluster: the client. A thin asyncio shell around the scheduling core.

::

    user thread                     cluster loop thread (asyncio)
    -----------                     -----------------------------------------------
    submit(*args) --pickle args-->  SubmitQueue (blocks at max_queued; one wake-up per batch)
                                    through the LoopInbox (every call into the loop, in order)
                                    _Runtime.submit -> SchedulerCore.handle(JobSubmitted)
                                        actions -> DispatchJobs -> batched SubmitJobs per node
                                        (dispatched: the job leaves the SubmitQueue's count)
    job() <-- JobSync (parked) ---  _NodeLink (one authenticated Connection per node)
                                        JobDone -> SchedulerCore.handle(JobReported)
                                        DeliverResult -> unpickle, job._end() wakes the threads
                                        waiting for it; callback(job) on the callback thread

The event loop runs in a background thread so that plain scripts work; asyncio programs use
the same object with ``await job`` and ``async with``. ``_Runtime`` and ``_NodeLink`` (the
loop-thread side) live in :mod:`clusterpy._runtime`; this module is the thread-safe facade.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import uuid
from types import EllipsisType
from typing import Any, Callable, Iterable, Iterator

from . import deps as deps_mod
from . import tls
from .errors import (
    ClusterClosedError,
    ClusterError,
    ConfigurationError,
    NodeLostError,
)
from .identity import DEFAULT_NODE_PORT
from .dataflow import find_upstream
from .journal import JournalWriter
from .monitor import ClusterSource, parse_monitor, require_aiohttp, start_monitor
from .job import ClusterJob, JobStatus, JobSync
from .progress import DROPPED
from .stats import ClusterStats
from .protocol import messages as m
from .secret import load_secret
from .discovery import DEFAULT_RELAY_PORT, DiscoveryKey, plan_nodes
from ._computation import check_callable, check_cpus_per_job, check_dest_path, package, trust_options
from ._runtime import _NodeLink, _Runtime, _parse_node
from ._submit import DEFAULT_MAX_QUEUED, LoopInbox, SubmitQueue, check_max_queued, check_submit_timeout, closed_error, dumps_args

__all__ = ["JobCluster"]

log = logging.getLogger("clusterpy.client")


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
        prefetch: jobs sent ahead per CPU to hide the network round trip. None (the default):
            one, and up to four on a node whose jobs typically end within 2 ms.
        work_stealing: once no job is left to dispatch, a node with an idle CPU takes back the
            jobs sent ahead to a node whose CPUs are all busy (if that node has not started
            them), so a slow job never holds back the jobs queued behind it.
        max_queued: backpressure: at most this many jobs wait to be dispatched (submitted, not
            yet sent to a node); at the bound, ``submit()`` blocks until dispatching makes room
            (``submit_async`` awaits). None: no bound. A submission from the cluster's
            event-loop thread (a future's done callback) is never blocked. See docs/GUARANTEES.md.
        submit_timeout: how long ``submit()`` may wait for room (None: as long as it takes;
            0: not at all); then it raises QueueFullError and the job is not submitted.
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
        prefetch: int | None = None,
        work_stealing: bool = True,
        max_queued: int | None = DEFAULT_MAX_QUEUED,
        submit_timeout: float | None = None,
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
        self.work_stealing = work_stealing
        try:
            self.max_queued = check_max_queued(max_queued)
            self.submit_timeout = check_submit_timeout(submit_timeout)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.connect_timeout = connect_timeout
        if pulse_interval <= 0:
            raise ConfigurationError("pulse_interval must be positive")
        self.pulse_interval = pulse_interval
        self.node_timeout = node_timeout if node_timeout is not None else max(5 * pulse_interval, 3.0)
        self.local_cpus = local_cpus
        self.cpus_per_job = check_cpus_per_job(cpus_per_job)
        self.dest_path = check_dest_path(dest_path)
        self._trust_options = trust_options(verify, replicas, replicate_fraction, max_reruns, distrust_after,
                                            rerun_untrusted)
        check_callable("only_if", only_if)
        self._only_if, self._return_files = only_if, bool(return_files)
        self.files_dir = os.path.abspath(os.fspath(files_dir) if files_dir is not None else (dest_path or "."))
        self.max_file_size = max_file_size
        self._stop_generation = 0  # cluster.stop() calls so far (a map in progress stops submitting)
        self._comp_id = f"c{uuid.uuid4().hex}"
        self._closed = False
        self._callbacks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clusterpy-callback") if callback else None
        self._dependencies, self._deploy_message = self._package(computation, depends, setup, setup_args, cleanup, keep_files)
        self._journal = None
        if recover_file is not None:
            self._journal = JournalWriter(recover_file, self._secret, comp_id=self._comp_id,
                                          computation=self.computation_name)
        self._loop = asyncio.new_event_loop()
        self._sync = JobSync()  # completion of this cluster's jobs (clusterpy.job)
        # Everything this object's threads ask of the loop goes through this one inbox (in order).
        self._inbox = LoopInbox(self._loop)
        self._queue = SubmitQueue(self._inbox, self._deliver, self.max_queued)
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
        """Package a computation with this cluster's options (:func:`clusterpy._computation.package`);
        also names the cluster after it. ``compat.dispy`` calls it for a node's own deployment."""
        found = package(self._comp_id, computation, depends, setup=setup, setup_args=setup_args, cleanup=cleanup,
                        only_if=self._only_if, return_files=self._return_files, keep_files=keep_files,
                        reentrant=self.reentrant, dest_path=self.dest_path)
        self.computation_name = found.name
        return found.dependencies, found.deploy

    # ---------------------------------------------------------------- loop thread

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._queue.bind_loop_thread()
        self._loop.run_forever()

    def _deliver(self, items: list[tuple[Any, ...]]) -> None:
        """A batch of submissions reaches the loop thread (from :class:`SubmitQueue`)."""
        self._rt.deliver(items)

    def _orphaned(self, items: list[tuple[Any, ...]]) -> None:
        """Submissions the loop can no longer take (it stopped under them): end their jobs."""
        for item in items:
            item[0]._end(JobStatus.Cancelled, exc=ClusterClosedError("the cluster closed before the job could run"))

    def _make_runtime(self) -> _Runtime:
        rt = _Runtime(self)
        # The runtime skips, per job, the hooks that would do nothing: _job_started unless a
        # subclass overrides it (dispy's job_status), _job_done unless there is a callback
        # (its thread pool is made before this) or an override (dispy, a shared cluster).
        cls = type(self)
        rt.started_hook = cls._job_started is not JobCluster._job_started
        rt.done_hook = self._callbacks is not None or cls._job_done is not JobCluster._job_done
        return rt

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

        self._inbox.call(run)
        return fut.result()

    def _await(self, coro: Any, timeout: float | None = None) -> Any:
        """Run ``coro`` in the loop and return its result (TimeoutError after ``timeout``)."""
        return self._inbox.run(coro).result(timeout)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._inbox.call(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._inbox.close()
            self._queue.abandon(self._orphaned)  # submissions the loop took in but never ran
            self._loop.close()

    # ---------------------------------------------------------------- public API

    def submit(self, *args: Any, **kwargs: Any) -> ClusterJob:
        """Submit one job with these arguments; returns the job.

        Returns at once, unless ``max_queued`` jobs are waiting to be dispatched: then it
        blocks until there is room (backpressure), up to ``submit_timeout`` seconds.
        ``timeout=`` here is not passed to the computation: use :meth:`submit_job` to give
        per-job options.

        Raises:
            ClusterClosedError: the cluster is closed (also to a submit blocked when it closes).
            QueueFullError: ``submit_timeout`` passed with no room.
        """
        return self.submit_job(args, kwargs)

    def submit_node(self, node: str, *args: Any, **kwargs: Any) -> ClusterJob:
        """Submit a job to run on one node (address, host name or node id); abandoned if that node is unknown or lost."""
        return self.submit_job(args, kwargs, node=node)

    def submit_job(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
                   timeout: float | None = None, node: str | None = None, job_id: Any = None,
                   submit_timeout: float | None | EllipsisType = ...) -> ClusterJob:
        """Submit a job with explicit options: ``timeout`` (seconds the job may run), ``node``,
        ``job_id``, and ``submit_timeout`` (seconds this call may wait for room under
        ``max_queued``; default: the cluster's ``submit_timeout``; 0: do not wait).

        Raises:
            ClusterClosedError, QueueFullError: as :meth:`submit`.
            ClusterError: the arguments cannot be pickled.
            ValueError: ``submit_timeout`` is not a number of seconds >= 0 or None.
        """
        if self._closed:
            raise closed_error()
        wait = self.submit_timeout if submit_timeout is ... else check_submit_timeout(submit_timeout)
        self._queue.admit(wait)
        return self._submit_admitted(args, kwargs, timeout, node, job_id)

    def _submit_admitted(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None, timeout: float | None = None,
                         node: str | None = None, job_id: Any = None) -> ClusterJob:
        """Make the job and hand it to the loop; the caller holds one admission of the
        SubmitQueue, which this gives back if the job cannot be submitted."""
        try:
            kwargs = kwargs or {}
            job = ClusterJob(self, args, kwargs, time.time())
            if job_id is not None:
                job.id = job_id
            limit = timeout if timeout is not None else self.default_timeout
            upstream = None
            try:
                blob = dumps_args(args, kwargs)
            except Exception as exc:
                upstream = find_upstream(args, kwargs)  # jobs or futures as arguments: dataflow
                if not upstream:
                    raise ClusterError(f"the arguments of job {job.id!r} cannot be pickled: {exc!r}") from exc
                blob = b""
        except BaseException:
            self._queue.withdraw()
            raise
        job._queued = True  # the loop thread releases the admission when the job is dispatched or ends
        self._queue.put((job, blob, limit, node, upstream), self._orphaned)
        return job

    async def submit_async(self, *args: Any, **kwargs: Any) -> ClusterJob:
        """asyncio flavour of :meth:`submit`: awaits room under ``max_queued`` without blocking
        the event loop (cancelling the awaiting task submits nothing)."""
        if self._closed:
            raise closed_error()
        await self._queue.admit_async(self.submit_timeout)
        return self._submit_admitted(args, kwargs)

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet dispatched to a node (what ``max_queued`` bounds)."""
        return self._queue.queued

    @property
    def _jobs_submitted(self) -> int:
        return self._queue.submitted

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
        future = job._fut
        if job.done() and not (future is not None and future.cancelled()):  # a cancelled future still cancels its job
            return False
        self._inbox.call(self._rt.cancel, job)
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
        print(self.stats().status_table())

    def close(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Wait for the submitted jobs (or cancel them, with ``terminate``), then release the
        nodes: their workers run ``cleanup`` and the computation's files are removed."""
        if self._closed:
            return
        self._closed = True
        self._queue.close()  # submitters blocked under max_queued get ClusterClosedError now
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
        if not getattr(self, "_closed", True) and getattr(self, "_inbox", None) is not None:
            try:
                self._inbox.call(self._loop.stop)
            except RuntimeError:
                pass
