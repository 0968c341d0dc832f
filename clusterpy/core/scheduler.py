"""The scheduling core: which job runs where, as a pure state machine.

Events (past-tense facts) go in through :meth:`SchedulerCore.handle`; a list of actions
(commands) comes out for a shell to execute. The core never touches sockets, clocks or
threads, so the client (:mod:`clusterpy.client`) and tests drive the very same object. The
events and actions are defined in :mod:`.events` and re-exported here.

Job lifecycle inside the core (a job's public status is derived from it by the shell)::

    QUEUED --dispatch--> SENT --started--> RUNNING --done--> DONE
       ^                   |                  |
       +---- node lost, reentrant (attempt+1) +
    QUEUED/SENT/RUNNING --node lost, not reentrant--> ABANDONED
    QUEUED --cancel--> CANCELLED;  SENT/RUNNING --cancel--> (CancelOnNode, then DONE when reported)

Placement: every ready node keeps up to ``cpus * (1 + prefetch)`` jobs in flight, so a node's
CPUs never wait for a network round trip. With ``prefetch=None`` (adaptive) it is 1 job ahead
per CPU, and more (up to :data:`MAX_AHEAD`) on a node whose jobs typically end within
:data:`SHORT_JOB`: there a round trip is as long as several jobs. Free slots are handed out
round-robin over the nodes that have them, which is O(1) per decision whatever the number of
nodes or queued jobs.
Each dispatch carries an attempt number; a report for an attempt that is no longer current
(a node that came back after its jobs were moved) is discarded, so each job is resolved once.

Work stealing: prefetched jobs wait in a node's queue behind the ones running. Once the global
queue is empty, a node with an idle CPU recalls (:class:`RecallJobs`) jobs still waiting on a
node whose CPUs are all busy; jobs the node gives back unstarted (:class:`JobsRecalled`) run
on the idle node, so a slow job never holds back the jobs queued behind it. A node that has
already started a recalled job just runs it (its JobsStarted ends the recall).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .events import (
    Action,
    CancelOnNode,
    CancelRequested,
    DeliverResult,
    DispatchJobs,
    Event,
    JobReported,
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
)
from .fairqueue import FairQueue
from .placement import FreeNodes, SpeedModel

# The events and actions are part of this module's interface (callers import them from here;
# mypy needs the names spelled out to see them re-exported).
__all__ = ["SchedulerCore", "JobState", "NodeJoined", "NodeLost", "JobSubmitted", "JobsStarted",
           "JobReported", "CancelRequested", "NodeDistrusted", "NodeResized", "JobsRecalled", "DispatchJobs",
           "RecallJobs", "CancelOnNode", "DeliverResult", "ResolveJob", "Event", "Action"]


#: Adaptive prefetch: jobs that typically end within this many seconds get more jobs ahead...
SHORT_JOB = 0.002
#: ... up to this many per CPU.
MAX_AHEAD = 4


# Enum members read through their class cost ~100 ns each in Python 3.11 (EnumType has a
# __getattr__ hook), ten times a module global: the per-job paths use these names.
_QUEUED, _SENT, _RUNNING, _DONE = JobState.QUEUED, JobState.SENT, JobState.RUNNING, JobState.DONE

# Added to the speed of a free node with an idle CPU: far above any speed score.
_IDLE_FIRST = 1e12

_TERMINAL = frozenset({JobState.DONE, JobState.CANCELLED, JobState.ABANDONED})

# Declared lifecycle; _move() refuses anything else and leaves the job unchanged.
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.SENT, JobState.CANCELLED, JobState.ABANDONED}),
    JobState.SENT: frozenset({JobState.RUNNING, JobState.DONE, JobState.QUEUED, JobState.ABANDONED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.QUEUED, JobState.ABANDONED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.ABANDONED: frozenset(),
}


# ---------------------------------------------------------------- state


@dataclass(slots=True)
class _Job:
    job_id: str
    pinned: str | None
    reentrant: bool
    owner: str = ""
    group: str | None = None
    exclude: frozenset[str] = frozenset()
    state: JobState = JobState.QUEUED
    node_id: str | None = None
    attempt: int = 0
    failures: int = 0  # nodes lost / workers killed while running this job
    cancel_requested: bool = False
    recalled_by: str | None = None  # the idle node a recall of this (SENT) job is for


@dataclass(slots=True)
class _Node:
    node_id: str
    cpus: int
    limit: int
    inflight: dict[str, None] = field(default_factory=dict)  # ordered set: dispatch order
    pinned_queue: deque[str] = field(default_factory=deque)
    jobs_done: int = 0
    distrusted: bool = False
    running: int = 0  # inflight jobs the node reported started
    awaiting: int = 0  # jobs recalled for this node, not given back (or started) yet


def _ahead_for(typical: float) -> int:
    """Adaptive prefetch: jobs sent ahead per CPU to a node whose jobs typically take
    ``typical`` seconds (more for short jobs, whose round trip is as long as several jobs)."""
    if typical >= SHORT_JOB:  # the common cases first, without the division
        return 1
    if typical * (MAX_AHEAD - 1) < SHORT_JOB:
        return MAX_AHEAD
    return min(MAX_AHEAD, math.ceil(SHORT_JOB / typical))  # 2 .. MAX_AHEAD - 1 here


def _has_jobs_behind_busy_cpus(node: _Node) -> bool:
    """Whether all of ``node``'s CPUs run jobs and more wait there: jobs work stealing may take."""
    return node.cpus <= node.running < len(node.inflight)


class SchedulerCore:
    """Decides placement of jobs on nodes.

    Args:
        prefetch: jobs sent ahead per CPU beyond the CPU count (hides the round trip); None:
            adaptive (1, up to MAX_AHEAD for nodes whose jobs are shorter than SHORT_JOB).
        reentrant: default for jobs on a lost node: resubmit (True) or abandon (False).
        allowed_failures: a job whose attempts were lost this many times is abandoned
            instead of being resubmitted again (a poison job must not kill every node).
        steal: recall jobs waiting behind busy CPUs for nodes with idle ones (see above).
    """

    #: How many queued jobs a node may pass over (they exclude it) looking for one it can run.
    SCAN = 64
    #: How many nodes one event may look at for work stealing.
    STEAL_SCAN = 64

    def __init__(self, *, prefetch: int | None = 1, reentrant: bool = False, allowed_failures: int = 3,
                 steal: bool = True) -> None:
        self.prefetch = prefetch
        self.steal = steal
        self.reentrant = reentrant
        self.allowed_failures = allowed_failures
        self._jobs: dict[str, _Job] = {}
        self._nodes: dict[str, _Node] = {}
        self._queue = FairQueue()  # jobs any node may run
        self._free = FreeNodes()  # nodes with a free slot, fastest first
        self.speeds = SpeedModel()
        self._group_nodes: dict[str, set[str]] = {}  # group -> nodes that ran one of its jobs
        self._group_size: dict[str, int] = {}  # group -> its unfinished jobs
        self._constrained = 0  # queued jobs with an exclude set or a group
        self._ring: list[str] = []  # node ids, for bounded work-stealing scans
        self._ring_cursor = 0
        #: Nodes whose freed slots reports left to :meth:`refill` (``report(..., refill=False)``),
        #: in order (read-only for callers: an attribute, not a method, as it is read per job).
        self.owed: dict[str, None] = {}

    # ------------------------------------------------------------ queries

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    def state_of(self, job_id: str) -> JobState:
        return self._jobs[job_id].state

    def node_of(self, job_id: str) -> str | None:
        return self._jobs[job_id].node_id

    def attempt_of(self, job_id: str) -> int | None:
        """The current attempt of an unfinished job (None if it ended): a node's message about
        any other attempt is stale."""
        job = self._jobs.get(job_id)
        return None if job is None else job.attempt

    def pending(self) -> int:
        """Jobs not yet in a terminal state."""
        return len(self._jobs)

    def jobs_of(self, owner: str) -> list[str]:
        """Unfinished jobs of one owner (for a client that left: cancel them)."""
        return [j.job_id for j in self._jobs.values() if j.owner == owner]

    def queued(self) -> int:
        return len(self._queue) + sum(len(n.pinned_queue) for n in self._nodes.values())

    def inflight(self, node_id: str) -> int:
        return len(self._nodes[node_id].inflight)

    def distrusted(self, node_id: str) -> bool:
        return self._nodes[node_id].distrusted

    # ------------------------------------------------------------ events

    def handle(self, event: Event) -> list[Action]:
        """Apply one event and return the actions it calls for."""
        if isinstance(event, JobSubmitted):
            return self._on_submitted(event)
        if isinstance(event, JobReported):
            delivered, actions = self.report(event.node_id, event.job_id, event.attempt, event.worker_died,
                                             event.duration)
            return [DeliverResult(event.job_id, event.attempt), *actions] if delivered else actions
        if isinstance(event, JobsStarted):
            return self._on_started(event)
        if isinstance(event, NodeJoined):
            return self._on_node_joined(event)
        if isinstance(event, NodeLost):
            return self._on_node_lost(event)
        if isinstance(event, CancelRequested):
            return self._on_cancel(event)
        if isinstance(event, NodeDistrusted):
            return self._on_distrusted(event)
        if isinstance(event, NodeResized):
            return self._on_resized(event)
        if isinstance(event, JobsRecalled):
            return self._on_recalled(event)
        raise TypeError(f"not a scheduler event: {event!r}")

    # The two events of every job have entry points of their own, taking the event's fields
    # (handle() forwards those events to them): a shell that submits and reports thousands
    # of short jobs a second builds no event object per job just to have it unpacked here.

    def submit(self, job_id: str) -> list[Action]:
        """``handle(JobSubmitted(job_id))``: a plain job (not pinned, no group or exclusion,
        the core's default reentrancy), the common case of a client.

        Raises:
            ValueError: ``job_id`` was already submitted (and has not ended).
        """
        jobs = self._jobs
        if job_id in jobs:
            raise ValueError(f"job {job_id!r} was already submitted")
        jobs[job_id] = _Job(job_id, None, self.reentrant)
        queue = self._queue
        waiting = queue.size
        queue.append(job_id, "")
        if waiting and not self._constrained:
            return []  # jobs already waited, none constrained: no node has room (see validate)
        return self._place_queued() if self._free else []

    def _on_submitted(self, ev: JobSubmitted) -> list[Action]:
        if ev.job_id in self._jobs:
            raise ValueError(f"job {ev.job_id!r} was already submitted")
        reentrant = self.reentrant if ev.reentrant is None else ev.reentrant
        job = _Job(ev.job_id, ev.node_id, reentrant, ev.owner, ev.group, ev.exclude, attempt=ev.first_attempt)
        self._jobs[ev.job_id] = job
        if job.group is not None:
            self._group_size[job.group] = self._group_size.get(job.group, 0) + 1
        if ev.node_id is not None:
            node = self._nodes.get(ev.node_id)
            if node is None:
                self._finish(job, JobState.ABANDONED)
                return [ResolveJob(ev.job_id, JobState.ABANDONED, f"node {ev.node_id} is not in the cluster")]
            node.pinned_queue.append(ev.job_id)
            return self._fill(node)
        self._enqueue(job)
        return self._place_queued()

    def _on_started(self, ev: JobsStarted) -> list[Action]:
        for job_id, attempt in ev.jobs:
            job = self._jobs.get(job_id)
            if job is not None and job.attempt == attempt and job.node_id == ev.node_id and job.state is JobState.SENT:
                self._move(job, JobState.RUNNING)
        node = self._nodes.get(ev.node_id)
        if not self.steal or self._queue or node is None or not _has_jobs_behind_busy_cpus(node):
            return []
        # Its CPUs are now all busy with jobs waiting behind them: an idle node may take those.
        actions: list[Action] = []
        for thief in self._some_nodes():
            if thief is not node:
                actions.extend(self._steal_for(thief, (node,)))
        return actions

    def _some_nodes(self) -> list[_Node]:
        """Up to STEAL_SCAN nodes, a different slice each call: stealing looks at a bounded
        number of nodes per event, so its cost does not grow with the cluster."""
        ring = self._ring
        if len(ring) <= self.STEAL_SCAN:
            return [self._nodes[n] for n in ring]
        start = self._ring_cursor % len(ring)
        self._ring_cursor = start + self.STEAL_SCAN
        ids = ring[start : start + self.STEAL_SCAN]
        if len(ids) < self.STEAL_SCAN:
            ids += ring[: self.STEAL_SCAN - len(ids)]
        return [self._nodes[n] for n in ids]

    def report(self, node_id: str, job_id: str, attempt: int, worker_died: bool = False,
               duration: float | None = None, refill: bool = True) -> tuple[bool, list[Action]]:
        """``handle(JobReported(...))`` with the event's fields: returns whether the report is
        for the job's current attempt, whose outcome the caller delivers (the
        :class:`DeliverResult` that ``handle`` puts first), and the other actions.

        ``refill=False``: the caller is handling a batch of reports (the ones a node sent in
        one write). If giving the node jobs for the slot this report frees would dispatch any,
        that is left to :meth:`refill` (:attr:`owed` is then not empty), which the caller
        calls once the batch is handled: the batch's refills leave as one dispatch instead of
        one per report. Meanwhile the node takes no other job; every other decision stands.
        """
        job = self._jobs.get(job_id)
        if job is None or job.attempt != attempt or job.node_id != node_id:
            return False, []  # a late report of an attempt we already moved or resolved: discard
        state = job.state
        if state is not _SENT and state is not _RUNNING:
            return False, []
        node = self._nodes.get(node_id)
        if duration is not None and node is not None:
            typical = self.speeds.observe(node_id, duration)
            if self.prefetch is None and not node.distrusted and typical is not None:
                node.limit = node.cpus * (1 + _ahead_for(typical))
        if worker_died and not job.cancel_requested:
            job.failures += 1
            if job.reentrant and job.pinned is None and job.failures < self.allowed_failures:
                self._move(job, JobState.QUEUED)
                if node is not None:
                    node.inflight.pop(job.job_id, None)
                job.node_id = None
                self._enqueue(job, front=True)
                retried = self._place_queued()
                if node is not None:
                    retried.extend(self._fill(node))
                return False, retried
        self._finish(job, _DONE)
        if node is None:
            return True, []
        node.jobs_done += 1
        if not refill and (self._queue.size or node.pinned_queue):
            self.owed[node_id] = None
            return True, []
        return True, self._refill(node)

    def refill(self) -> list[Action]:
        """Give the nodes that reports with ``refill=False`` left (see :meth:`report`) jobs for
        their free slots; none if they are gone meanwhile."""
        actions: list[Action] = []
        owed, self.owed = self.owed, {}
        for node_id in owed:
            node = self._nodes.get(node_id)
            if node is not None:
                actions.extend(self._refill(node))
        return actions

    def _refill(self, node: _Node) -> list[Action]:
        """Jobs for the slots a report freed on ``node``, or work it may steal."""
        actions = self._fill(node)
        if self.steal and not self._queue.size and len(self._ring) > 1:  # see _steal_for
            actions.extend(self._steal_for(node))
        return actions

    def _on_node_joined(self, ev: NodeJoined) -> list[Action]:
        if ev.node_id in self._nodes:
            raise ValueError(f"node {ev.node_id!r} joined twice")
        cpus = max(1, ev.cpus)
        node = _Node(ev.node_id, cpus, 0)
        self._nodes[ev.node_id] = node
        self._ring.append(ev.node_id)
        self.speeds.add_node(ev.node_id, ev.speed)
        node.limit = self._limit_for(node)
        return self._fill(node) + self._steal_for(node)

    def _on_node_lost(self, ev: NodeLost) -> list[Action]:
        node = self._nodes.pop(ev.node_id, None)
        if node is None:
            return []
        self._ring.remove(ev.node_id)
        self.owed.pop(ev.node_id, None)
        self._free.discard(ev.node_id)
        self.speeds.remove_node(ev.node_id)
        actions: list[Action] = []
        requeue: list[_Job] = []
        for job_id in node.inflight:
            job = self._jobs[job_id]
            job.failures += 1
            job.node_id = None
            if job.cancel_requested:
                self._finish(job, JobState.CANCELLED)
                actions.append(ResolveJob(job_id, JobState.CANCELLED, "cancelled; its node was lost"))
            elif job.reentrant and job.pinned is None and job.failures < self.allowed_failures:
                self._move(job, JobState.QUEUED)
                requeue.append(job)
            else:
                why = f"node {ev.node_id} was lost ({ev.reason})"
                if job.reentrant and job.failures >= self.allowed_failures:
                    why += f"; the job was lost with {job.failures} nodes, not resubmitting it again"
                self._finish(job, JobState.ABANDONED)
                actions.append(ResolveJob(job_id, JobState.ABANDONED, why))
        for job_id in node.pinned_queue:
            self._finish(self._jobs[job_id], JobState.ABANDONED)
            actions.append(ResolveJob(job_id, JobState.ABANDONED, f"node {ev.node_id} it was submitted to was lost"))
        node.inflight.clear()
        for job in reversed(requeue):  # they waited long enough: run them next, in order
            self._enqueue(job, front=True)
        actions.extend(self._place_queued())  # moved jobs go to the nodes that have room
        return actions

    def _on_distrusted(self, ev: NodeDistrusted) -> list[Action]:
        node = self._nodes.get(ev.node_id)
        if node is None or node.distrusted:
            return []
        node.distrusted = True
        node.limit = 0
        self._free.discard(ev.node_id)
        actions: list[Action] = []
        while node.pinned_queue:
            job_id = node.pinned_queue.popleft()
            self._finish(self._jobs[job_id], JobState.ABANDONED)
            actions.append(ResolveJob(job_id, JobState.ABANDONED, f"node {ev.node_id} is no longer trusted: {ev.reason}"))
        return actions

    def _on_resized(self, ev: NodeResized) -> list[Action]:
        node = self._nodes.get(ev.node_id)
        if node is None or node.distrusted:
            return []
        cpus = max(0, ev.cpus)
        node.cpus = cpus
        node.limit = self._limit_for(node)
        # Jobs already sent beyond the new limit run to their end; no new ones until below it.
        return self._fill(node)

    def _on_cancel(self, ev: CancelRequested) -> list[Action]:
        job = self._jobs.get(ev.job_id)
        if job is None or job.state in _TERMINAL:
            return []
        if job.state is JobState.QUEUED:
            if job.pinned is not None and job.pinned in self._nodes:
                self._nodes[job.pinned].pinned_queue.remove(job.job_id)
            else:
                self._queue.remove(job.job_id, job.owner)
                self._constrained -= self._is_constrained(job)
            self._finish(job, JobState.CANCELLED)
            return [ResolveJob(job.job_id, JobState.CANCELLED, "cancelled before it started")]
        job.cancel_requested = True
        assert job.node_id is not None
        return [CancelOnNode(job.node_id, job.job_id, job.attempt)]

    def _on_recalled(self, ev: JobsRecalled) -> list[Action]:
        node = self._nodes.get(ev.node_id)
        thieves: list[_Node] = []
        back: list[_Job] = []
        for job_id, attempt in ev.jobs:
            job = self._jobs.get(job_id)
            if job is None or job.attempt != attempt or job.node_id != ev.node_id or job.state is not JobState.SENT:
                continue  # stale: it moved on meanwhile
            thief = self._nodes.get(job.recalled_by or "")
            if thief is not None:
                thieves.append(thief)
            if node is not None:
                node.inflight.pop(job_id, None)
            job.node_id = None
            self._move(job, JobState.QUEUED)
            back.append(job)
        for job in reversed(back):
            self._enqueue(job, front=True)
        actions: list[Action] = []
        for thief in thieves:  # the nodes they were recalled for get them first
            if self._queue and thief.node_id in self._nodes:
                actions.extend(self._fill(thief))
        actions.extend(self._place_queued())
        return actions

    def _steal_for(self, thief: _Node, victims: Sequence[_Node] | None = None) -> list[Action]:
        """Recall jobs waiting behind busy CPUs on ``victims`` (default: a slice of the nodes)
        for ``thief``'s idle CPUs, once no queued job is left to give it."""
        idle = thief.cpus - len(thief.inflight) - thief.awaiting
        if not self.steal or idle <= 0 or self._queue or thief.distrusted:
            return []
        actions: list[Action] = []
        for victim in self._some_nodes() if victims is None else victims:
            if victim is thief or not _has_jobs_behind_busy_cpus(victim):
                continue
            batch: list[tuple[str, int]] = []
            for job_id in reversed(victim.inflight):  # the last sent waits longest
                job = self._jobs[job_id]
                if job.state is JobState.SENT and job.recalled_by is None and job.pinned is None \
                        and not job.cancel_requested and self._may_run(job, thief):
                    job.recalled_by = thief.node_id
                    thief.awaiting += 1
                    batch.append((job_id, job.attempt))
                    idle -= 1
                    if not idle:
                        break
            if batch:
                actions.append(RecallJobs(victim.node_id, tuple(batch)))
            if not idle:
                break
        return actions

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _is_constrained(job: _Job) -> bool:
        return bool(job.exclude) or job.group is not None

    def _enqueue(self, job: _Job, *, front: bool = False) -> None:
        if front:
            self._queue.appendleft(job.job_id, job.owner)
        else:
            self._queue.append(job.job_id, job.owner)
        self._constrained += self._is_constrained(job)

    def _may_run(self, job: _Job, node: _Node) -> bool:
        if node.node_id in job.exclude:
            return False
        return job.group is None or node.node_id not in self._group_nodes.get(job.group, ())

    def _move(self, job: _Job, state: JobState) -> None:
        old = job.state
        if state not in _TRANSITIONS[old]:
            raise RuntimeError(f"job {job.job_id}: illegal transition {old.value} -> {state.value}")
        job.state = state
        if old is _RUNNING or state is _RUNNING:
            node = self._nodes.get(job.node_id or "")
            if node is not None:
                node.running += 1 if state is _RUNNING else -1
        if job.recalled_by is not None:  # it left SENT: the recall is over, whatever its answer
            thief = self._nodes.get(job.recalled_by)
            if thief is not None:
                thief.awaiting -= 1
            job.recalled_by = None

    def _finish(self, job: _Job, state: JobState) -> None:
        self._move(job, state)
        if job.node_id is not None:
            node = self._nodes.get(job.node_id)
            if node is not None:
                node.inflight.pop(job.job_id, None)
        if job.group is not None:
            left = self._group_size[job.group] - 1
            if left:
                self._group_size[job.group] = left
            else:
                del self._group_size[job.group]
                self._group_nodes.pop(job.group, None)
        del self._jobs[job.job_id]

    def _place_queued(self) -> list[Action]:
        """Hand queued jobs to free nodes, fastest first, until the queue or the room runs out."""
        actions: list[Action] = []
        passed_over: list[str] = []  # free nodes that can run none of the queued jobs
        queue = self._queue
        while queue.size and self._free:
            node = self._nodes[self._free.pop()]
            # Idle CPUs rank first (see _rank): fill those, and prefetch only after every
            # idle CPU got a job, so a few jobs spread over the nodes instead of queueing on one.
            idle = len(node.inflight) < node.cpus
            dispatched = self._fill(node, keep_free=False, cap=node.cpus if idle else node.limit)
            actions.extend(dispatched)
            if len(node.inflight) < node.limit:
                if dispatched and idle:
                    self._free.add(node.node_id, self._rank(node))  # again, for its prefetch slots
                else:
                    passed_over.append(node.node_id)
        for node_id in passed_over:
            self._free.add(node_id, self._rank(self._nodes[node_id]))
        return actions

    def _limit_for(self, node: _Node) -> int:
        """Jobs the node may hold: its CPUs, and ``prefetch`` (or the adaptive count) per CPU ahead."""
        ahead = self.prefetch
        if ahead is None:
            typical = self.speeds.observed(node.node_id)
            ahead = 1 if typical is None else _ahead_for(typical)
        return node.cpus * (1 + max(0, ahead))

    def _rank(self, node: _Node) -> float:
        """A free node's place in line: nodes with an idle CPU first, then by speed."""
        speed = self.speeds.speed(node.node_id)
        return speed + _IDLE_FIRST if len(node.inflight) < node.cpus else speed

    def _fill(self, node: _Node, *, keep_free: bool = True, cap: int | None = None) -> list[Action]:
        """Send this node as many jobs as it has free slots for (up to ``cap`` in flight);
        remember it if room is left."""
        batch: list[tuple[str, int]] = []
        skipped: list[_Job] = []
        limit = node.limit if cap is None else min(cap, node.limit)
        inflight, queue = node.inflight, self._queue
        while len(inflight) < limit:
            if node.pinned_queue:
                job = self._jobs[node.pinned_queue.popleft()]
            elif queue.size and len(skipped) < self.SCAN:
                job = self._jobs[queue.popleft()]
                if self._constrained:  # else no queued job has an exclusion or a group
                    self._constrained -= self._is_constrained(job)
                    if not self._may_run(job, node):
                        skipped.append(job)
                        continue
            else:
                break
            job.attempt += 1
            job.node_id = node.node_id
            self._move(job, _SENT)
            inflight[job.job_id] = None
            if job.group is not None:
                self._group_nodes.setdefault(job.group, set()).add(node.node_id)
            batch.append((job.job_id, job.attempt))
        if skipped:
            for job in reversed(skipped):
                self._enqueue(job, front=True)
        if keep_free and len(inflight) < node.limit:
            self._free.add(node.node_id, self._rank(node))
        else:
            self._free.discard(node.node_id)
        return [DispatchJobs(node.node_id, tuple(batch))] if batch else []

    # ------------------------------------------------------------ invariants

    def validate(self) -> None:
        """Check the core's invariants; tests call this after every step."""
        seen: set[str] = set()
        for node in self._nodes.values():
            # A distrusted or shrunk node may still hold jobs it had before; it gets no more.
            for job_id in node.inflight:
                job = self._jobs[job_id]
                assert job.node_id == node.node_id and job.state in (JobState.SENT, JobState.RUNNING), job
                assert job_id not in seen
                seen.add(job_id)
            for job_id in node.pinned_queue:
                assert self._jobs[job_id].state is JobState.QUEUED
        constrained = 0
        for job_id in self._queue:
            job = self._jobs[job_id]
            assert job.state is JobState.QUEUED and job_id not in seen
            constrained += self._is_constrained(job)
            seen.add(job_id)
        assert constrained == self._constrained, (constrained, self._constrained)
        awaiting: dict[str, int] = {}
        for job in self._jobs.values():
            if job.state is JobState.QUEUED and job.pinned is None:
                assert job.job_id in seen, job
            assert job.state not in _TERMINAL
            if job.recalled_by is not None:
                assert job.state is JobState.SENT, job
                awaiting[job.recalled_by] = awaiting.get(job.recalled_by, 0) + 1
        for node in self._nodes.values():
            running = sum(self._jobs[j].state is JobState.RUNNING for j in node.inflight)
            assert node.running == running, (node.node_id, node.running, running)
            assert node.awaiting == awaiting.get(node.node_id, 0), (node.node_id, node.awaiting)
        for node_id in self._free:
            node = self._nodes[node_id]
            assert len(node.inflight) < node.limit and not node.distrusted
        for node_id in self.owed:
            assert node_id in self._nodes, node_id
        if self._queue and not self._constrained:
            # Work is waiting only if no node has room for it (or a refill is owed to it).
            assert not self._free, "jobs queued while a node has a free slot"
