"""Node scoring: the start-up benchmark, its score in the handshake, and faster nodes preferred."""

from __future__ import annotations

import collections
import json
import time

import clusterpy
from clusterpy.benchmark import run_benchmark, workload


def short_job(n):
    import time

    time.sleep(0.02)
    return n


def test_benchmark_is_deterministic_short_and_scales_with_slowdown():
    assert workload() == workload()
    began = time.perf_counter()
    score = run_benchmark()
    assert time.perf_counter() - began < 1.0  # ~50-100 ms on an idle core
    assert score > 0
    assert run_benchmark(rounds=1, slowdown=1e6) < score / 1000


def test_a_slowed_node_scores_lower_and_gets_measurably_fewer_jobs(start_node, tmp_path):
    fast = start_node(cpus=1)
    slow = start_node(cpus=1, extra=["--slowdown", "4"])
    with clusterpy.JobCluster(short_job, nodes=[fast.address, slow.address]) as cluster:
        deadline = time.monotonic() + 10
        while len(cluster.nodes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # One job at a time: each goes to the fastest free node, so the slowed one stays idle
        # (with equal scores, the two would take turns).
        one_by_one = []
        for i in range(16):
            job = cluster.submit(i)
            job()
            one_by_one.append(job.node_id)
        # A burst: both are busy, and the slowed node gets fewer jobs still.
        burst = [cluster.submit(i) for i in range(40)]
        assert [job() for job in burst] == list(range(40))
        stats = cluster.stats()
    f, s = stats.node(fast.node_id), stats.node(slow.node_id)
    assert s.score < f.score / 2, (s.score, f.score)  # the benchmark ran 4 times slower
    assert one_by_one.count(slow.node_id) <= 2, one_by_one
    assert s.jobs_done + f.jobs_done == 56
    per_node = collections.Counter(job.node_id for job in burst)
    assert per_node[slow.node_id] < per_node[fast.node_id] / 2, per_node
    # What the scheduler learned: the slowed node's jobs take longer; its speed ranks lower.
    assert s.observed_job_time is not None and f.observed_job_time is not None
    assert s.observed_job_time > 2 * f.observed_job_time
    assert s.speed < f.speed / 2
    stats.to_json(tmp_path / "stats.json")
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert {n["node_id"]: n["score"] for n in saved["nodes"]} == {f.node_id: f.score, s.node_id: s.score}
    assert len(saved["jobs"]) == 56 and all(j["status"] == "Finished" for j in saved["jobs"])
