"""cluster.stats() per job: records made when needed (not per queued job), same report."""

from __future__ import annotations

import json

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy._computation import package
from clusterpy.errors import ConfigurationError

from .conftest import wait_until

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: every job stays queued


def inc(x):
    return x + 1


def test_queued_jobs_are_listed_without_a_record_each():
    with clusterpy.JobCluster(inc, nodes=[UNREACHABLE], connect_timeout=1.0) as cluster:
        jobs = [cluster.submit(i) for i in range(5)]
        downstream = cluster.submit(jobs[0])  # dataflow: waits for jobs[0], not submitted to a node yet
        stats = cluster.stats()
        assert [j.job_id for j in stats.jobs] == [str(job.id) for job in jobs]
        assert all(j.status == "Created" and j.runs == 0 and j.bytes_sent > 0 for j in stats.jobs)
        assert [j.submit_time for j in stats.jobs] == [job.submit_time for job in jobs]
        assert cluster._rt.stats.jobs == {}  # a queued job costs no statistics record

        assert jobs[1].cancel()
        wait_until(jobs[1].done)
        stats = cluster.stats()
        assert [(j.job_id, j.status) for j in stats.jobs] == [
            (str(job.id), "Cancelled" if job is jobs[1] else "Created") for job in jobs]
        assert list(cluster._rt.stats.jobs) == [jobs[1]._key]  # recorded when it ended
        assert stats.jobs[1].end_time == jobs[1].end_time

        cluster.stop()
        wait_until(downstream.done)
        stats = cluster.stats()
    # The job that only waited for an upstream result was never submitted to a node: not listed.
    assert [j.job_id for j in stats.jobs] == [str(job.id) for job in jobs]
    assert {j.status for j in stats.jobs} == {"Cancelled"} and downstream.status is JobStatus.Cancelled
    assert stats.jobs_submitted == 6 and stats.stops == 1


def test_jobs_that_ran_report_their_runs_in_submission_order(node, tmp_path):
    with clusterpy.JobCluster(inc, nodes=[node.address]) as cluster:
        jobs = [cluster.submit(i) for i in range(12)]
        assert jobs[0]() == 1  # the node has joined: a job can be pinned to it
        jobs.append(cluster.submit_node(node.node_id, 100))  # placed by another path
        jobs.append(cluster.submit(200))
        assert [job() for job in jobs] == [*range(1, 13), 101, 201]
        stats = cluster.stats()
        assert cluster._rt.history.ended() == 0  # no monitor: the monitor's history is not fed
    assert [j.job_id for j in stats.jobs] == [str(job.id) for job in jobs]
    for record, job in zip(stats.jobs, jobs):
        assert (record.status, record.node_id, record.runs) == ("Finished", node.node_id, 1)
        assert (record.start_time, record.end_time) == (job.start_time, job.end_time)
        assert record.bytes_sent > 0 and record.bytes_received > 0
    assert stats.node(node.node_id).jobs_sent == 14
    table = stats.status_table()  # what print_status prints
    assert node.address in table and "Total: 14 of 14 jobs done" in table
    saved = json.loads(stats.to_json(tmp_path / "stats.json"))
    assert [j["job_id"] for j in saved["jobs"]] == [str(job.id) for job in jobs]


def test_computation_options_are_checked_before_anything_starts(tmp_path):
    for options, name in ((dict(cpus_per_job=0), "cpus_per_job"), (dict(cpus_per_job=True), "cpus_per_job"),
                          (dict(dest_path="a/b"), "dest_path"), (dict(only_if=3), "only_if"),
                          (dict(verify="no"), "verify"), (dict(replicas=0), "replicas")):
        with pytest.raises(ConfigurationError, match=name):
            clusterpy.JobCluster(inc, nodes=[UNREACHABLE], **options)
    with pytest.raises(ConfigurationError, match="does not exist"):
        clusterpy.JobCluster(str(tmp_path / "missing"), nodes=[UNREACHABLE])
    with pytest.raises(ConfigurationError, match="callable or a program"):
        clusterpy.JobCluster(3, nodes=[UNREACHABLE])


def test_package_a_function_and_a_program(tmp_path):
    function = package("c1", inc, [], keep_files=True, reentrant=True, dest_path="d")
    assert function.name == "inc" and function.deploy.kind == "function" and function.deploy.comp_id == "c1"
    assert (function.deploy.keep_files, function.deploy.reentrant, function.deploy.dest_path) == (True, True, "d")
    program = tmp_path / "prog.sh"
    program.write_text("#!/bin/sh\n")
    packed = package("c2", program, [])
    assert packed.name == "prog.sh" and packed.deploy.kind == "program" and packed.deploy.bundle is None
    assert any(f.name == "prog.sh" for f in packed.dependencies.files)
