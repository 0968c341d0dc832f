"""Results you can trust: verification and replica voting, as a pure state machine.

Events (facts) go in through :meth:`TrustCore.handle`; a list of actions (commands) comes
out, as in :mod:`clusterpy.core.scheduler`. The core never sees a result: the shell hands it a
*digest* of each outcome (equal outcomes, equal digests) and runs the user's ``verify`` when
told to. Nothing here touches sockets, clocks, threads or randomness.

Words: a *task* is one job as the user sees it; a *replica* is one run of it on one node (a
job of the scheduling core). Replica ids: the first is the task id itself (a task that is never
re-run looks exactly like a plain job), the n-th is ``"<task id>#<n>"``.

::

    TaskSubmitted --> RunReplica x width          (width = replicas for a selected fraction, else 1)
    ReplicaReported(digest) --> CheckResult       (verify configured and the outcome is a result)
                            \\-> counted           (otherwise)
    ReplicaVerified(ok)     --> counted | strike the node, run a replacement elsewhere
    counted: a digest held by a majority (width // 2 + 1) of the counted replicas
             --> DeliverOutcome; replicas still queued: ReplicaNotNeeded; nodes that
                 disagree (now or when their late replica reports): strike
    no majority possible with what is still running --> RunReplica (excluding every node
             that ran one) while reruns last, then FailTask
    strike: ``distrust_after`` strikes --> DistrustNode; with ``rerun_untrusted`` its
             replicas of open tasks are discarded (running ones: CancelReplica) and replaced

Replica lifecycle::

    RUNNING --reported--> CHECKING --verified ok--> VALID
       |          \\----(no check)----------------> VALID
       |                  CHECKING --verified bad--> INVALID
       +--lost--> LOST        RUNNING/CHECKING/VALID --its node distrusted--> DISCARDED

Voting only makes sense for computations whose correct output is unique (same arguments,
same result on every honest node); ``verify`` suits results that are cheap to check.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "TaskSubmitted",
    "ReplicaReported",
    "ReplicaVerified",
    "ReplicaLost",
    "TaskCancelled",
    "RunReplica",
    "CheckResult",
    "CancelReplica",
    "ReplicaNotNeeded",
    "DeliverOutcome",
    "FailTask",
    "DistrustNode",
    "TrustCore",
    "TrustEvent",
    "TrustAction",
    "replica_id",
]


def replica_id(task_id: str, index: int) -> str:
    """The id of the ``index``-th replica of ``task_id`` (the first one is the task id)."""
    return task_id if index == 0 else f"{task_id}#{index}"


# ---------------------------------------------------------------- events (facts)


@dataclass(frozen=True, slots=True)
class TaskSubmitted:
    """A task to run. ``replicate``: run it on ``replicas`` nodes (None: the core chooses,
    spreading ``replicate_fraction`` of the tasks evenly)."""

    task_id: str
    replicate: bool | None = None


@dataclass(frozen=True, slots=True)
class ReplicaReported:
    """A replica ended with an outcome of its own (a result, or the computation's exception).

    ``digest`` identifies the outcome; ``checkable``: it is a result that ``verify`` can check
    (an exception is not: it is only compared with the other replicas')."""

    replica_id: str
    node_id: str
    digest: str
    checkable: bool = True


@dataclass(frozen=True, slots=True)
class ReplicaVerified:
    """The shell ran ``verify`` on a replica's result (after a :class:`CheckResult`)."""

    replica_id: str
    passed: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReplicaLost:
    """A replica ended without an outcome (its node was lost, it could not be placed...)."""

    replica_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class TaskCancelled:
    task_id: str


TrustEvent = TaskSubmitted | ReplicaReported | ReplicaVerified | ReplicaLost | TaskCancelled


# ---------------------------------------------------------------- actions (commands)


@dataclass(frozen=True, slots=True)
class RunReplica:
    """Submit a replica to the scheduler: ``group`` keeps replicas of one task on different
    nodes; ``exclude`` are nodes that already ran one (or were distrusted)."""

    task_id: str
    replica_id: str
    group: str | None
    exclude: frozenset[str]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Run the user's ``verify`` on this replica's result; answer with :class:`ReplicaVerified`."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class CancelReplica:
    """Stop this replica (queued: drop it; running: terminate it); its outcome is ignored."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class ReplicaNotNeeded:
    """The task is decided: cancel this replica if it has not started (a running one goes on,
    so that its node can still be judged)."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class DeliverOutcome:
    """Resolve the task with this replica's outcome. ``verdict`` says how it was trusted:
    ``"unchecked"``, ``"verified"``, ``"voted k/n"``, or ``"lost"``."""

    task_id: str
    replica_id: str
    verdict: str


@dataclass(frozen=True, slots=True)
class FailTask:
    """Resolve the task without an outcome: ``cancelled`` by the user, or no trustworthy
    result within the reruns allowed (``reason`` says why, for the user's error)."""

    task_id: str
    reason: str
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class DistrustNode:
    """The node returned wrong results: send it no more jobs (scheduler: NodeDistrusted)."""

    node_id: str
    reason: str


TrustAction = RunReplica | CheckResult | CancelReplica | ReplicaNotNeeded | DeliverOutcome | FailTask | DistrustNode


# ---------------------------------------------------------------- state


class RState(enum.Enum):
    RUNNING = "running"
    CHECKING = "checking"
    VALID = "valid"
    INVALID = "invalid"
    LOST = "lost"
    DISCARDED = "discarded"


_ACTIVE = frozenset({RState.RUNNING, RState.CHECKING})


@dataclass(slots=True)
class _Replica:
    replica_id: str
    task_id: str
    node_id: str | None = None
    state: RState = RState.RUNNING
    digest: str | None = None
    checked: bool = False  # passed verify


@dataclass(slots=True)
class _Task:
    task_id: str
    width: int
    replicas: dict[str, _Replica] = field(default_factory=dict)
    next_index: int = 0
    reruns: int = 0
    nodes: set[str] = field(default_factory=set)  # nodes that ran (or run) one of its replicas
    accepted: str | None = None  # the digest delivered; None while open

    @property
    def needed(self) -> int:
        return self.width // 2 + 1


@dataclass(slots=True)
class NodeRecord:
    """What the core learned about one node (reported in ``stats()``)."""

    verified: int = 0  # results that passed verify
    failed_verification: int = 0
    agreed: int = 0  # replicas that agreed with the accepted majority
    disagreed: int = 0
    strikes: int = 0
    distrusted: str | None = None  # the reason, once distrusted

    def as_dict(self) -> dict[str, object]:
        return {"verified": self.verified, "failed_verification": self.failed_verification,
                "agreed": self.agreed, "disagreed": self.disagreed, "strikes": self.strikes,
                "distrusted": self.distrusted}


class TrustCore:
    """Decides which results to believe, which nodes to distrust, and what to run again.

    Args:
        verify: results are checked (:class:`CheckResult`) before they count.
        replicas: how many nodes run a selected task (``>= 1``); a majority must agree.
        replicate_fraction: the share of tasks that are replicated (0..1), spread evenly.
        max_reruns: replicas run per task beyond its first ``width`` (replacements of wrong,
            disagreeing or lost replicas); past it the task fails.
        distrust_after: strikes (failed verifications, disagreements with a majority) that
            make a node untrusted.
        rerun_untrusted: replicas of a node that becomes untrusted are discarded and run
            again elsewhere (running ones are cancelled).

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(self, *, verify: bool = False, replicas: int = 1, replicate_fraction: float = 1.0,
                 max_reruns: int = 2, distrust_after: int = 1, rerun_untrusted: bool = True) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas!r}")
        if not 0.0 <= replicate_fraction <= 1.0:
            raise ValueError(f"replicate_fraction must be between 0 and 1, not {replicate_fraction!r}")
        if max_reruns < 0:
            raise ValueError(f"max_reruns must be at least 0, not {max_reruns!r}")
        if distrust_after < 1:
            raise ValueError(f"distrust_after must be at least 1, not {distrust_after!r}")
        self.verify = verify
        self.replicas = replicas
        self.replicate_fraction = replicate_fraction
        self.max_reruns = max_reruns
        self.distrust_after = distrust_after
        self.rerun_untrusted = rerun_untrusted
        self._tasks: dict[str, _Task] = {}
        self._replicas: dict[str, _Replica] = {}
        self._nodes: dict[str, NodeRecord] = {}
        self._spread = 0.0  # evenly spread selection: a task is replicated when this passes 1

    # ------------------------------------------------------------ queries

    def task_of(self, replica_id: str) -> str | None:
        replica = self._replicas.get(replica_id)
        return None if replica is None else replica.task_id

    def knows(self, replica_id: str) -> bool:
        """The replica is still awaited (its outcome will be used)."""
        return replica_id in self._replicas

    def open_tasks(self) -> int:
        return sum(1 for t in self._tasks.values() if t.accepted is None)

    def distrusted(self, node_id: str) -> bool:
        record = self._nodes.get(node_id)
        return record is not None and record.distrusted is not None

    def node_record(self, node_id: str) -> NodeRecord:
        return self._nodes.setdefault(node_id, NodeRecord())

    def node_records(self) -> dict[str, NodeRecord]:
        return dict(self._nodes)

    # ------------------------------------------------------------ events

    def handle(self, event: TrustEvent) -> list[TrustAction]:
        """Apply one event and return the actions it calls for."""
        actions: list[TrustAction] = []
        if isinstance(event, TaskSubmitted):
            self._on_submitted(event, actions)
        elif isinstance(event, ReplicaReported):
            self._on_reported(event, actions)
        elif isinstance(event, ReplicaVerified):
            self._on_verified(event, actions)
        elif isinstance(event, ReplicaLost):
            self._on_lost(event, actions)
        elif isinstance(event, TaskCancelled):
            self._on_cancelled(event, actions)
        else:
            raise TypeError(f"not a trust event: {event!r}")
        return actions

    def _on_submitted(self, ev: TaskSubmitted, out: list[TrustAction]) -> None:
        if ev.task_id in self._tasks:
            raise ValueError(f"task {ev.task_id!r} was already submitted")
        replicate = ev.replicate
        if replicate is None:
            replicate = self._select()
        task = _Task(ev.task_id, self.replicas if replicate else 1)
        self._tasks[ev.task_id] = task
        for _ in range(task.width):
            self._run(task, out)

    def _select(self) -> bool:
        if self.replicas == 1:
            return False
        self._spread += self.replicate_fraction
        if self._spread >= 1.0 - 1e-9:
            self._spread -= 1.0
            return True
        return False

    def _on_reported(self, ev: ReplicaReported, out: list[TrustAction]) -> None:
        replica = self._replicas.get(ev.replica_id)
        if replica is None or replica.state is not RState.RUNNING:
            return  # cancelled, discarded, or a duplicate report: nobody waits for it
        task = self._tasks[replica.task_id]
        replica.node_id = ev.node_id
        replica.digest = ev.digest
        task.nodes.add(ev.node_id)
        if task.accepted is not None:  # a late replica: judge its node against the majority
            self._judge_late(task, replica, out)
            return
        if self.rerun_untrusted and self.distrusted(ev.node_id):
            replica.state = RState.DISCARDED
            self._decide(task, out)
            return
        if self.verify and ev.checkable:
            replica.state = RState.CHECKING
            out.append(CheckResult(replica.replica_id))
            return
        replica.state = RState.VALID
        self._decide(task, out)

    def _on_verified(self, ev: ReplicaVerified, out: list[TrustAction]) -> None:
        replica = self._replicas.get(ev.replica_id)
        if replica is None or replica.state is not RState.CHECKING:
            return
        task = self._tasks[replica.task_id]
        assert replica.node_id is not None
        record = self.node_record(replica.node_id)
        if ev.passed:
            record.verified += 1
        else:
            record.failed_verification += 1
        if task.accepted is not None:
            if ev.passed:
                self._judge_late(task, replica, out)
            else:
                self._forget(replica)
                self._strike(replica.node_id, f"a result failed verification ({ev.reason})" if ev.reason
                             else "a result failed verification", out)
                self._maybe_done(task)
            return
        if ev.passed:
            replica.state = RState.VALID
            replica.checked = True
        else:
            replica.state = RState.INVALID
            why = f"a result failed verification ({ev.reason})" if ev.reason else "a result failed verification"
            self._strike(replica.node_id, why, out)
        if task.accepted is None and task.task_id in self._tasks:
            self._decide(task, out)

    def _on_lost(self, ev: ReplicaLost, out: list[TrustAction]) -> None:
        replica = self._replicas.get(ev.replica_id)
        if replica is None or replica.state not in _ACTIVE:
            return
        task = self._tasks[replica.task_id]
        replica.state = RState.LOST
        if task.accepted is not None:
            self._forget(replica)
            self._maybe_done(task)
            return
        if task.width == 1 and len(task.replicas) == 1:
            # A plain task keeps the scheduler's verdict (reentrancy already applied there).
            self._deliver(task, replica, "lost", out)
            return
        self._decide(task, out, lost=replica)

    def _on_cancelled(self, ev: TaskCancelled, out: list[TrustAction]) -> None:
        task = self._tasks.get(ev.task_id)
        if task is None:
            return
        for replica in list(task.replicas.values()):
            if replica.state in _ACTIVE:
                if replica.state is RState.RUNNING:
                    out.append(CancelReplica(replica.replica_id))
                self._forget(replica)
        if task.accepted is None:
            out.append(FailTask(task.task_id, "cancelled", cancelled=True))
        self._drop(task)

    # ------------------------------------------------------------ decisions

    def _run(self, task: _Task, out: list[TrustAction]) -> None:
        rid = replica_id(task.task_id, task.next_index)
        task.next_index += 1
        replica = _Replica(rid, task.task_id)
        task.replicas[rid] = replica
        self._replicas[rid] = replica
        exclude = frozenset(task.nodes | {n for n, r in self._nodes.items() if r.distrusted is not None})
        out.append(RunReplica(task.task_id, rid, task.task_id if task.width > 1 else None, exclude))

    @staticmethod
    def _counted(task: _Task) -> list[_Replica]:
        return [r for r in task.replicas.values() if r.state is RState.VALID]

    @staticmethod
    def _active(task: _Task) -> int:
        return sum(1 for r in task.replicas.values() if r.state in _ACTIVE)

    def _decide(self, task: _Task, out: list[TrustAction], lost: _Replica | None = None) -> None:
        """Accept a majority, or run more replicas, or give up: after any change to an open task."""
        if task.accepted is not None or task.task_id not in self._tasks:
            return
        votes: dict[str, list[_Replica]] = {}
        for replica in self._counted(task):
            assert replica.digest is not None
            votes.setdefault(replica.digest, []).append(replica)
        best = max(votes.values(), key=len, default=[])
        if len(best) >= task.needed:
            self._accept(task, best, votes, out)
            return
        short = task.needed - len(best) - self._active(task)
        if short <= 0:
            return  # replicas still running can still make a majority
        if task.reruns + short <= self.max_reruns:
            task.reruns += short
            for _ in range(short):
                self._run(task, out)
            return
        if lost is not None and not votes and not any(r.state is RState.INVALID for r in task.replicas.values()):
            self._deliver(task, lost, "lost", out)  # nothing but lost replicas: pass the loss on
            return
        bad = sum(1 for r in task.replicas.values() if r.state is RState.INVALID)
        if votes:
            reason = (f"no majority: {len(task.replicas)} runs on different nodes gave {len(votes)} different "
                      f"outcomes ({task.needed} of {task.width} must agree)")
        elif bad:
            reason = f"its result failed verification on {bad} node{'s' if bad != 1 else ''}"
        else:
            reason = "no trusted node could run it"
        reason += f"; not re-running it again (max_reruns={self.max_reruns})"
        for replica in list(task.replicas.values()):
            if replica.state is RState.RUNNING:
                out.append(CancelReplica(replica.replica_id))
        out.append(FailTask(task.task_id, reason))
        self._drop(task)

    def _accept(self, task: _Task, winners: list[_Replica], votes: dict[str, list[_Replica]],
                out: list[TrustAction]) -> None:
        digest = winners[0].digest
        assert digest is not None
        task.accepted = digest
        if task.width > 1:
            verdict = f"voted {len(winners)}/{sum(len(v) for v in votes.values())}"
        else:
            verdict = "verified" if winners[0].checked else "unchecked"
        out.append(DeliverOutcome(task.task_id, winners[0].replica_id, verdict))
        if task.width > 1:
            for replica in winners:
                assert replica.node_id is not None
                self.node_record(replica.node_id).agreed += 1
        losers = [r for d, rs in votes.items() if d != digest for r in rs]
        for replica in list(task.replicas.values()):
            if replica.state in _ACTIVE:
                if replica.state is RState.RUNNING:
                    out.append(ReplicaNotNeeded(replica.replica_id))
            else:
                self._forget(replica)
        for replica in losers:
            assert replica.node_id is not None
            self.node_record(replica.node_id).disagreed += 1
            self._strike(replica.node_id, "its result disagreed with the majority", out)
        self._maybe_done(task)

    def _judge_late(self, task: _Task, replica: _Replica, out: list[TrustAction]) -> None:
        assert replica.node_id is not None
        self._forget(replica)
        if task.width > 1:
            if replica.digest == task.accepted:
                self.node_record(replica.node_id).agreed += 1
            else:
                self.node_record(replica.node_id).disagreed += 1
                self._strike(replica.node_id, "its result disagreed with the majority", out)
        self._maybe_done(task)

    def _strike(self, node_id: str, reason: str, out: list[TrustAction]) -> None:
        record = self.node_record(node_id)
        record.strikes += 1
        if record.distrusted is not None or record.strikes < self.distrust_after:
            return
        record.distrusted = reason
        out.append(DistrustNode(node_id, reason))
        if not self.rerun_untrusted:
            return
        for task in [t for t in self._tasks.values() if t.accepted is None]:
            changed = False
            for replica in list(task.replicas.values()):
                if replica.node_id == node_id and replica.state in (RState.RUNNING, RState.CHECKING, RState.VALID):
                    if replica.state is RState.RUNNING:
                        out.append(CancelReplica(replica.replica_id))
                    replica.state = RState.DISCARDED
                    changed = True
            if changed:
                self._decide(task, out)

    def _deliver(self, task: _Task, replica: _Replica, verdict: str, out: list[TrustAction]) -> None:
        task.accepted = replica.digest or "<lost>"
        out.append(DeliverOutcome(task.task_id, replica.replica_id, verdict))
        for other in list(task.replicas.values()):
            if other.state is RState.RUNNING:
                out.append(CancelReplica(other.replica_id))
            self._forget(other)
        self._drop(task)

    # ------------------------------------------------------------ bookkeeping

    def _forget(self, replica: _Replica) -> None:
        self._replicas.pop(replica.replica_id, None)
        task = self._tasks.get(replica.task_id)
        if task is not None:
            task.replicas.pop(replica.replica_id, None)

    def _maybe_done(self, task: _Task) -> None:
        if task.accepted is not None and not any(r.state in _ACTIVE for r in task.replicas.values()):
            self._drop(task)

    def _drop(self, task: _Task) -> None:
        for replica in task.replicas.values():
            self._replicas.pop(replica.replica_id, None)
        task.replicas.clear()
        self._tasks.pop(task.task_id, None)

    # ------------------------------------------------------------ invariants

    def validate(self) -> None:
        """Check the core's invariants; tests call this after every step."""
        for rid, replica in self._replicas.items():
            task = self._tasks.get(replica.task_id)
            assert task is not None, replica
            assert task.replicas.get(rid) is replica, replica
        for task in self._tasks.values():
            assert task.reruns <= self.max_reruns, task
            assert task.next_index == task.width + task.reruns, task
            for rid, replica in task.replicas.items():
                assert self._replicas.get(rid) is replica
                if replica.state is not RState.RUNNING:
                    assert replica.node_id is not None or replica.state in (RState.LOST, RState.DISCARDED), replica
            if task.accepted is not None:
                # A decided task is kept only to judge its late replicas.
                assert all(r.state in _ACTIVE for r in task.replicas.values()), task
                assert task.replicas, task
            else:
                assert any(r.state in _ACTIVE for r in task.replicas.values()), f"open task waits for nothing: {task}"
        for record in self._nodes.values():
            assert record.distrusted is None or record.strikes >= self.distrust_after
