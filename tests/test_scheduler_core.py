"""The scheduling core driven directly: no sockets, no event loop."""

import random

import pytest

from clusterpy.core.scheduler import (
    CancelOnNode,
    CancelRequested,
    DeliverResult,
    DispatchJobs,
    JobReported,
    JobsRecalled,
    JobsStarted,
    JobState,
    JobSubmitted,
    NodeDistrusted,
    NodeJoined,
    NodeLost,
    RecallJobs,
    ResolveJob,
    SchedulerCore,
)


def dispatched(actions):
    return [(a.node_id, j) for a in actions if isinstance(a, DispatchJobs) for j in a.jobs]


def test_jobs_wait_for_a_node_then_fill_cpus_plus_prefetch():
    core = SchedulerCore(prefetch=1)
    for i in range(10):
        assert core.handle(JobSubmitted(f"j{i}")) == []
    actions = core.handle(NodeJoined("n1", 2))
    assert dispatched(actions) == [("n1", (f"j{i}", 1)) for i in range(4)]
    core.validate()
    # Each report frees one slot, which is refilled at once.
    actions = core.handle(JobReported("n1", "j0", 1))
    assert actions[0] == DeliverResult("j0", 1)
    assert dispatched(actions) == [("n1", ("j4", 1))]
    core.validate()


def test_submissions_spread_round_robin_over_nodes():
    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("a", 2))
    core.handle(NodeJoined("b", 2))
    placed = [dispatched(core.handle(JobSubmitted(f"j{i}")))[0][0] for i in range(4)]
    assert sorted(placed) == ["a", "a", "b", "b"]
    assert core.handle(JobSubmitted("j4")) == []  # all slots taken: queued
    assert core.queued() == 1
    core.validate()


def test_lost_node_resubmits_reentrant_jobs_and_discards_late_reports():
    core = SchedulerCore(prefetch=0, reentrant=True)
    core.handle(NodeJoined("a", 1))
    core.handle(NodeJoined("b", 1))
    core.handle(JobSubmitted("j1"))
    core.handle(JobSubmitted("j2"))
    job_on_a = "j1" if core.node_of("j1") == "a" else "j2"
    core.handle(JobsStarted("a", ((job_on_a, 1),)))
    actions = core.handle(NodeLost("a", "connection reset"))
    assert actions == []  # b is busy: the job is queued again, first in line
    assert core.state_of(job_on_a) is JobState.QUEUED
    other = "j2" if job_on_a == "j1" else "j1"
    actions = core.handle(JobReported("b", other, 1))
    assert dispatched(actions) == [("b", (job_on_a, 2))]
    # The lost node comes back and reports attempt 1: it is discarded.
    assert core.handle(JobReported("a", job_on_a, 1)) == []
    assert core.handle(JobReported("b", job_on_a, 2)) == [DeliverResult(job_on_a, 2)]
    assert core.pending() == 0
    core.validate()


def test_lost_node_abandons_jobs_when_not_reentrant():
    core = SchedulerCore(prefetch=1, reentrant=False)
    core.handle(NodeJoined("a", 1))
    core.handle(JobSubmitted("j1"))
    core.handle(JobSubmitted("j2"))
    core.handle(JobSubmitted("j3"))  # queued: never sent, so it survives
    actions = core.handle(NodeLost("a", "killed"))
    resolved = {a.job_id: a.state for a in actions if isinstance(a, ResolveJob)}
    assert resolved == {"j1": JobState.ABANDONED, "j2": JobState.ABANDONED}
    assert core.state_of("j3") is JobState.QUEUED
    core.validate()


def test_poison_job_is_abandoned_after_allowed_failures():
    core = SchedulerCore(prefetch=0, reentrant=True, allowed_failures=3)
    core.handle(JobSubmitted("poison"))
    for i in range(3):
        actions = core.handle(NodeJoined(f"n{i}", 1))
        assert dispatched(actions) == [(f"n{i}", ("poison", i + 1))]
        actions = core.handle(NodeLost(f"n{i}", "died"))
    assert [a.state for a in actions if isinstance(a, ResolveJob)] == [JobState.ABANDONED]
    assert "3 nodes" in actions[0].reason


def test_cancel_queued_and_running():
    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("a", 1))
    core.handle(JobSubmitted("run"))
    core.handle(JobSubmitted("wait"))
    assert core.handle(CancelRequested("wait")) == [ResolveJob("wait", JobState.CANCELLED, "cancelled before it started")]
    assert core.handle(CancelRequested("run")) == [CancelOnNode("a", "run", 1)]
    assert core.handle(JobReported("a", "run", 1)) == [DeliverResult("run", 1)]
    assert core.handle(CancelRequested("run")) == []
    core.validate()


def test_pinned_jobs_go_only_to_their_node():
    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("a", 1))
    core.handle(NodeJoined("b", 1))
    assert dispatched(core.handle(JobSubmitted("p1", node_id="b"))) == [("b", ("p1", 1))]
    assert core.handle(JobSubmitted("p2", node_id="b")) == []
    assert core.handle(JobSubmitted("x", node_id="zzz"))[0].state is JobState.ABANDONED
    assert dispatched(core.handle(JobReported("b", "p1", 1)))[0] == ("b", ("p2", 1))
    core.validate()


def test_duplicate_submission_is_refused_and_state_unchanged():
    core = SchedulerCore()
    core.handle(JobSubmitted("j"))
    with pytest.raises(ValueError):
        core.handle(JobSubmitted("j"))
    assert core.pending() == 1


@pytest.mark.parametrize("seed", range(20))
def test_simulation_every_job_resolved_exactly_once(seed):
    """Random joins, losses, reports and cancels: every job ends exactly once."""
    rng = random.Random(seed)
    core = SchedulerCore(prefetch=rng.randint(0, 2), reentrant=rng.random() < 0.5)
    inflight: dict[str, list[tuple[str, int]]] = {}
    started: set[tuple[str, int]] = set()
    recalls: list[tuple[str, tuple[str, int]]] = []
    ended: dict[str, int] = {}
    total, next_node = 300, 0
    submitted = 0

    def apply(actions):
        for a in actions:
            if isinstance(a, DispatchJobs):
                inflight.setdefault(a.node_id, []).extend(a.jobs)
            elif isinstance(a, RecallJobs):
                recalls.extend((a.node_id, job) for job in a.jobs)
            elif isinstance(a, (DeliverResult, ResolveJob)):
                ended[a.job_id] = ended.get(a.job_id, 0) + 1

    def answer_recalls():
        # The node gives back a job it has not started (or starts it first, by chance).
        while recalls:
            node, job = recalls.pop(rng.randrange(len(recalls)))
            if node not in core.nodes or job not in inflight.get(node, []) or job in started:
                continue
            if rng.random() < 0.7:
                inflight[node].remove(job)
                apply(core.handle(JobsRecalled(node, (job,))))
            else:
                started.add(job)
                apply(core.handle(JobsStarted(node, (job,))))

    for _ in range(5000):
        r = rng.random()
        if r < 0.2 and submitted < total:
            apply(core.handle(JobSubmitted(f"j{submitted}")))
            submitted += 1
        elif r < 0.25 or not core.nodes:
            apply(core.handle(NodeJoined(f"n{next_node}", rng.randint(1, 4))))
            next_node += 1
        elif r < 0.28 and len(core.nodes) > 1:
            victim = rng.choice(core.nodes)
            apply(core.handle(NodeLost(victim, "sim")))
            # A lost node may still deliver late reports: they must be discarded.
            for job_id, attempt in inflight.pop(victim, [])[:2]:
                apply(core.handle(JobReported(victim, job_id, attempt)))
        elif r < 0.3 and submitted:
            apply(core.handle(CancelRequested(f"j{rng.randrange(submitted)}")))
        elif r < 0.45:
            waiting = [(n, j) for n, js in inflight.items() if n in core.nodes for j in js if j not in started]
            if waiting:
                node, job = rng.choice(waiting)
                started.add(job)
                apply(core.handle(JobsStarted(node, (job,))))
        elif r < 0.5:
            answer_recalls()
        else:
            busy = [n for n, js in inflight.items() if js and n in core.nodes]
            if busy:
                node = rng.choice(busy)
                job_id, attempt = inflight[node].pop(rng.randrange(len(inflight[node])))
                apply(core.handle(JobReported(node, job_id, attempt)))
        core.validate()
        if submitted == total and core.pending() == 0:
            break
    # Drain: report everything still in flight on live nodes.
    while core.pending():
        answer_recalls()
        if not core.nodes:
            apply(core.handle(NodeJoined(f"n{next_node}", 2)))
            next_node += 1
        for node in list(inflight):
            for job_id, attempt in inflight.pop(node):
                apply(core.handle(JobReported(node, job_id, attempt)))
        core.validate()
    assert submitted == total
    assert ended == {f"j{i}": 1 for i in range(total)}


def test_worker_death_retries_reentrant_job_until_allowed_failures():
    core = SchedulerCore(prefetch=0, reentrant=True, allowed_failures=3)
    core.handle(NodeJoined("a", 1))
    core.handle(NodeJoined("b", 1))
    core.handle(JobSubmitted("poison"))
    for attempt in (1, 2):
        node = core.node_of("poison")
        actions = core.handle(JobReported(node, "poison", attempt, worker_died=True))
        assert dispatched(actions) and dispatched(actions)[0][1] == ("poison", attempt + 1)
        core.validate()
    node = core.node_of("poison")
    assert core.handle(JobReported(node, "poison", 3, worker_died=True)) == [DeliverResult("poison", 3)]
    core.validate()


def test_worker_death_fails_at_once_when_not_reentrant():
    core = SchedulerCore(prefetch=0, reentrant=False)
    core.handle(NodeJoined("a", 1))
    core.handle(JobSubmitted("j"))
    assert core.handle(JobReported("a", "j", 1, worker_died=True)) == [DeliverResult("j", 1)]


def test_owners_share_slots_fairly():
    """A client with 10 jobs is not starved behind one with 10,000 queued before it."""
    core = SchedulerCore(prefetch=0)
    for i in range(10_000):
        core.handle(JobSubmitted(f"big{i}", owner="big"))
    for i in range(10):
        core.handle(JobSubmitted(f"small{i}", owner="small"))
    actions = core.handle(NodeJoined("n", 2))
    running = [j for _, (j, _) in dispatched(actions)]
    order = []
    for _ in range(40):
        job_id = running.pop(0)
        actions = core.handle(JobReported("n", job_id, 1))
        order.append(job_id)
        running += [j for _, (j, _) in dispatched(actions)]
        core.validate()
    small_done = [j for j in order if j.startswith("small")]
    assert len(small_done) == 10  # all small jobs ran within the first 40 slots
    assert core.queued() > 9000


def test_fair_queue_round_robin_and_remove():
    from clusterpy.core.fairqueue import FairQueue

    q = FairQueue()
    for owner, n in (("a", 3), ("b", 1), ("c", 2)):
        for i in range(n):
            q.append(f"{owner}{i}", owner)
    q.remove("c1", "c")
    q.appendleft("b-moved", "b")
    assert len(q) == 6
    assert [q.popleft() for _ in range(6)] == ["a0", "b-moved", "c0", "a1", "b0", "a2"]
    assert not q


def test_excluded_node_is_passed_over_and_job_waits_for_another():
    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("bad", 1))
    assert core.handle(JobSubmitted("j", exclude=frozenset({"bad"}), first_attempt=4)) == []
    core.handle(JobSubmitted("k"))  # an unconstrained job behind it still gets the free slot
    assert core.node_of("k") == "bad"
    core.validate()
    actions = core.handle(NodeJoined("good", 1))
    assert dispatched(actions) == [("good", ("j", 5))]  # attempts continue after first_attempt
    core.validate()


def test_replicas_of_a_group_run_on_distinct_nodes():
    core = SchedulerCore(prefetch=1)
    for n in ("a", "b", "c"):
        core.handle(NodeJoined(n, 2))
    placed = []
    for i in range(3):
        placed += dispatched(core.handle(JobSubmitted(f"r{i}", group="g")))
    assert sorted(n for n, _ in placed) == ["a", "b", "c"]
    assert dispatched(core.handle(JobSubmitted("r3", group="g"))) == []  # a 4th replica has nowhere to go
    core.validate()
    core.handle(NodeJoined("d", 1))
    assert core.node_of("r3") == "d"


def test_distrusted_node_gets_no_more_jobs():
    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("liar", 1))
    core.handle(NodeJoined("honest", 1))
    core.handle(JobSubmitted("j1"))
    core.handle(JobSubmitted("j2"))
    liar_job = "j1" if core.node_of("j1") == "liar" else "j2"
    assert core.handle(NodeDistrusted("liar", "wrong result")) == []
    assert core.distrusted("liar")
    actions = core.handle(JobReported("liar", liar_job, 1))
    assert actions == [DeliverResult(liar_job, 1)]  # its running job still reports, but no refill
    for i in range(3):
        core.handle(JobSubmitted(f"later{i}"))
    assert core.inflight("liar") == 0
    core.validate()


def test_faster_nodes_are_preferred_and_speed_is_learned():
    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("slow", 1, speed=1.0))
    core.handle(NodeJoined("fast", 1, speed=3.0))
    assert dispatched(core.handle(JobSubmitted("j1")))[0][0] == "fast"
    assert dispatched(core.handle(JobSubmitted("j2")))[0][0] == "slow"
    # The "fast" node turns out slow in practice and the other fast: preference follows.
    core.handle(JobReported("fast", "j1", 1, duration=9.0))
    core.handle(JobReported("slow", "j2", 1, duration=0.5))
    assert core.speeds.speed("slow") > core.speeds.speed("fast")
    assert dispatched(core.handle(JobSubmitted("j3")))[0][0] == "slow"
    core.validate()


def test_free_nodes_heap_round_robins_equal_speeds():
    from clusterpy.core.placement import FreeNodes

    free = FreeNodes()
    for n in "abc":
        free.add(n, 1.0)
    order = []
    for _ in range(6):
        n = free.pop()
        order.append(n)
        free.add(n, 1.0)
    assert order == list("abcabc")
    free.discard("a")
    assert len(free) == 2 and "a" not in free


def test_resizing_a_node_changes_how_many_jobs_it_holds():
    from clusterpy.core.scheduler import NodeResized

    core = SchedulerCore(prefetch=0)
    core.handle(NodeJoined("n", 4))
    for i in range(6):
        core.handle(JobSubmitted(f"j{i}"))
    assert core.inflight("n") == 4
    assert core.handle(NodeResized("n", 1)) == []
    core.handle(JobReported("n", "j0", 1))
    core.handle(JobReported("n", "j1", 1))
    core.handle(JobReported("n", "j2", 1))
    assert core.inflight("n") == 1  # only j3 left; nothing new until below one CPU
    actions = core.handle(JobReported("n", "j3", 1))
    assert dispatched(actions) == [("n", ("j4", 1))]
    assert core.handle(NodeResized("n", 0)) == []
    core.handle(JobReported("n", "j4", 1))
    assert core.inflight("n") == 0 and core.queued() == 1
    assert dispatched(core.handle(NodeResized("n", 2))) == [("n", ("j5", 1))]
    core.validate()


def _busy_node_with_one_waiting_job(core):
    """Node a (1 CPU, prefetch 1) runs j0 and holds j1 waiting behind it."""
    core.handle(NodeJoined("a", 1))
    assert dispatched(core.handle(JobSubmitted("j0")) + core.handle(JobSubmitted("j1"))) == [("a", ("j0", 1)), ("a", ("j1", 1))]
    core.handle(JobsStarted("a", (("j0", 1),)))


def test_an_idle_node_recalls_a_job_waiting_behind_a_busy_cpu():
    core = SchedulerCore(prefetch=1)
    _busy_node_with_one_waiting_job(core)
    actions = core.handle(NodeJoined("b", 1))
    assert actions == [RecallJobs("a", (("j1", 1),))]
    core.validate()
    # a gives it back unstarted: it runs on b, as a new attempt
    assert dispatched(core.handle(JobsRecalled("a", (("j1", 1),)))) == [("b", ("j1", 2))]
    core.validate()
    assert core.handle(JobReported("a", "j1", 1)) == []  # a stale report of the old attempt
    assert DeliverResult("j1", 2) in core.handle(JobReported("b", "j1", 2))
    assert DeliverResult("j0", 1) in core.handle(JobReported("a", "j0", 1))
    core.validate()
    assert core.pending() == 0


def test_a_recalled_job_the_node_already_started_just_runs_there():
    core = SchedulerCore(prefetch=1)
    _busy_node_with_one_waiting_job(core)
    core.handle(NodeJoined("b", 1))
    core.handle(JobsStarted("a", (("j1", 1),)))  # a started it before the recall arrived
    core.validate()
    assert core.handle(JobsRecalled("a", (("j1", 1),))) == []  # cannot happen, but harmless
    assert DeliverResult("j1", 1) in core.handle(JobReported("a", "j1", 1))
    core.validate()


def test_no_recall_while_jobs_are_queued_or_when_the_cpus_are_free():
    core = SchedulerCore(prefetch=1)
    _busy_node_with_one_waiting_job(core)
    core.handle(JobSubmitted("j2"))  # queued: b will get it instead of stealing
    assert dispatched(core.handle(NodeJoined("b", 1))) == [("b", ("j2", 1))]
    other = SchedulerCore(prefetch=1)
    other.handle(NodeJoined("a", 2))
    for i in range(3):
        other.handle(JobSubmitted(f"j{i}"))
    other.handle(JobsStarted("a", (("j0", 1),)))  # one CPU of a is still free for j1, j2
    assert other.handle(NodeJoined("b", 1)) == []
    assert SchedulerCore(prefetch=1, steal=False).handle(NodeJoined("x", 1)) == []


def test_adaptive_prefetch_sends_more_ahead_to_a_node_whose_jobs_are_short():
    from clusterpy.core.scheduler import MAX_AHEAD

    core = SchedulerCore(prefetch=None)
    sent = [j for _, j in dispatched(core.handle(NodeJoined("n", 2)))]
    for i in range(100):
        sent += [j for _, j in dispatched(core.handle(JobSubmitted(f"j{i}")))]
    assert len(sent) == 4  # 2 CPUs, one ahead each, before anything is known
    # Jobs of 0.1 ms: a round trip is as long as many of them; up to MAX_AHEAD per CPU go ahead.
    for _ in range(6):
        job_id, attempt = sent.pop(0)
        sent += [j for _, j in dispatched(core.handle(JobReported("n", job_id, attempt, duration=0.0001)))]
        core.validate()
    assert len(sent) == 2 * (1 + MAX_AHEAD)
    # Long jobs bring it back to one ahead per CPU: no new job until below that.
    for _ in range(2 * MAX_AHEAD):
        job_id, attempt = sent.pop(0)
        sent += [j for _, j in dispatched(core.handle(JobReported("n", job_id, attempt, duration=1.0)))]
    assert len(sent) == 4
    core.validate()
    fixed = SchedulerCore(prefetch=1)  # a fixed prefetch does not adapt
    fixed.handle(NodeJoined("m", 2))
    sent = [j for i in range(50) for _, j in dispatched(fixed.handle(JobSubmitted(f"k{i}")))]
    for _ in range(6):
        job_id, attempt = sent.pop(0)
        sent += [j for _, j in dispatched(fixed.handle(JobReported("m", job_id, attempt, duration=0.0001)))]
    assert len(sent) == 4
