"""The client's shell around :class:`clusterpy.core.trust.TrustCore` (``verify=``, ``replicas=``).

::

    JobCluster.submit -> TaskSubmitted -> RunReplica -> scheduler core JobSubmitted(replica id,
                                                        group=task, exclude=nodes already used)
    node JobDone (DeliverResult for a replica) -> digest of its outcome -> ReplicaReported
        CheckResult -> user's verify(result, *args) in a thread -> ReplicaVerified
        DeliverOutcome -> the job resolves with that replica's report
        FailTask -> VerificationError (or JobCancelledError)
        DistrustNode -> scheduler core NodeDistrusted: the node gets no more jobs
    scheduler ResolveJob for a replica (node lost, cancelled) -> ReplicaLost

Every replica of a job is a job of the scheduling core with its own id (``"<key>#<n>"``), held
in the runtime's ``jobs`` table next to the plain jobs, so the node protocol, placement and
cancellation need nothing new. Runs only in the cluster's event-loop thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Callable

from . import _userdata
from ._remote import Call, Chunk
from .core.scheduler import CancelRequested, JobState, JobSubmitted, NodeDistrusted, ResolveJob
from .core.trust import (
    CancelReplica,
    CheckResult,
    DeliverOutcome,
    DistrustNode,
    FailTask,
    ReplicaLost,
    ReplicaNotNeeded,
    ReplicaReported,
    ReplicaVerified,
    RunReplica,
    TaskCancelled,
    TaskSubmitted,
    TrustAction,
    TrustCore,
    TrustEvent,
)
from .errors import JobCancelledError, VerificationError
from .job import ClusterJob, JobStatus, apply_report
from .progress import DROPPED
from .protocol import messages as m

if TYPE_CHECKING:
    from ._runtime import _NodeLink, _Runtime

__all__ = ["TrustShell"]

log = logging.getLogger("clusterpy.trust")

_OUTCOMES = ("finished", "exception", "setup_failed")


def outcome_digest(msg: m.JobDone) -> tuple[str, bool]:
    """(digest, checkable) of a replica's outcome: equal results (pickled bytes) or equal
    exceptions (type and message) give equal digests; only results can be verified."""
    h = hashlib.sha256()
    if msg.status == "finished":
        h.update(b"R")
        for part in _userdata.parts(msg.result):
            h.update(part)
        return h.hexdigest(), msg.result is not None
    h.update(f"E{msg.exc_type}\0{msg.exc_message}".encode("utf-8", "replace"))
    return h.hexdigest(), False


def check_result(verify: Callable[..., Any], job: ClusterJob, blob: _userdata.Payload) -> tuple[bool, str]:
    """Run ``verify(result, *args, **kwargs)`` (per item for a map chunk); (passed, why not).

    A result dropped by ``only_if`` passes (there is nothing to check); an exception raised
    by ``verify`` counts as a failed check."""
    try:
        result = _userdata.loads(blob)
        args, kwargs = job.args, job.kwargs
        if result is DROPPED:
            return True, ""
        if args and isinstance(args[0], Chunk) and isinstance(result, list):
            chunk = args[0]
            if len(result) != len(chunk.items):
                return False, f"{len(result)} results for {len(chunk.items)} items"
            for offset, (item, value) in enumerate(zip(chunk.items, result)):
                if value is not DROPPED and not verify(value, *item):
                    return False, f"item {chunk.start + offset} of the map"
            return True, ""
        if args and isinstance(args[0], Call):
            args = args[1:]
        if verify(result, *args, **kwargs):
            return True, ""
        return False, "verify returned false"
    except Exception as exc:  # noqa: BLE001 -- a result that breaks verify is not trusted
        return False, f"verify raised {type(exc).__name__}: {exc}"


class TrustShell:
    """Drives the trust core for one cluster's runtime (see the module docstring)."""

    def __init__(self, rt: "_Runtime", *, verify: Callable[..., Any] | None, replicas: int,
                 replicate_fraction: float, max_reruns: int, distrust_after: int, rerun_untrusted: bool) -> None:
        self.rt = rt
        self.verify = verify
        self.core = TrustCore(verify=verify is not None, replicas=replicas, replicate_fraction=replicate_fraction,
                              max_reruns=max_reruns, distrust_after=distrust_after, rerun_untrusted=rerun_untrusted)
        self.tasks: dict[str, ClusterJob] = {}
        self.payload: dict[str, tuple[bytes, float | None]] = {}  # task -> (pickled args, timeout)
        # Each awaited replica's end: ("report", link, JobDone) or ("resolved", JobStatus, exception).
        self.outcomes: dict[str, tuple[Any, ...]] = {}

    # ------------------------------------------------------------ from the runtime

    def manages(self, job: ClusterJob) -> bool:
        """The job's runs go through the trust core (or it ended and a late replica of it runs)."""
        return job._key in self.tasks or job.done()

    def submit(self, job: ClusterJob, args: bytes, timeout: float | None) -> None:
        self.tasks[job._key] = job
        self.payload[job._key] = (args, timeout)
        self.handle(TaskSubmitted(job._key))

    def cancel(self, job: ClusterJob) -> None:
        if job._key in self.tasks:
            self.handle(TaskCancelled(job._key))

    def on_done(self, link: "_NodeLink", msg: m.JobDone) -> None:
        """The scheduler delivered a replica's report."""
        assert link.node_id is not None
        self._ended(msg.job_id)
        if not self.core.knows(msg.job_id):
            return  # cancelled, discarded, or no longer needed
        self.outcomes[msg.job_id] = ("report", link, msg)
        if msg.status in _OUTCOMES:
            digest, checkable = outcome_digest(msg)
            self.handle(ReplicaReported(msg.job_id, link.node_id, digest, checkable))
        else:  # died, terminated (timeout), cancelled on the node: no outcome to vote with
            self.handle(ReplicaLost(msg.job_id, msg.exc_message or msg.status))
        if not self.core.knows(msg.job_id):  # judged and done with (a late replica)
            self.outcomes.pop(msg.job_id, None)

    def on_resolved(self, action: ResolveJob, status: JobStatus, exc: BaseException) -> None:
        """The scheduler ended a replica without a report (node lost, cancelled)."""
        self._ended(action.job_id)
        if self.core.knows(action.job_id):
            self.outcomes[action.job_id] = ("resolved", status, exc)
            self.handle(ReplicaLost(action.job_id, action.reason))
            if not self.core.knows(action.job_id):
                self.outcomes.pop(action.job_id, None)

    def _ended(self, replica_id: str) -> None:
        """A replica's scheduler job ended: the cluster is idle once nothing at all runs."""
        rt = self.rt
        rt.jobs.pop(replica_id, None)
        if not rt.jobs and not rt.dependents:
            rt.idle.set()

    # ------------------------------------------------------------ core plumbing

    def handle(self, event: TrustEvent) -> None:
        pending: list[TrustAction] = self.core.handle(event)
        while pending:
            action = pending.pop(0)
            pending.extend(self._execute(action))

    def _execute(self, action: TrustAction) -> list[TrustAction]:
        rt = self.rt
        if isinstance(action, RunReplica):
            job = self.tasks[action.task_id]
            args, timeout = self.payload[action.task_id]
            if action.exclude and rt.by_node and all(n in action.exclude or rt.core.distrusted(n) for n in rt.by_node):
                self.outcomes[action.replica_id] = ("resolved", JobStatus.Terminated, None)
                return self.core.handle(ReplicaLost(action.replica_id, "no other trusted node to run it on"))
            rt.jobs[action.replica_id] = (job, args, timeout)
            rt.execute(rt.core.handle(JobSubmitted(action.replica_id, group=action.group, exclude=action.exclude)))
        elif isinstance(action, CheckResult):
            kind, _link, msg = self.outcomes[action.replica_id]
            job = self.tasks[self.core.task_of(action.replica_id) or ""]
            rt.spawn(self._check(action.replica_id, job, msg.result))
        elif isinstance(action, (CancelReplica, ReplicaNotNeeded)):
            self.outcomes.pop(action.replica_id, None)
            try:
                state = rt.core.state_of(action.replica_id)
            except KeyError:
                return []
            if isinstance(action, CancelReplica) or state is JobState.QUEUED:
                rt.execute(rt.core.handle(CancelRequested(action.replica_id)))
        elif isinstance(action, DeliverOutcome):
            self._deliver(action)
        elif isinstance(action, FailTask):
            job = self.tasks.pop(action.task_id)
            self._drop_outcomes(action.task_id)
            if action.cancelled:
                self._finish(job, JobStatus.Cancelled, exc=JobCancelledError(f"job {job.id!r} was cancelled"))
            else:
                rt.stats.verdict(job._key, "failed")
                self._finish(job, JobStatus.Terminated,
                             exc=VerificationError(f"job {job.id!r} has no trustworthy result: {action.reason}"))
        elif isinstance(action, DistrustNode):
            link = rt.by_node.get(action.node_id)
            log.warning("node %s is no longer trusted: %s; it gets no more jobs",
                        link.name if link is not None else action.node_id, action.reason)
            rt.execute(rt.core.handle(NodeDistrusted(action.node_id, action.reason)))
        else:  # pragma: no cover - a new action type must be handled here
            raise TypeError(action)
        return []

    def _deliver(self, action: DeliverOutcome) -> None:
        rt = self.rt
        job = self.tasks.pop(action.task_id)
        outcome = self.outcomes.pop(action.replica_id)
        self._drop_outcomes(action.task_id)
        rt.stats.verdict(job._key, action.verdict)
        if outcome[0] == "report":
            _, link, msg = outcome
            rt.record("done", job._key, link.node_id, msg)  # the job's own key: recover_jobs knows it
            status, result, exc = apply_report(job, msg, ip_addr=link.ip_addr, node_id=link.node_id,
                                               hostname=link.hostname, where=f"on node {link.name}")
            self._finish(job, status, result=None if result is DROPPED else result, exc=exc)
        else:
            _, status, exc = outcome
            if exc is None:
                exc = VerificationError(f"job {job.id!r} has no trustworthy result: no other trusted node to run it on")
            self._finish(job, status, exc=exc)

    def _finish(self, job: ClusterJob, status: JobStatus, *, result: Any = None,
                exc: BaseException | None = None) -> None:
        """Resolve the job. Its first replica's id is the job's key: if the scheduler still
        holds that replica (running to be judged, or being cancelled), its table entry stays
        until the node reports it."""
        rt = self.rt
        entry = rt.jobs.get(job._key)
        rt.finish(job, status, result=result, exc=exc)
        if entry is not None and rt.core.attempt_of(job._key) is not None:
            rt.jobs[job._key] = entry
            rt.idle.clear()

    def _drop_outcomes(self, task_id: str) -> None:
        self.payload.pop(task_id, None)
        for rid in [r for r in self.outcomes if r == task_id or r.startswith(task_id + "#")]:
            del self.outcomes[rid]

    async def _check(self, replica_id: str, job: ClusterJob, blob: bytes) -> None:
        assert self.verify is not None
        passed, why = await asyncio.to_thread(check_result, self.verify, job, blob)
        if not self.rt.closing:
            self.handle(ReplicaVerified(replica_id, passed, why))
            if not self.core.knows(replica_id):
                self.outcomes.pop(replica_id, None)
