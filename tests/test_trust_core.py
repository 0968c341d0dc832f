"""The trust core (verification, replica voting, distrust) driven directly: no event loop, no nodes."""

from __future__ import annotations

import itertools

import pytest

from clusterpy.core.scheduler import (
    DeliverResult,
    DispatchJobs,
    JobReported,
    JobSubmitted,
    NodeDistrusted,
    NodeJoined,
    SchedulerCore,
)
from clusterpy.core.trust import (
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
    TrustCore,
)


class Driver:
    """Feeds a TrustCore and checks its invariants after every step."""

    def __init__(self, **options):
        self.core = TrustCore(**options)

    def __call__(self, event):
        actions = self.core.handle(event)
        self.core.validate()
        return actions


def kinds(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def test_plain_task_is_delivered_unchecked():
    t = Driver()
    (run,) = t(TaskSubmitted("1"))
    assert run == RunReplica("1", "1", None, frozenset())
    assert t(ReplicaReported("1", "A", "d1")) == [DeliverOutcome("1", "1", "unchecked")]
    assert t.core.open_tasks() == 0 and not t.core.knows("1")


def test_failed_verification_distrusts_and_reruns_elsewhere_then_passes():
    t = Driver(verify=True)
    t(TaskSubmitted("7"))
    assert t(ReplicaReported("7", "BAD", "wrong")) == [CheckResult("7")]
    actions = t(ReplicaVerified("7", False, "factors do not multiply back"))
    assert kinds(actions, DistrustNode) == [DistrustNode("BAD", "a result failed verification (factors do not multiply back)")]
    (rerun,) = kinds(actions, RunReplica)
    assert rerun.replica_id == "7#1" and rerun.exclude == frozenset({"BAD"})
    assert t(ReplicaReported("7#1", "GOOD", "right")) == [CheckResult("7#1")]
    assert t(ReplicaVerified("7#1", True)) == [DeliverOutcome("7", "7#1", "verified")]
    record = t.core.node_record("BAD")
    assert record.failed_verification == 1 and record.distrusted
    assert t.core.node_record("GOOD").verified == 1 and not t.core.distrusted("GOOD")


def test_verification_failing_everywhere_fails_the_task_after_the_reruns():
    t = Driver(verify=True, max_reruns=2)
    t(TaskSubmitted("1"))
    rid, fails = "1", []
    for n in range(3):
        t(ReplicaReported(rid, f"N{n}", "x"))
        actions = t(ReplicaVerified(rid, False))
        runs = kinds(actions, RunReplica)
        fails = kinds(actions, FailTask)
        if runs:
            rid = runs[0].replica_id
            assert runs[0].exclude == {f"N{i}" for i in range(n + 1)}
    assert len(fails) == 1 and "failed verification on 3 nodes" in fails[0].reason
    assert "max_reruns=2" in fails[0].reason
    assert t.core.open_tasks() == 0


def test_exceptions_are_not_verified_but_delivered():
    t = Driver(verify=True)
    t(TaskSubmitted("1"))
    assert t(ReplicaReported("1", "A", "exc", checkable=False)) == [DeliverOutcome("1", "1", "unchecked")]


def test_majority_of_three_is_accepted_early_and_the_dissenter_is_distrusted_when_it_reports():
    t = Driver(replicas=3)
    runs = t(TaskSubmitted("5"))
    assert [r.replica_id for r in runs] == ["5", "5#1", "5#2"]
    assert all(r.group == "5" for r in runs)
    assert t(ReplicaReported("5", "A", "42")) == []
    actions = t(ReplicaReported("5#1", "B", "42"))
    assert actions == [DeliverOutcome("5", "5", "voted 2/2"), ReplicaNotNeeded("5#2")]
    assert t.core.knows("5#2")  # still judged if it runs
    assert t(ReplicaReported("5#2", "X", "41")) == [DistrustNode("X", "its result disagreed with the majority")]
    assert t.core.node_record("X").disagreed == 1
    assert t.core.node_record("A").agreed == 1 and t.core.node_record("B").agreed == 1
    assert not t.core.knows("5#2")


def test_a_dissenter_reported_first_is_struck_at_acceptance():
    t = Driver(replicas=3)
    t(TaskSubmitted("5"))
    assert t(ReplicaReported("5", "X", "bad")) == []
    assert t(ReplicaReported("5#1", "A", "ok")) == []
    actions = t(ReplicaReported("5#2", "B", "ok"))
    assert actions[0] == DeliverOutcome("5", "5#1", "voted 2/3")
    assert DistrustNode("X", "its result disagreed with the majority") in actions


def test_three_different_outcomes_run_a_fourth_replica_then_fail():
    t = Driver(replicas=3, max_reruns=1)
    t(TaskSubmitted("1"))
    t(ReplicaReported("1", "A", "a"))
    t(ReplicaReported("1#1", "B", "b"))
    (run,) = t(ReplicaReported("1#2", "C", "c"))
    assert run.replica_id == "1#3" and run.exclude == {"A", "B", "C"}
    (fail,) = t(ReplicaReported("1#3", "D", "d"))
    assert isinstance(fail, FailTask) and "no majority" in fail.reason and not fail.cancelled


def test_replicate_fraction_is_spread_evenly():
    t = Driver(replicas=2, replicate_fraction=0.25)
    widths = [len(t(TaskSubmitted(str(i)))) for i in range(12)]
    assert widths.count(2) == 3 and widths.count(1) == 9
    assert widths[3] == widths[7] == widths[11] == 2


def test_rerun_untrusted_discards_and_replaces_the_nodes_other_replicas():
    t = Driver(verify=True)
    t(TaskSubmitted("1"))
    t(TaskSubmitted("2"))
    t(TaskSubmitted("3"))
    # Job 2 runs on X too; job 3 already reported from X and waits for its check.
    t(ReplicaReported("3", "X", "z"))
    t(ReplicaReported("1", "X", "x"))
    actions = t(ReplicaVerified("1", False))
    assert DistrustNode("X", "a result failed verification") in actions
    # Job 3's result from X no longer counts: it runs again elsewhere.
    reruns = {a.replica_id: a for a in kinds(actions, RunReplica)}
    assert set(reruns) == {"1#1", "3#1"} and all("X" in a.exclude for a in reruns.values())
    # Job 2 is not known to be on X yet (still queued in the scheduler): it reports later.
    actions = t(ReplicaReported("2", "X", "y"))
    (rerun,) = kinds(actions, RunReplica)
    assert rerun.replica_id == "2#1" and rerun.exclude == {"X"}
    assert t(ReplicaVerified("3", True)) == []  # the discarded check is ignored


def test_without_rerun_untrusted_results_of_a_distrusted_node_still_count():
    t = Driver(replicas=3, rerun_untrusted=False)
    t(TaskSubmitted("1"))
    t(TaskSubmitted("2"))
    t(ReplicaReported("1", "X", "bad"))
    t(ReplicaReported("1#1", "A", "ok"))
    actions = t(ReplicaReported("1#2", "B", "ok"))
    assert kinds(actions, DistrustNode) and not kinds(actions, CancelReplica)
    t(ReplicaReported("2", "X", "fine"))
    actions = t(ReplicaReported("2#1", "A", "fine"))
    assert actions == [DeliverOutcome("2", "2", "voted 2/2"), ReplicaNotNeeded("2#2")]
    assert t.core.open_tasks() == 0 and t.core.knows("2#2")  # accepted; 2#2 is still judged


def test_distrust_after_counts_strikes():
    t = Driver(verify=True, distrust_after=2, max_reruns=5)
    t(TaskSubmitted("1"))
    t(ReplicaReported("1", "X", "bad"))
    assert not kinds(t(ReplicaVerified("1", False)), DistrustNode)
    t(TaskSubmitted("2"))
    t(ReplicaReported("2", "X", "bad"))
    assert kinds(t(ReplicaVerified("2", False)), DistrustNode)


def test_lost_plain_replica_passes_the_loss_on():
    t = Driver(verify=True)
    t(TaskSubmitted("1"))
    assert t(ReplicaLost("1", "node lost")) == [DeliverOutcome("1", "1", "lost")]


def test_lost_replica_of_a_vote_is_replaced():
    t = Driver(replicas=3)
    t(TaskSubmitted("1"))
    t(ReplicaReported("1", "A", "v"))
    assert t(ReplicaLost("1#1", "node lost")) == []  # 1#2 can still make the majority
    (run,) = t(ReplicaLost("1#2", "node lost"))
    assert run.replica_id == "1#3" and run.exclude == {"A"}
    assert t(ReplicaReported("1#3", "B", "v")) == [DeliverOutcome("1", "1", "voted 2/2")]


def test_cancel_stops_running_replicas_and_fails_the_task():
    t = Driver(replicas=2)
    t(TaskSubmitted("1"))
    t(ReplicaReported("1", "A", "v"))
    actions = t(TaskCancelled("1"))
    assert actions == [CancelReplica("1#1"), FailTask("1", "cancelled", cancelled=True)]
    assert t(ReplicaReported("1#1", "B", "v")) == []
    assert t.core.open_tasks() == 0


def test_bad_arguments_are_refused():
    for options in ({"replicas": 0}, {"replicate_fraction": 1.5}, {"max_reruns": -1}, {"distrust_after": 0}):
        with pytest.raises(ValueError):
            TrustCore(**options)
    t = TrustCore()
    t.handle(TaskSubmitted("1"))
    with pytest.raises(ValueError):
        t.handle(TaskSubmitted("1"))


def test_with_the_scheduler_core_a_liar_ends_up_distrusted_and_results_are_right():
    """Both cores together, as the client drives them: 4 nodes, one lies; replicas=3."""
    sched = SchedulerCore(prefetch=0)
    trust = Driver(replicas=3, max_reruns=3)
    truth = {str(i): f"r{i}" for i in range(30)}
    pending: list[tuple[str, str]] = []  # (replica, node) dispatched and not reported
    delivered: dict[str, str] = {}
    outcome_of: dict[str, str] = {}

    def run_actions(actions):
        for action in actions:
            if isinstance(action, RunReplica):
                apply_sched(sched.handle(JobSubmitted(action.replica_id, group=action.group, exclude=action.exclude)))
            elif isinstance(action, DeliverOutcome):
                delivered[action.task_id] = outcome_of[action.replica_id]
            elif isinstance(action, DistrustNode):
                apply_sched(sched.handle(NodeDistrusted(action.node_id, action.reason)))
            elif isinstance(action, (ReplicaNotNeeded, CancelReplica)):
                pass  # they run to the end here: the late reports are judged
            else:
                raise AssertionError(action)

    def apply_sched(actions):
        for action in actions:
            if isinstance(action, DispatchJobs):
                pending.extend((job_id, action.node_id) for job_id, _ in action.jobs)
        sched.validate()

    for node in "ABCX":
        apply_sched(sched.handle(NodeJoined(node, 1)))
    for task in truth:
        run_actions(trust(TaskSubmitted(task)))
    attempts = itertools.count(1)
    while pending:
        rid, node = pending.pop(0)
        task = trust.core.task_of(rid) or rid.split("#")[0]
        value = truth[task] if node != "X" else "lie"
        outcome_of[rid] = value
        actions = sched.handle(JobReported(node, rid, sched_attempt(sched, rid)))
        assert any(isinstance(a, DeliverResult) for a in actions)
        apply_sched(actions)
        run_actions(trust(ReplicaReported(rid, node, value)))
        next(attempts)
    assert delivered == truth
    assert trust.core.distrusted("X") and sched.distrusted("X")
    assert not any(trust.core.distrusted(n) for n in "ABC")


def sched_attempt(sched: SchedulerCore, job_id: str) -> int:
    return sched.attempt_of(job_id)
