"""dispy's API on clusterpy: existing dispy programs run by changing one import.

::

    import clusterpy.compat.dispy as dispy      # instead of: import dispy

    def compute(n):
        return dispy_node_name, n * n

    cluster = dispy.JobCluster(compute, nodes=["192.168.1.*"])
    jobs = [cluster.submit(i) for i in range(10)]
    for job in jobs:
        host, square = job()
        print(job.id, host, square, job.status == dispy.DispyJob.Finished)
    cluster.print_status()
    cluster.close()

The nodes run ``clusterpy-node`` (not dispynode). Every dispy name, and where clusterpy
differs, is listed in docs/DISPY.md. A dispy keyword argument that clusterpy cannot honour
raises a ConfigurationError naming it; one whose purpose clusterpy meets without it (NAT and
polling options: nodes never connect back to the client) is accepted with a logged warning.
A program can also keep ``import dispy`` unchanged: see :func:`clusterpy.compat.dispy_shim_path`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import time
import weakref
from typing import Any, Callable

import clusterpy
from clusterpy._midjob import snapshot
from clusterpy.errors import ClusterClosedError, ClusterError, ConfigurationError
from clusterpy.identity import DEFAULT_NODE_PORT, DEFAULT_SCHEDULER_PORT

from ._dispy_engine import (Engine, NodeTable, SharedEngine, check_dest_path, engine_nodes, make_payload,
                            node_side_deploy, sort_allocs, split_depends)
from ._dispy_node import MSG_TIMEOUT, NodeSide
from ._dispy_types import (ClusterStatus, DispyJob, DispyNode, DispyNodeAvailInfo, NodeAllocate, logger,
                           parse_node_allocs)

__all__ = ["logger", "DispyJob", "DispyNode", "DispyNodeAvailInfo", "NodeAllocate", "ClusterStatus", "JobCluster",
           "SharedJobCluster", "recover_jobs", "MsgTimeout"]

__version__ = "4.15.0"  # the dispy API this module follows
MsgTimeout = MSG_TIMEOUT

# Keywords whose purpose clusterpy meets by design: accepted, and the user told why.
_NOT_NEEDED = {
    "ext_host": "nodes never connect back to the client, so no NAT forwarding is needed",
    "ext_ip_addr": "nodes never connect back to the client, so no NAT forwarding is needed",
    "poll_interval": "results come back on the client's own connections; there is nothing to poll",
    "client_port": "the client listens on no port",
}


def _warn_not_needed(**given: Any) -> None:
    for name, value in given.items():
        if value is not None:
            logger.warning('clusterpy: "%s" is not needed and has no effect: %s', name, _NOT_NEEDED[name])


def _job_status(job_status: Any, callback: Any) -> Any:
    """dispy's ``job_status``, or its old name ``callback``."""
    if callback is not None and job_status is not None:
        logger.warning('"callback" is ignored in favor of "job_status"')
    return job_status if job_status is not None else callback


def _common_options(secret: str, keyfile: Any, certfile: Any, reentrant: Any, recover_file: Any) -> dict[str, Any]:
    """clusterpy's options for dispy's arguments common to both clusters."""
    return dict(secret=secret or None, keyfile=keyfile, certfile=certfile, reentrant=bool(reentrant),
                recover_file=recover_file)


def _refuse(name: str, why: str) -> None:
    raise ConfigurationError(f'dispy keyword "{name}" is not supported by clusterpy: {why}')


class JobCluster:
    """A cluster for one computation, with dispy's arguments (see docs/DISPY.md).

    Args (dispy's): computation (a function or a program's path), nodes, depends, job_status
    (or its old name callback), cluster_status, host (or ip_addr), dispy_port, dest_path,
    loglevel, setup, cleanup, ping_interval, pulse_interval, reentrant, secret, keyfile,
    certfile, recover_file; ext_host / ext_ip_addr / poll_interval are not needed.

    Raises:
        ConfigurationError: an argument clusterpy cannot honour (the message names it).
    """

    _shared = False

    def __init__(self, computation: Any, nodes: Any = None, depends: Any = (),
                 job_status: Callable[..., Any] | None = None, cluster_status: Callable[..., Any] | None = None,
                 host: Any = None, dispy_port: int | None = None, ext_host: Any = None, ip_addr: Any = None,
                 ext_ip_addr: Any = None, ipv4_udp_multicast: bool = False,
                 dest_path: str | None = None, loglevel: int | None = None, callback: Callable[..., Any] | None = None,
                 setup: Callable[..., Any] | None = None, cleanup: Any = True, ping_interval: float | None = None,
                 pulse_interval: float | None = None, poll_interval: float | None = None, reentrant: bool = False,
                 secret: str = "", keyfile: str | None = None, certfile: str | None = None,
                 recover_file: str | None = None) -> None:
        _warn_not_needed(ext_host=ext_host, ext_ip_addr=ext_ip_addr, poll_interval=poll_interval)
        if ipv4_udp_multicast:
            _refuse("ipv4_udp_multicast", "nodes are discovered by UDP broadcast and relays (clusterpy-netrelay)")
        options = _common_options(secret, keyfile, certfile, reentrant, recover_file)
        if pulse_interval is not None:
            if not 0.1 <= float(pulse_interval) <= 1000:
                raise ConfigurationError("pulse_interval must be between 0.1 and 1000 seconds")
            options["pulse_interval"] = float(pulse_interval)
        if ping_interval is not None:
            if not 1 <= float(ping_interval) <= 1000:
                raise ConfigurationError("ping_interval must be between 1 and 1000 seconds")
            options["discovery_interval"] = float(ping_interval)
        interfaces = host or ip_addr
        if interfaces:
            options["discovery_interfaces"] = [interfaces] if isinstance(interfaces, str) else list(interfaces)
        self._node_port = dispy_port + 1 if isinstance(dispy_port, int) else DEFAULT_NODE_PORT
        allocs = parse_node_allocs(nodes)
        if interfaces and not any(alloc.wildcard for alloc in allocs):
            logger.warning('clusterpy: "host" has no effect: it selects the interfaces used to discover nodes, '
                           "and this cluster names every node")
        self._start(computation, allocs, depends, _job_status(job_status, callback), cluster_status, dest_path,
                    loglevel, setup, cleanup, options)

    # ---------------------------------------------------------------- construction

    def _start(self, computation: Any, allocs: list[NodeAllocate], depends: Any, job_status: Any, cluster_status: Any,
               dest_path: Any, loglevel: Any, setup: Any, cleanup: Any, options: dict[str, Any]) -> None:
        if loglevel is not None:
            logger.setLevel(loglevel)
            options["loglevel"] = loglevel
        for name, fn in (("job_status", job_status), ("cluster_status", cluster_status)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(f'"{name}" must be a function or method')
        if setup is not None and not callable(setup):
            raise ConfigurationError('"setup" must be a Python function')
        if not isinstance(cleanup, bool) and not callable(cleanup):
            raise ConfigurationError('"cleanup" must be True, False or a Python function')
        try:
            files, objects = split_depends(list(depends) if isinstance(depends, tuple) else depends)
            options["dest_path"] = check_dest_path(dest_path)
        except ClusterError as exc:
            raise ConfigurationError(str(exc)) from None
        self._jobs: dict[str, DispyJob] = {}  # by clusterpy key, until their last notification
        self._pending = 0  # jobs not ended
        self._lock = threading.RLock()  # a job is registered before its notifications run
        self._start_time = time.time()
        self._closed = False
        keep_files = cleanup is False
        program: str | None = None
        if callable(computation):
            self._name = getattr(computation, "__name__", type(computation).__name__)
            payload = make_payload(computation, setup, cleanup if callable(cleanup) else None, objects)
            side = NodeSide(payload, self._name, {})
            engine_args: dict[str, Any] = dict(depends=files, setup=side.setup, cleanup=side.cleanup)
            deploy_target: Any = side
        elif isinstance(computation, (str, os.PathLike)):
            if setup is not None or callable(cleanup):
                raise ConfigurationError("setup and cleanup functions need a Python function as the computation; "
                                         "clusterpy runs a program computation as a plain process")
            program = os.fspath(computation)
            if not os.path.isfile(program):
                program = shutil.which(program) or program
            self._name = os.path.basename(program)
            payload = b""
            engine_args = dict(depends=files)
            deploy_target = program
        else:
            raise ConfigurationError(f"invalid computation type: {type(computation).__name__}")
        table = NodeTable(self, allocs, None if self._shared else
                          node_side_deploy(payload, self._name, files, keep_files, program), self._shared)
        table.job_status, table.cluster_status = job_status, cluster_status
        table.view = self._view
        self._table = table
        # max_queued=None: dispy's submit never blocks, and it submits holding self._lock, which
        # the engine's loop thread takes too (_ended): blocking there for room would deadlock.
        options.update(engine_args, callback=self._on_job, keep_files=keep_files, max_queued=None)
        self._engine = self._make_engine(table, deploy_target, allocs, options)
        self._allocs = table.allocs
        atexit.register(_close_at_exit, weakref.ref(self))

    def _make_engine(self, table: NodeTable, computation: Any, allocs: list[NodeAllocate],
                     options: dict[str, Any]) -> Any:
        try:
            return Engine(table, computation, nodes=engine_nodes(allocs, self._node_port), port=self._node_port,
                          prefetch=0, **options)
        except ClusterError as exc:
            raise ConfigurationError(str(exc)) from exc

    # ---------------------------------------------------------------- jobs

    def _view(self, job: Any) -> DispyJob:
        """A DispyJob showing ``job`` (a snapshot for a provisional result), sharing ``finish``."""
        known = self._jobs.get(job._key)
        return known._view(job) if known is not None else DispyJob(job)

    def _on_job(self, job: Any) -> None:
        """clusterpy's callback (on the callback thread): a provisional result, or the end."""
        with self._lock:  # registered by submit before any news of the job is handled
            final = job.status.done
        self._table.job_changed(job, final)
        if final:
            with self._lock:
                self._jobs.pop(job._key, None)

    def submit(self, *args: Any, **kwargs: Any) -> DispyJob | None:
        """Submit a job with these arguments; the DispyJob, or None if it cannot be created."""
        return self.submit_job_id_node(None, None, *args, **kwargs)

    def submit_job_id(self, job_id: Any, *args: Any, **kwargs: Any) -> DispyJob | None:
        """As :meth:`submit`, with the job's ``id`` set to ``job_id``."""
        return self.submit_job_id_node(job_id, None, *args, **kwargs)

    def submit_node(self, node: Any, *args: Any, **kwargs: Any) -> DispyJob | None:
        """Submit a job to run on ``node`` (a DispyNode, host name or IP address); None if that
        node is not in the cluster."""
        return self.submit_job_id_node(None, node, *args, **kwargs)

    def submit_job_id_node(self, job_id: Any, node: Any, *args: Any, **kwargs: Any) -> DispyJob | None:
        """As :meth:`submit_node`, with the job's ``id`` set to ``job_id``."""
        if self._closed:
            raise ClusterClosedError("this cluster is closed; create a new cluster to submit jobs")
        if "dispy_job_depends" in kwargs:
            _refuse("dispy_job_depends", "files travel with the computation (depends=, NodeAllocate depends), "
                    "not with each job")
        node_id = None
        if node is not None:
            found = self._table.find(node)
            if found is None:
                logger.warning("invalid node %r: not in this cluster", node)
                return None
            node_id = found._node_id
        created: list[DispyJob] = []
        with self._lock:
            if self._table.cluster_status is not None:
                # Posted first, so it runs before any later news of the job (it waits for the lock).
                self._engine._notify(self._created, created)
            try:
                job = self._engine.submit_job(args, kwargs, node=node_id, job_id=job_id)
            except ClusterClosedError:
                raise
            except ClusterError as exc:
                logger.warning('creating job for "%s", "%s" failed: %s', args, kwargs, exc)
                return None
            djob = DispyJob(job)
            self._jobs[job._key] = djob
            self._pending += 1
            job.add_done_callback(self._ended)
            created.append(djob._view(snapshot(job)))
        return djob

    def _ended(self, job: Any) -> None:
        """The job's future was resolved (loop thread): count it, then wake ``job()``."""
        self._table.job_ended(job)
        with self._lock:
            self._pending -= 1
            djob = self._jobs.get(job._key)
        if djob is not None:
            djob.finish.set()

    def _created(self, created: list[DispyJob]) -> None:
        with self._lock:  # the submitting thread has filled ``created`` (or failed) by now
            pass
        if created and self._table.cluster_status is not None:
            self._table.cluster_status(DispyJob.Created, None, created[0])

    def cancel(self, job: DispyJob) -> int:
        """Cancel a job: dropped if queued, terminated if running. 0, or -1 if it had ended."""
        if not isinstance(job, DispyJob) or job.status not in (DispyJob.Created, DispyJob.Running,
                                                               DispyJob.ProvisionalResult):
            logger.warning("job %s is not valid for cancel", getattr(job, "id", job))
            return -1
        return 0 if self._engine.cancel(job.cluster_job) else -1

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has ended; False if ``timeout`` passed first."""
        return bool(self._engine.wait(timeout))

    def __call__(self) -> None:
        self.wait()

    # ---------------------------------------------------------------- nodes

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise ClusterClosedError("this cluster is closed")
        return self._engine._call(fn, *args)

    def _node_or_none(self, node: Any) -> DispyNode | None:
        found = self._table.find(node)
        if found is None:
            logger.warning("invalid node %r: not in this cluster", node)
        return found

    def status(self) -> ClusterStatus:
        """The cluster's nodes (DispyNode) and how many jobs have not ended."""
        return ClusterStatus(list(self._table.nodes.values()), self._pending)

    def node_jobs(self, node: Any, from_node: bool = False) -> list[DispyJob]:
        """The jobs sent to ``node`` that have not ended (``from_node`` is accepted: the client
        knows them exactly)."""
        found = self._node_or_none(node)
        if found is None:
            return []
        jobs = self._in_loop(self._engine._rt.jobs_on, found._node_id)
        return [self._jobs[j._key] for j in jobs if j._key in self._jobs]

    def set_node_cpus(self, node: Any, cpus: int) -> int:
        """Use ``cpus`` of the node's CPUs (negative: all but that many); returns the CPUs now
        used, or -1 for an unknown node. Jobs already running there go on."""
        found = self._node_or_none(node)
        if found is None:
            return -1
        try:
            cpus = int(cpus)
        except (TypeError, ValueError):
            return -1
        new = min(found.avail_cpus, cpus) if cpus >= 0 else found.avail_cpus + cpus
        if new < 0:
            return -1
        if not self._in_loop(self._engine._rt.resize_node, found._node_id, new):
            return -1
        found.cpus = new
        return new

    def deallocate_node(self, node: Any) -> int:
        """Stop giving ``node`` jobs (those it runs go on); :meth:`allocate_node` resumes it."""
        found = self._node_or_none(node)
        if found is None or not self._in_loop(self._engine._rt.resize_node, found._node_id, 0):
            return -1
        self._table.deallocated.add(str(found._node_id))
        return 0

    def close_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Stop using ``node``: no new jobs; once the jobs sent there end (at once, cancelled,
        with ``terminate_pending``) the computation is closed there (``cleanup`` runs).
        Jobs submitted to that node alone and not started end Abandoned."""
        found = self._node_or_none(node)
        if found is None:
            return -1
        node_id = str(found._node_id)
        self._table.closed.add(node_id)
        return 0 if self._in_loop(self._close_node, node_id, bool(terminate_pending)) else -1

    def _close_node(self, node_id: str, terminate: bool) -> bool:
        rt = self._engine._rt
        link = rt.by_node.get(node_id)
        if link is None:
            return False
        if terminate or not rt.core.inflight(node_id):
            link.stop("closed by close_node")
            return True
        rt.resize_node(node_id, 0)

        async def stop_when_idle() -> None:
            import asyncio

            while node_id in rt.by_node and rt.core.inflight(node_id):
                await asyncio.sleep(0.05)
            link.stop("closed by close_node")

        rt.spawn(stop_when_idle())
        return True

    def allocate_node(self, node: Any) -> int:
        """Use more nodes: ``node`` is a host, a NodeAllocate (or a list of them). A node given
        back with :meth:`deallocate_node` gets jobs again; others are connected (explicit
        hosts) or looked for (patterns) and go through allocation. 0, or -1 for bad input."""
        try:
            allocs = parse_node_allocs(node if isinstance(node, list) else [node])
        except ClusterError as exc:
            logger.warning("allocate_node: %s", exc)
            return -1
        if not allocs:
            return -1
        return 0 if self._in_loop(self._allocate, allocs) else -1

    def _allocate(self, allocs: list[NodeAllocate]) -> bool:
        import re

        rt, table = self._engine._rt, self._table
        for alloc in allocs:
            resumed = False
            for node in list(table.nodes.values()):
                if node._node_id in table.deallocated and re.match(alloc.ip_rex, node.ip_addr) and (
                        not alloc.port or alloc.port == node.port):
                    table.deallocated.discard(str(node._node_id))
                    rt.resize_node(node._node_id, node.cpus)
                    resumed = True
            if resumed:
                continue
            table.allocs = sort_allocs([*table.allocs, alloc])
            self._allocs = table.allocs
            self._discover([alloc])
        return True

    def _discover(self, allocs: list[NodeAllocate]) -> None:
        """In the loop: connect to explicit hosts not in the cluster; look for patterns again."""
        rt = self._engine._rt
        for alloc in allocs:
            if alloc.wildcard:
                if rt.discovery is None:
                    logger.warning("cannot look for %s: this cluster does not discover nodes (give a pattern "
                                   "or no nodes when creating it)", alloc.ip_addr)
                    continue
                for node_id in self._table.refused:
                    rt.discovery.forget(node_id)
                self._table.refused.clear()
                rt.discovery.send_requests([])
            else:
                port = alloc.port or self._node_port
                if not any(link.host == alloc.ip_addr and link.port == port and not link.stopped for link in rt.links):
                    rt.add_link(str(alloc.ip_addr), port)

    def discover_nodes(self, nodes: Any) -> int:
        """Look for nodes (hosts, NodeAllocate objects, ``"*"``); those found are used if an
        allocation of this cluster accepts them. 0, or -1 for bad input."""
        try:
            allocs = parse_node_allocs(nodes if isinstance(nodes, list) else [nodes])
        except ClusterError as exc:
            logger.warning("discover_nodes: %s", exc)
            return -1
        self._in_loop(self._discover, allocs)
        return 0

    def resetup_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Not supported: see docs/DISPY.md."""
        _refuse("resetup_node", "a computation is deployed on a node once per cluster; create a new cluster "
                "to run setup again")
        return -1

    def send_file(self, path: str, node: Any, relay: bool = False) -> int:
        """Not supported: see docs/DISPY.md."""
        _refuse("send_file", "files reach nodes with the computation: depends= (every node) or NodeAllocate "
                "depends (one node); cluster.cluster_engine.scatter() sends an object to every node")
        return -1

    # ---------------------------------------------------------------- reporting, closing

    @property
    def name(self) -> str:
        """The computation's name (the function's, or the program's file name)."""
        return self._name

    @property
    def cluster_engine(self) -> Any:
        """The clusterpy cluster underneath (clusterpy.JobCluster or SharedJobCluster)."""
        return self._engine

    def print_status(self, wall_time: float | None = None) -> None:
        """Print each node's CPUs, jobs done and job time, and the total time and speedup."""
        info = self.status()
        print()
        head = f" {'Node':>24} | {'CPUs':>4} | {'Jobs':>6} | {'Sec/Job':>8} | {'Node Time Sec':>13}"
        print(head)
        print("-" * len(head))
        total = 0.0
        for node in info.nodes:
            total += node.cpu_time
            per = node.cpu_time / node.jobs_done if node.jobs_done else 0.0
            label = f"{node.name or node.ip_addr}:{node.port}"
            print(f" {label[-24:]:>24} | {node.cpus:>4} | {node.jobs_done:>6} | {per:>8.3f} | {node.cpu_time:>13.3f}")
        print()
        if info.jobs_pending:
            print(f"Jobs pending: {info.jobs_pending}")
        wall = wall_time or (time.time() - self._start_time)
        print(f"Total job time: {total:.3f} sec, wall time: {wall:.3f} sec, speedup: {total / wall if wall else 0:.3f}")
        print()

    stats = print_status  # dispy's old name

    def close(self, timeout: float | None = None, terminate: bool = False) -> bool:
        """Wait for the jobs (cancel them, with ``terminate``) and release the nodes. False if
        ``timeout`` passed with jobs still running and ``terminate`` is False (the cluster then
        stays open)."""
        if self._closed:
            return True
        if not terminate and not self._engine.wait(timeout):
            return False
        self._closed = True
        self._engine.close(terminate=terminate)
        return True

    def shutdown(self) -> None:
        """Close the cluster (dispy also stopped its scheduler here)."""
        self.close()

    def __enter__(self) -> "JobCluster":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(terminate=exc_type is not None)


class SharedJobCluster(JobCluster):
    """A cluster whose nodes a clusterpy-scheduler shares among programs (dispy's
    SharedJobCluster, with ``scheduler_host`` naming the scheduler, ``"host"`` or ``"host:port"``).

    The scheduler chooses the nodes: ``nodes`` may only be omitted or ``"*"``; per-node
    allocation is a JobCluster feature.
    """

    _shared = True

    def __init__(self, computation: Any, nodes: Any = None, depends: Any = (),
                 job_status: Callable[..., Any] | None = None, cluster_status: Callable[..., Any] | None = None,
                 host: Any = None, dispy_port: int | None = None, client_port: int | None = None,
                 scheduler_host: str | None = None, ext_host: Any = None, ip_addr: Any = None, ext_ip_addr: Any = None,
                 loglevel: int | None = None, callback: Callable[..., Any] | None = None,
                 setup: Callable[..., Any] | None = None, cleanup: Any = True, dest_path: str | None = None,
                 poll_interval: float | None = None, reentrant: bool = False,
                 exclusive: bool = False, secret: str = "", keyfile: str | None = None, certfile: str | None = None,
                 recover_file: str | None = None, scheduler_port: int | None = None) -> None:
        _warn_not_needed(ext_host=ext_host, ext_ip_addr=ext_ip_addr, poll_interval=poll_interval,
                         client_port=client_port)
        if nodes not in (None, [], "*", ["*"]):
            _refuse("nodes", "with a SharedJobCluster the scheduler chooses the nodes (clusterpy-scheduler --nodes)")
        if exclusive:
            _refuse("exclusive", "clusterpy-scheduler shares every node fairly among its clients")
        if host or ip_addr:
            logger.warning('clusterpy: "host" is not needed and has no effect: a SharedJobCluster connects to its '
                           "scheduler only and looks for no nodes")
        self._scheduler = scheduler_host or "127.0.0.1"
        port = scheduler_port or (dispy_port + 2 if isinstance(dispy_port, int) else DEFAULT_SCHEDULER_PORT)
        self._scheduler_port = port
        self._node_port = DEFAULT_NODE_PORT
        options = _common_options(secret, keyfile, certfile, reentrant, recover_file)
        self._start(computation, [], depends, _job_status(job_status, callback), cluster_status, dest_path,
                    loglevel, setup, cleanup, options)

    def _make_engine(self, table: NodeTable, computation: Any, allocs: list[NodeAllocate],
                     options: dict[str, Any]) -> Any:
        try:
            return SharedEngine(table, computation, self._scheduler, scheduler_port=self._scheduler_port, **options)
        except ClusterError as exc:
            raise ConfigurationError(str(exc)) from exc


def _close_at_exit(ref: "weakref.ref[JobCluster]") -> None:
    """dispy closed its clusters at exit, waiting for their jobs."""
    cluster = ref()
    if cluster is not None:
        cluster.close()


def recover_jobs(recover_file: str | None = None, timeout: float | None = None, terminate_pending: bool = False,
                 secret: str | None = None) -> list[DispyJob]:
    """The jobs of a program that died, from its cluster's ``recover_file``: ended jobs with
    their results; jobs still running are waited for (up to ``timeout`` seconds). Unlike
    dispy's, the jobs keep their ``id``, ``args`` and ``kwargs``; jobs never sent to a node come
    back ``Created``. ``secret``: the cluster's, if it was given to the cluster as ``secret=``
    (the journal is authenticated with it; by default clusterpy's own secret is used).

    Raises:
        ConfigurationError: no ``recover_file``, or ``terminate_pending``.
        JournalError: the file is not a journal, or was written with another secret.
    """
    if terminate_pending:
        _refuse("terminate_pending", "recover_jobs collects results; it does not stop jobs")
    if recover_file is None:
        _refuse("recover_file=None", "clusterpy keeps a journal only when JobCluster(recover_file=...) names it")
    jobs = []
    for job in clusterpy.recover_jobs(recover_file, timeout=timeout, secret=secret or None):
        djob = DispyJob(job)
        if job.done():
            djob.finish.set()
        jobs.append(djob)
    return jobs
