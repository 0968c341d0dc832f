"""verify= and replicas= against real nodes, one of them started with --inject-faults corrupt-results."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy.errors import JobCancelledError, VerificationError

from .conftest import REPO

NUMBERS = list(range(1_000_003, 1_000_003 + 24))


def factorize(n):
    factors, d = [], 2
    while d * d <= n:
        while n % d == 0:
            factors.append(d)
            n //= d
        d += 1
    if n > 1:
        factors.append(n)
    return factors


def multiplies_back(factors, n):
    return math.prod(factors) == n and all(f > 1 for f in factors)


def check_all_correct(jobs):
    for job, n in zip(jobs, NUMBERS):
        assert job() == factorize(n)
        assert job.status is JobStatus.Finished


def test_verify_catches_a_corrupting_node_and_reruns_its_jobs_elsewhere(start_node):
    good = start_node(cpus=2)
    bad = start_node(cpus=2, extra=["--inject-faults", "corrupt-results"])
    with clusterpy.JobCluster(factorize, nodes=[good.address, bad.address], verify=multiplies_back) as cluster:
        jobs = [cluster.submit(n) for n in NUMBERS]
        check_all_correct(jobs)
        assert all(job.node_id == good.node_id for job in jobs)  # every accepted result is the honest node's
        stats = cluster.stats()
    assert stats.untrusted_nodes == [bad.node_id]
    liar, honest = stats.node(bad.node_id), stats.node(good.node_id)
    assert not liar.trusted and "failed verification" in liar.distrust_reason
    assert liar.failed_verification >= 1 and liar.verified == 0
    assert honest.trusted and honest.verified == len(NUMBERS) and honest.failed_verification == 0
    assert {j.verification for j in stats.jobs} == {"verified"}
    assert sum(j.runs for j in stats.jobs) > len(NUMBERS)  # some ran twice


def test_voting_with_three_replicas_outvotes_a_corrupting_node(start_node):
    nodes = [start_node(cpus=2) for _ in range(3)]
    bad = start_node(cpus=2, extra=["--inject-faults", "corrupt-results"])
    with clusterpy.JobCluster(factorize, nodes=[n.address for n in (*nodes, bad)], replicas=3) as cluster:
        jobs = [cluster.submit(n) for n in NUMBERS]
        check_all_correct(jobs)
        assert all(job.node_id != bad.node_id for job in jobs)
        cluster.wait()
        stats = cluster.stats()
    assert stats.untrusted_nodes == [bad.node_id]
    liar = stats.node(bad.node_id)
    assert liar.disagreed >= 1 and liar.agreed == 0 and "disagreed with the majority" in liar.distrust_reason
    assert all(stats.node(n.node_id).trusted and stats.node(n.node_id).disagreed == 0 for n in nodes)
    assert all(j.verification.startswith("voted ") for j in stats.jobs)


def test_no_trustworthy_result_fails_the_job_clearly(start_node):
    bad = start_node(cpus=1, extra=["--inject-faults", "corrupt-results"])
    with clusterpy.JobCluster(factorize, nodes=[bad.address], verify=multiplies_back) as cluster:
        job = cluster.submit(NUMBERS[0])
        with pytest.raises(VerificationError, match="has no trustworthy result: its result failed verification"):
            job()
        assert job.status is JobStatus.Terminated
        assert cluster.stats().untrusted_nodes == [bad.node_id]


def test_replicate_fraction_replicates_part_of_the_jobs(start_node):
    nodes = [start_node(cpus=1) for _ in range(2)]
    with clusterpy.JobCluster(factorize, nodes=[n.address for n in nodes], replicas=2,
                              replicate_fraction=0.25) as cluster:
        jobs = [cluster.submit(n) for n in NUMBERS[:8]]
        check_all_correct(jobs)
        cluster.wait()
        stats = cluster.stats()
    verdicts = [j.verification for j in stats.jobs]
    assert verdicts.count("unchecked") == 6 and verdicts.count("voted 2/2") == 2
    assert sum(j.runs for j in stats.jobs) == 10


def slow_identity(x):
    import time

    time.sleep(x)
    return x


def test_cancelling_and_stopping_replicated_jobs_while_they_run(start_node):
    nodes = [start_node(cpus=1) for _ in range(2)]
    with clusterpy.JobCluster(slow_identity, nodes=[n.address for n in nodes], replicas=2,
                              verify=lambda r, x: r == x) as cluster:
        running = cluster.submit(5)
        deadline = time.monotonic() + 10
        while running.status is not JobStatus.Running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cluster.cancel(running)
        with pytest.raises(JobCancelledError):
            running(10)
        jobs = [cluster.submit(5) for _ in range(3)]
        assert cluster.stop() == 3
        assert cluster.wait(10)  # every replica's node confirmed: nothing runs any more
        assert all(job.status is JobStatus.Cancelled for job in jobs)
        assert cluster.submit(0.01)() == 0.01  # both nodes still trusted and in use
        assert cluster.stats().untrusted_nodes == []


def test_bad_trust_options_are_refused():
    for options in ({"replicas": 0}, {"replicate_fraction": 2}, {"verify": 3}, {"max_reruns": -1}, {"only_if": 1}):
        with pytest.raises(clusterpy.ConfigurationError):
            clusterpy.JobCluster(factorize, nodes=["127.0.0.1:1"], **options)


def test_verify_example_runs(start_node, tmp_path):
    nodes = [start_node(cpus=1) for _ in range(3)]
    bad = start_node(cpus=1, extra=["--inject-faults", "corrupt-results"])
    out = subprocess.run([sys.executable, str(REPO / "examples" / "verify.py"), *(n.address for n in (*nodes, bad))],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "all results correct" in out.stdout
    assert f"untrusted: {bad.address}" in out.stdout
