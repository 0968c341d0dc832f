"""The scheduling core's vocabulary: the events (facts) that go into
:meth:`~clusterpy.core.scheduler.SchedulerCore.handle`, the actions (commands) that come out
for a shell to execute, and the states of a job inside the core.

:mod:`clusterpy.core.scheduler` re-exports every name here: callers import them from there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "JobState",
    "NodeJoined",
    "NodeLost",
    "JobSubmitted",
    "JobsStarted",
    "JobReported",
    "CancelRequested",
    "NodeDistrusted",
    "NodeResized",
    "JobsRecalled",
    "DispatchJobs",
    "RecallJobs",
    "CancelOnNode",
    "DeliverResult",
    "ResolveJob",
    "Event",
    "Action",
]


class JobState(enum.Enum):
    # Members are singletons: identity hashing (C) instead of Enum's hash of the name (Python),
    # for the transition checks on every job.
    __hash__ = object.__hash__

    QUEUED = "queued"
    SENT = "sent"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"


# ---------------------------------------------------------------- events (facts)
# Events and actions are slotted dataclasses, immutable by convention: frozen ones cost 8x as
# much to construct, and a few are made per job.


@dataclass(slots=True)
class NodeJoined:
    """A node is connected and its computation is deployed: it can take jobs.

    ``speed``: its benchmark score (higher is faster); free slots on faster nodes are filled first.
    """

    node_id: str
    cpus: int
    speed: float = 1.0


@dataclass(slots=True)
class NodeLost:
    node_id: str
    reason: str


@dataclass(slots=True)
class JobSubmitted:
    """A job to place.

    ``group``: jobs of one group never run on the same node (replicas of one job that vote);
    ``exclude``: nodes this job must not run on (a node whose result failed verification);
    ``first_attempt``: attempts are numbered after it (a job submitted again after its earlier
    attempts ended keeps its attempt numbers unique, so a late report is never mistaken).
    """

    job_id: str
    node_id: str | None = None  # pin to this node (submit_node)
    reentrant: bool | None = None  # None: the core's default
    owner: str = ""  # whose job: queues are served round-robin across owners
    group: str | None = None
    exclude: frozenset[str] = frozenset()
    first_attempt: int = 0


@dataclass(slots=True)
class JobsStarted:
    node_id: str
    jobs: tuple[tuple[str, int], ...]  # (job_id, attempt)


@dataclass(slots=True)
class JobReported:
    """A node reported the end of one attempt of a job (result, exception, or worker death).

    ``worker_died``: the worker process died running it. A reentrant job is then tried again
    (preferably elsewhere) until it has failed ``allowed_failures`` times.
    """

    node_id: str
    job_id: str
    attempt: int
    worker_died: bool = False
    duration: float | None = None  # wall time of the job on the node, to learn its speed


@dataclass(slots=True)
class CancelRequested:
    job_id: str


@dataclass(slots=True)
class NodeDistrusted:
    """The node returned a wrong result: it gets no more jobs (those it runs go on)."""

    node_id: str
    reason: str


@dataclass(slots=True)
class NodeResized:
    """Use ``cpus`` CPUs of the node from now on (dispy's set_node_cpus); 0 stops using it."""

    node_id: str
    cpus: int


@dataclass(slots=True)
class JobsRecalled:
    """The node gave back these jobs (answering :class:`RecallJobs`) without starting them."""

    node_id: str
    jobs: tuple[tuple[str, int], ...]  # (job_id, attempt)


Event = (NodeJoined | NodeLost | JobSubmitted | JobsStarted | JobReported | CancelRequested | NodeDistrusted
         | NodeResized | JobsRecalled)


# ---------------------------------------------------------------- actions (commands)


@dataclass(slots=True)
class DispatchJobs:
    node_id: str
    jobs: tuple[tuple[str, int], ...]  # (job_id, attempt)


@dataclass(slots=True)
class CancelOnNode:
    node_id: str
    job_id: str
    attempt: int


@dataclass(slots=True)
class RecallJobs:
    """Ask the node to give back these jobs if it has not started them (JobsRecalled)."""

    node_id: str
    jobs: tuple[tuple[str, int], ...]  # (job_id, attempt)


@dataclass(slots=True)
class DeliverResult:
    """The report for the current attempt: hand its outcome to the caller."""

    job_id: str
    attempt: int


@dataclass(slots=True)
class ResolveJob:
    """The job ended without a report of its own: ``state`` is CANCELLED or ABANDONED."""

    job_id: str
    state: JobState
    reason: str


Action = DispatchJobs | CancelOnNode | RecallJobs | DeliverResult | ResolveJob
