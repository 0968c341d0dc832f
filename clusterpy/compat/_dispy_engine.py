"""The machinery under clusterpy.compat.dispy: engines, node allocation, ordered notifications.

::

    dispy JobCluster (user's thread)        engine = clusterpy JobCluster + hooks (loop thread)
    ------------------------------------    ----------------------------------------------------
    submit -> engine.submit_job             node connects -> _accept_node -> NodeTable.accept:
    DispyJob = view of the ClusterJob         NodeAllocate.allocate(...) -> CPUs, or refuse;
                                              this node's setup_args / depends / name / address
                                              -> link.deployment (its own bundle)
    job_status / cluster_status  <--------  _node_changed, _job_started, callback(job):
      (one notification thread, in order)     posted to the engine's callback thread

Every user callback runs on the engine's single callback thread, in the order the events
happened, as dispy's notification thread ran them.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from clusterpy._midjob import snapshot
from clusterpy.client import JobCluster as _JobCluster
from clusterpy._byvalue import pickle_by_value_if_local as _pickle_by_value_if_local
from clusterpy.errors import ClusterError
from clusterpy.job import JobStatus
from clusterpy.shared import SharedJobCluster as _SharedJobCluster

from ._dispy_node import NodeSide
from ._dispy_types import DispyJob, DispyNode, NodeAllocate, logger, node_ipaddr

if TYPE_CHECKING:
    from clusterpy._runtime import _NodeLink

__all__ = ["Engine", "SharedEngine", "NodeTable", "make_payload"]


def make_payload(compute: Callable[..., Any], setup: Any, cleanup: Any, objects: list[Any]) -> bytes:
    """Pickle the user's functions once, together (so they share one globals dict on the node)."""
    for fn in (compute, setup, cleanup, *objects):
        if callable(fn):
            _pickle_by_value_if_local(fn)
    return cloudpickle.dumps((compute, setup if callable(setup) else None, cleanup if callable(cleanup) else None,
                              list(objects)))


class _Hooks:
    """The engine's side of the hooks: hand them to the dispy cluster's NodeTable."""

    _table: "NodeTable"

    def _accept_node(self, link: "_NodeLink") -> bool:
        return self._table.accept(self, link)  # type: ignore[arg-type]

    def _node_changed(self, link: "_NodeLink", joined: bool) -> None:
        self._table.node_changed(self, link, joined)  # type: ignore[arg-type]

    def _job_started(self, job: Any, link: "_NodeLink") -> None:
        self._table.job_started(self, job, link)  # type: ignore[arg-type]

    def _job_done(self, job: Any) -> None:
        try:
            super()._job_done(job)  # type: ignore[misc]
        except RuntimeError:  # the callback thread is gone (interpreter exit): nobody to tell
            pass

    def _notify(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the callback thread, after every notification posted before."""
        pool = getattr(self, "_callbacks", None)
        if pool is None:
            return
        try:
            pool.submit(_safely, fn, *args)
        except RuntimeError:  # shut down (closing, or interpreter exit)
            pass


def _safely(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 -- a user's notification must not stop the others
        logger.exception("status notification %s failed", getattr(fn, "__name__", fn))


class Engine(_Hooks, _JobCluster):
    """clusterpy's JobCluster, with its node and job hooks handed to a NodeTable."""

    def __init__(self, table: "NodeTable", *args: Any, **kwargs: Any) -> None:
        self._table = table  # before super().__init__: nodes may connect while it runs
        super().__init__(*args, **kwargs)


class SharedEngine(_Hooks, _SharedJobCluster):
    """clusterpy's SharedJobCluster, hooked the same way (its one link is the scheduler)."""

    def __init__(self, table: "NodeTable", *args: Any, **kwargs: Any) -> None:
        self._table = table
        super().__init__(*args, **kwargs)


class NodeTable:
    """The dispy cluster's nodes: allocation when a node connects, DispyNode records and the
    notifications about nodes and jobs.

    ``accept``, ``node_changed``, ``job_started`` and ``job_ended`` run in the engine's loop
    thread and keep the records (so ``status()`` is up to date once ``job()`` returns); the
    notifications run later, in order, on the callback thread (``_notify``).

    Args:
        cluster: the dispy cluster (``allocate``'s first argument).
        allocs: the NodeAllocate objects (``nodes=``).
        deploy: builds a node's own deployment: ``deploy(engine, link, alloc)`` returns
            ``(DeployComputation, Dependencies)``; None: every node gets the cluster's.
        shared: the one link is a clusterpy-scheduler: no allocation.
    """

    def __init__(self, cluster: Any, allocs: list[NodeAllocate],
                 deploy: Callable[[Any, "_NodeLink", NodeAllocate], tuple[Any, Any]] | None, shared: bool) -> None:
        self.cluster = cluster
        self.allocs = sort_allocs(allocs)
        self.deploy = deploy
        self.shared = shared
        self.nodes: dict[str, DispyNode] = {}  # node id -> record, for nodes ready for jobs
        self.joining: dict[str, DispyNode] = {}  # accepted, computation being deployed
        self.refused: set[str] = set()  # node ids no allocation accepted
        self.closed: set[str] = set()  # node ids closed with close_node
        self.deallocated: set[str] = set()
        self.job_nodes: dict[str, DispyNode] = {}  # job key -> the node it runs on
        self.job_status: Callable[[Any], Any] | None = None
        self.cluster_status: Callable[[int, Any, Any], Any] | None = None
        self.view: Callable[[Any], Any] = lambda job: job  # ClusterJob -> DispyJob copy

    # ---------------------------------------------------------------- loop thread

    def accept(self, engine: Any, link: "_NodeLink") -> bool:
        """Decide whether and how the cluster uses a node that just connected."""
        node = DispyNode(link.ip_addr, link.hostname, link.cpus)
        node.port = link.port
        node._node_id = link.node_id
        if self.shared:
            self.joining[str(link.node_id)] = node
            return True
        if link.node_id in self.closed:
            return False
        platform = link.conn.peer_info.get("platform", "") if link.conn is not None else ""
        for alloc in self.allocs:
            if alloc.port and not alloc.wildcard and alloc.port != link.port and _default_allocate(alloc):
                continue  # several nodes may share an address: the port tells them apart
            try:
                cpus = alloc.allocate(self.cluster, link.ip_addr, link.hostname, link.cpus, None, platform)
            except Exception:  # noqa: BLE001 -- a broken allocate refuses the node, loudly
                logger.exception("allocate() of %r failed for node %s", alloc, link.name)
                continue
            if not cpus or cpus <= 0:
                continue
            cpus = min(link.cpus, int(cpus))
            if self.deploy is not None:
                try:
                    link.deployment = self.deploy(engine, link, alloc)
                except ClusterError as exc:
                    logger.warning("node %s not used: %s", link.name, exc)
                    return False
            link.cpus = node.cpus = cpus
            self.joining[str(link.node_id)] = node
            self.refused.discard(str(link.node_id))
            return True
        logger.debug("node %s (%s) not allocated to this cluster", link.name, link.ip_addr)
        self.refused.add(str(link.node_id))
        return False

    def node_changed(self, engine: Any, link: "_NodeLink", joined: bool) -> None:
        key = str(link.node_id)
        if joined:
            node = self.joining.pop(key, None)
            if node is not None:
                node.update_time = time.time()
                engine._notify(self._joined, node)  # first: told before anything a user does with the node
                self.nodes[key] = node
        else:
            self.joining.pop(key, None)
            self.deallocated.discard(key)
            node = self.nodes.pop(key, None)
            if node is not None:
                node.cpus = node.avail_cpus = node.busy = 0
                node.update_time = time.time()
                engine._notify(self._left, node)

    def job_started(self, engine: Any, job: Any, link: "_NodeLink") -> None:
        node = self.nodes.get(str(link.node_id))
        if node is not None:
            self.job_nodes[job._key] = node
            node.busy += 1
            node.update_time = time.time()
            engine._notify(self._running, snapshot(job), node)  # as it was when it started

    def job_ended(self, job: Any) -> None:
        """A job ended (its future was just resolved, before ``job()`` returns): count it."""
        node = self.job_nodes.get(job._key)
        if node is None:
            return
        node.busy = max(0, node.busy - 1)
        if job.status in (JobStatus.Finished, JobStatus.Terminated) and job.start_time and job.end_time:
            node.jobs_done += 1
            node.cpu_time += max(0.0, job.end_time - job.start_time)
        node.update_time = time.time()

    # ---------------------------------------------------------------- callback thread

    def _joined(self, node: DispyNode) -> None:
        if self.cluster_status is not None:
            self.cluster_status(DispyNode.Initialized, node, None)

    def _left(self, node: DispyNode) -> None:
        if self.cluster_status is not None:
            self.cluster_status(DispyNode.Closed, node, None)

    def _running(self, job: Any, node: DispyNode) -> None:
        if self.cluster_status is not None:
            self.cluster_status(DispyJob.Running, node, self.view(job))

    def job_changed(self, job: Any, final: bool) -> None:
        """A job sent a provisional result or ended (callback thread): tell."""
        node = self.job_nodes.pop(job._key, None) if final else self.job_nodes.get(job._key)
        view = self.view(job)
        if self.job_status is not None:
            self.job_status(view)
        if self.cluster_status is not None:
            self.cluster_status(view.status, node, view)

    # ---------------------------------------------------------------- queries (any thread)

    def find(self, spec: Any) -> DispyNode | None:
        """The node a dispy call names: a DispyNode, a host name, an IP address or ``host:port``."""
        nodes = list(self.nodes.values())
        if isinstance(spec, DispyNode):
            return next((n for n in nodes if n._node_id == spec._node_id), None) or next(
                (n for n in nodes if (n.ip_addr, n.port) == (spec.ip_addr, spec.port)), None)
        if not isinstance(spec, str):
            return None
        for node in nodes:
            if spec in (f"{node.ip_addr}:{node.port}", f"{node.name}:{node.port}", node._node_id):
                return node
        ip = node_ipaddr(spec)
        return next((n for n in nodes if spec in (n.ip_addr, n.name) or n.ip_addr == ip), None)


def _default_allocate(alloc: NodeAllocate) -> bool:
    """Does ``alloc`` decide with NodeAllocate's own ``allocate`` (which cannot see ports)?"""
    return getattr(type(alloc).allocate, "__func__", type(alloc).allocate) is NodeAllocate.allocate


def sort_allocs(allocs: list[NodeAllocate]) -> list[NodeAllocate]:
    """dispy's order: allocations by address pattern, descending (so ``"*"`` comes last), one per pattern and port."""
    seen: set[tuple[str, int | None]] = set()
    unique = []
    for alloc in allocs:
        key = (alloc.ip_rex, alloc.port)
        if key not in seen:
            seen.add(key)
            unique.append(alloc)
    return sorted(unique, key=lambda a: a.ip_rex, reverse=True)


def engine_nodes(allocs: list[NodeAllocate], default_port: int) -> list[str] | None:
    """clusterpy's ``nodes=`` for dispy allocations: explicit addresses and wildcard patterns;
    None when every allocation is a bare ``"*"`` (discover every node, else the local one)."""
    out: list[str] = []
    for alloc in allocs:
        ip = str(alloc.ip_addr)
        if alloc.wildcard:
            if ip == "*" and not alloc.port:
                out.append("*")
            else:
                out.append(f"{ip}:{alloc.port}" if alloc.port else ip)
        else:
            out.append(f"[{ip}]:{alloc.port or default_port}" if ":" in ip else f"{ip}:{alloc.port or default_port}")
    if all(n == "*" for n in out):
        return None
    return list(dict.fromkeys(out))


def split_depends(depends: Any) -> tuple[list[Any], list[Any]]:
    """dispy's ``depends``: (files and modules, functions and classes); an object stands for
    its class, a functools.partial for its function, as dispy shipped their source."""
    import functools
    import inspect
    import types

    if isinstance(depends, (str, os.PathLike)) or depends is None:
        depends = [depends] if depends else []
    files: list[Any] = []
    objects: list[Any] = []
    for dep in depends:
        if isinstance(dep, (str, os.PathLike, types.ModuleType)):
            files.append(dep)
        elif isinstance(dep, functools.partial):
            objects.append(dep.func)
        elif inspect.isfunction(dep) or inspect.isclass(dep):
            objects.append(dep)
        elif inspect.ismethod(dep):
            objects.append(type(dep.__self__))
        elif hasattr(dep, "__class__") and hasattr(dep, "__module__"):
            objects.append(type(dep))
        else:
            raise ClusterError(f"depends: cannot use {dep!r}")
    return files, objects


def check_dest_path(dest_path: Any) -> str | None:
    """dispy's ``dest_path`` (relative to the node's directory) as clusterpy's: one name."""
    if dest_path is None:
        return None
    if not isinstance(dest_path, str):
        raise ClusterError("dest_path must be a string")
    name = dest_path.strip().strip("/" + os.sep)
    if not name:
        return None
    if re.search(r"[/\\]", name):
        raise ClusterError(f"dest_path {dest_path!r}: clusterpy takes one directory name (no '/'): its "
                           "files go to that directory under each node's dest path")
    return name


def node_side_deploy(payload: bytes, name: str, files: list[Any], keep_files: bool, program: str | None
                     ) -> Callable[[Any, "_NodeLink", NodeAllocate], tuple[Any, Any]]:
    """The ``deploy`` of a NodeTable for a JobCluster: the node's own name and address in the
    computation's globals, its allocation's ``setup_args`` and extra ``depends``."""

    def deploy(engine: Any, link: "_NodeLink", alloc: NodeAllocate) -> tuple[Any, Any]:
        if not isinstance(alloc.setup_args, tuple):
            raise ClusterError(f"setup_args of {alloc!r} must be a tuple")
        extra = list(alloc.depends or [])
        if program is not None:
            found, message = engine._package(program, files + extra, None, (), None, keep_files)
        else:
            side = NodeSide(payload, name, {"name": link.hostname, "ip_addr": link.ip_addr})
            found, message = engine._package(side, files + extra, side.setup, alloc.setup_args, side.cleanup,
                                             keep_files)
        return message, found

    return deploy
