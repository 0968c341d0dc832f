"""Adapters: a read-only snapshot of a running JobCluster or clusterpy-scheduler, and its actions.

Both adapters run in the event loop that owns the runtime they read (the monitor's HTTP server
runs in that same loop), so a snapshot is consistent without locks and never blocks the loop
for long: it is one pass over the nodes and the unfinished jobs. The snapshot is a plain
JSON-ready dict; its shape (documented in docs/MONITOR.md) is the same for both::

    kind, name, time, uptime, closing, submitted,
    counts {Created, Running, Finished, Terminated, Cancelled, Abandoned},
    nodes [{name, node_id, ip_addr, hostname, cpus, busy, jobs_done, failures, cpu_time,
            last_pulse, state}],
    throughput {interval, values}, running [{key, id, node, started, owner}], running_total,
    failures [{key, id, status, node, when, error, traceback, owner}], computations [...]

The only changes they make are the two actions: cancel a job, stop using a node.
"""

from __future__ import annotations

import functools
import logging
import reprlib
import time
import traceback as tb_mod
from typing import Any, Protocol

from ._history import FAILED, STATUSES, Ended, JobHistory, status_of_report

__all__ = [
    "MonitorSource", "ClusterSource", "SchedulerSource", "job_ended", "record_job", "report_ended", "resolved_ended",
]

log = logging.getLogger("clusterpy.monitor")

MAX_RUNNING = 100  # running jobs listed in one snapshot (the total is given too)
_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


class MonitorSource(Protocol):
    """What the HTTP server needs from the thing it shows (called in the owner's event loop)."""

    kind: str

    def snapshot(self) -> dict[str, Any]: ...
    def cancel(self, key: str) -> bool: ...
    def stop_node(self, name: str) -> bool: ...


def _label(value: Any) -> str:
    try:
        return value if isinstance(value, str) else _short.repr(value)
    except Exception:  # a user's __repr__ may raise: the monitor must not
        return f"<{type(value).__name__}>"


# ------------------------------------------------------------------ feeding a JobHistory


def job_ended(job: Any) -> Ended:
    """The record of a finished :class:`~clusterpy.job.ClusterJob` (client side)."""
    return _describe(job._key, job.id, job.status.value, job.node_id, job.cpu_time or 0.0,
                     job.end_time or time.time(), job.exception, job.stderr)


def record_job(history: JobHistory, job: Any, now: float) -> None:
    """Count a finished :class:`~clusterpy.job.ClusterJob` in ``history`` (the client's per-job
    hook while a monitor runs; ``now``: monotonic seconds).

    A job that did not fail is only counted: no record, no label. A failure is kept as a
    function of the few fields its record needs (not the job, whose arguments and result may
    be large), formatted only if a page reads it while it is among the latest.
    """
    status = job.status.value
    cpu_time = job.cpu_time or 0.0
    if status not in FAILED:
        history.count(status, job.node_id, cpu_time, now)
        return
    history.add_lazy(status, job.node_id, cpu_time, now,
                     functools.partial(_describe, job._key, job.id, status, job.node_id, cpu_time,
                                       job.end_time or time.time(), job.exception, job.stderr))


def _describe(key: str, job_id: Any, status: str, node: str | None, cpu_time: float, when: float,
              exc: BaseException | None, stderr: str) -> Ended:
    error = traceback = None
    if status in FAILED and exc is not None:
        try:
            error = f"{type(exc).__name__}: {exc}"
        except Exception:  # a user's __str__ may raise: the monitor must not
            error = type(exc).__name__
        cause = exc.__cause__
        remote = getattr(cause, "tb", None)
        if isinstance(remote, str):
            traceback = remote.strip().strip('"').strip()
        elif exc.__traceback__ is not None:
            traceback = "".join(tb_mod.format_exception(exc))
        if stderr:
            traceback = (traceback or "") + f"\n--- stderr ---\n{stderr[-4000:]}"
    return Ended(key, _label(job_id), status, node, cpu_time, when, error, traceback)


def report_ended(key: str, msg: Any, node_id: str | None, owner: str) -> Ended:
    """The record of a node's ``JobDone`` report (scheduler side: it never unpickles)."""
    status = status_of_report(msg.status)
    error = traceback = None
    if status in FAILED:
        error = f"{msg.exc_type or msg.status}: {msg.exc_message or ''}".rstrip(": ")
        traceback = msg.traceback
    return Ended(key, msg.job_id, status, node_id, msg.cpu_time, msg.end_time, error, traceback, owner)


def resolved_ended(key: str, job_id: str, cancelled: bool, reason: str, owner: str) -> Ended:
    """The record of a job the scheduling core resolved itself (cancelled, or abandoned)."""
    status = "Cancelled" if cancelled else "Abandoned"
    return Ended(key, job_id, status, None, 0.0, time.time(), None if cancelled else f"NodeLostError: {reason}",
                 None, owner)


# ------------------------------------------------------------------ helpers


def _node_state(link: Any, connected: bool, permanent: tuple[type[BaseException], ...]) -> str:
    if connected:
        return "connected"
    if getattr(link, "stopped", False):
        return "stopped"
    if isinstance(link.error, permanent):
        return "refused"
    if getattr(link, "joined", False) or link.node_id is not None:
        return "lost"
    return "connecting"


def _failure(e: Ended, node_names: dict[str, str]) -> dict[str, Any]:
    return {"key": e.key, "id": e.job_id, "status": e.status, "node": node_names.get(e.node or "", e.node),
            "when": e.when, "error": e.error, "traceback": e.traceback, "owner": e.owner}


def _base(kind: str, name: str, started: float, history: JobHistory, pending: dict[str, int]) -> dict[str, Any]:
    counts = {s: 0 for s in STATUSES}
    counts.update(pending)
    for status, n in history.counts.items():
        counts[status] = counts.get(status, 0) + n
    now = time.monotonic()
    return {
        "kind": kind, "name": name, "time": time.time(), "uptime": now - started, "counts": counts,
        "throughput": {"interval": 1, "values": history.throughput.series(now)},
    }


# ------------------------------------------------------------------ JobCluster


class ClusterSource:
    """Reads a JobCluster's ``_Runtime`` (clusterpy/client.py)."""

    kind = "cluster"

    def __init__(self, runtime: Any) -> None:
        from ..errors import AuthenticationError, VersionMismatchError

        self.rt = runtime
        self.started = time.monotonic()
        self._permanent = (AuthenticationError, VersionMismatchError)

    def _connected(self, link: Any) -> bool:
        return link.node_id is not None and self.rt.by_node.get(link.node_id) is link

    def snapshot(self) -> dict[str, Any]:
        rt, now = self.rt, time.monotonic()
        history: JobHistory = rt.history
        names: dict[str, str] = {}
        nodes = []
        for link in rt.links:
            connected = self._connected(link)
            if link.node_id is not None:
                names[link.node_id] = link.name
            tally = history.nodes.get(link.node_id or "")
            nodes.append({
                "name": link.name, "node_id": link.node_id, "ip_addr": link.ip_addr, "hostname": link.hostname,
                "cpus": link.cpus, "busy": rt.core.inflight(link.node_id) if connected else 0,
                "jobs_done": link.jobs_done, "failures": tally.failures if tally else 0,
                "cpu_time": link.cpu_time, "last_pulse": now - link.last_heard if link.last_heard else None,
                "state": _node_state(link, connected, self._permanent),
            })
        pending = {"Created": 0, "Running": 0}
        running = []
        for key, entry in rt.jobs.items():
            job = entry[0]
            if job.status.value == "Running":
                pending["Running"] += 1
                running.append((job.start_time or 0.0, key, job))
            else:
                pending["Created"] += 1
        running.sort(key=lambda r: (r[0], r[1]))
        out = _base("cluster", rt.cluster.computation_name, self.started, history, pending)
        out.update({
            "closing": rt.closing, "submitted": rt.cluster._jobs_submitted, "nodes": nodes,
            "running": [{"key": key, "id": _label(job.id), "node": self._node_of(key), "started": started,
                         "owner": ""} for started, key, job in running[:MAX_RUNNING]],
            "running_total": len(running),
            "failures": [_failure(e, names) for e in history.latest_failures()],
            "computations": [],
        })
        return out

    def _node_of(self, key: str) -> str | None:
        try:
            node_id = self.rt.core.node_of(key)
        except KeyError:
            return None
        link = self.rt.by_node.get(node_id) if node_id is not None else None
        return str(link.name) if link is not None else node_id

    def cancel(self, key: str) -> bool:
        entry = self.rt.jobs.get(key)
        if entry is None:
            return False
        log.warning("cancelling job %r (monitor request)", entry[0].id)
        return bool(self.rt.cluster.cancel(entry[0]))

    def stop_node(self, name: str) -> bool:
        for link in self.rt.links:
            if link.name == name and not getattr(link, "stopped", False):
                log.warning("no longer using node %s (monitor request)", name)
                link.stop("stopped from the monitor")
                return True
        return False


# ------------------------------------------------------------------ clusterpy-scheduler


class SchedulerSource:
    """Reads a :class:`~clusterpy.scheduler.SchedulerServer`."""

    kind = "scheduler"

    def __init__(self, sched: Any) -> None:
        from ..nodelink import PERMANENT

        self.sched = sched
        self.started = time.monotonic()
        self._permanent = PERMANENT

    def snapshot(self) -> dict[str, Any]:
        from ..core.scheduler import JobState

        s, now = self.sched, time.monotonic()
        history: JobHistory = s.history
        names: dict[str, str] = {}
        nodes = []
        for link in s.links:
            connected = link.up and link.node_id is not None and s.by_node.get(link.node_id) is link
            if link.node_id is not None:
                names[link.node_id] = link.name
            tally = history.nodes.get(link.node_id or "")
            nodes.append({
                "name": link.name, "node_id": link.node_id, "ip_addr": link.ip_addr, "hostname": link.hostname,
                "cpus": link.cpus, "busy": s.core.inflight(link.node_id) if connected else 0,
                "jobs_done": tally.done if tally else 0, "failures": tally.failures if tally else 0,
                "cpu_time": tally.cpu_time if tally else 0.0,
                "last_pulse": now - link.last_heard if link.last_heard else None,
                "state": _node_state(link, connected, self._permanent),
            })
        pending = {"Created": 0, "Running": 0}
        per_comp: dict[str, dict[str, int]] = {}
        running = []
        for key, job in s.jobs.items():
            comp_id = job.comp.comp_id
            try:
                state = s.core.state_of(key)
            except KeyError:
                continue
            status = "Running" if state is JobState.RUNNING else "Created"
            pending[status] += 1
            per_comp.setdefault(comp_id, {"Created": 0, "Running": 0})[status] += 1
            if state is JobState.RUNNING:
                running.append((getattr(job, "started", None) or 0.0, key, job))
        running.sort(key=lambda r: (r[0], r[1]))
        out = _base("scheduler", f"clusterpy-scheduler {s.host}:{s.port}", self.started, history, pending)
        comps = []
        for comp in s.comps.values():
            counts = dict(per_comp.get(comp.comp_id, {"Created": 0, "Running": 0}))
            counts.update(history.owners.get(comp.comp_id, {}))
            comps.append({"comp_id": comp.comp_id, "ready": comp.ready,
                          "client": "connected" if comp.owner is not None else "gone", "counts": counts})
        out.update({
            "closing": s._closed.is_set(), "submitted": sum(pending.values()) + history.ended(), "nodes": nodes,
            "running": [{"key": key, "id": job.request.job_id, "node": self._node_of(key),
                         "started": started or None, "owner": job.comp.comp_id}
                        for started, key, job in running[:MAX_RUNNING]],
            "running_total": len(running),
            "failures": [_failure(e, names) for e in history.latest_failures()],
            "computations": comps,
        })
        return out

    def _node_of(self, key: str) -> str | None:
        try:
            node_id = self.sched.core.node_of(key)
        except KeyError:
            return None
        link = self.sched.by_node.get(node_id) if node_id is not None else None
        return str(link.name) if link is not None else node_id

    def cancel(self, key: str) -> bool:
        from ..core.scheduler import CancelRequested

        if key not in self.sched.jobs:
            return False
        log.warning("cancelling job %s (monitor request)", key)
        self.sched.execute(self.sched.core.handle(CancelRequested(key)))
        return True

    def stop_node(self, name: str) -> bool:
        for link in self.sched.links:
            if link.name == name and not link.stopped:
                from ..protocol import messages as m

                log.warning("no longer using node %s (monitor request)", name)
                # Close our computations there first, so the node stops their jobs and frees
                # their files instead of keeping them for a scheduler that will not come back.
                for comp in self.sched.comps.values():
                    if link.node_id is not None and link.node_id in comp.deployed:
                        link.send(m.CloseComputation(comp.comp_id, comp.deploy.keep_files))
                link.stop()
                return True
        return False
