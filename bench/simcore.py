"""F. The sans-IO scheduling core alone, driven with simulated nodes.

No sockets and no processes: the driver feeds :class:`clusterpy.core.scheduler.SchedulerCore`
the events a client would (``NodeJoined``, ``JobSubmitted``, then per dispatched job
``JobsStarted`` and ``JobReported``), completing the oldest job in flight first, and times it.

* submit phase: ``jobs`` submissions; the first ``nodes * cpus * (1 + prefetch)`` are
  dispatched at once, the rest queue.
* drain phase: each completion frees a slot that the core fills from the queue; the time per
  completion is sampled in windows as the queue shrinks from ``jobs`` to 0, which shows
  whether a decision costs more when more jobs are queued.
* memory: ``tracemalloc`` around submitting jobs that must queue (no node has room), divided
  by their number (job ids are made before, as the client makes them anyway).

Run alone: ``python bench/simcore.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections import deque
from typing import Any

from clusterpy.core.scheduler import DispatchJobs, JobReported, JobsStarted, JobSubmitted, NodeJoined, SchedulerCore

NODE_COUNTS = (10, 100, 1_000, 10_000)


def simulate(nodes: int, jobs: int, *, cpus: int = 2, prefetch: int = 1, windows: int = 10) -> dict[str, Any]:
    """Run ``jobs`` jobs through a core with ``nodes`` simulated nodes; return rates and samples."""
    core = SchedulerCore(prefetch=prefetch)
    for i in range(nodes):
        core.handle(NodeJoined(f"node-{i}", cpus))
    ids = [str(i) for i in range(jobs)]
    inflight: deque[tuple[str, str, int]] = deque()
    handle = core.handle

    def dispatched(actions: list[Any]) -> None:
        for action in actions:
            if type(action) is DispatchJobs:
                handle(JobsStarted(action.node_id, action.jobs))  # the node's report that they started
                node = action.node_id
                inflight.extend((node, job, attempt) for job, attempt in action.jobs)

    gc.collect()
    gc.disable()  # a full collection of a million objects would land in one window
    try:
        start = time.perf_counter()
        for job_id in ids:
            dispatched(handle(JobSubmitted(job_id)))
        submit_s = time.perf_counter() - start

        done = 0
        step = max(1, jobs // windows)
        samples: list[tuple[int, float]] = []  # (queued at window start, microseconds per job)
        start = window_start = time.perf_counter()
        queued_at_start = jobs - len(inflight)
        while inflight:
            node, job, attempt = inflight.popleft()
            dispatched(handle(JobReported(node, job, attempt)))
            done += 1
            if done % step == 0:
                now = time.perf_counter()
                samples.append((queued_at_start, (now - window_start) / step * 1e6))
                window_start = now
                queued_at_start = jobs - done - len(inflight)
        drain_s = time.perf_counter() - start
    finally:
        gc.enable()
    if done != jobs or core.pending():
        raise AssertionError(f"simulation lost jobs: {done} of {jobs} done, {core.pending()} pending")
    return {
        "nodes": nodes,
        "jobs": jobs,
        "submit_per_s": jobs / submit_s,
        "drain_per_s": jobs / drain_s,
        "lifecycle_per_s": jobs / (submit_s + drain_s),
        "samples": samples,
    }


def memory_per_queued_job(jobs: int, nodes: int = 1_000, cpus: int = 2) -> float:
    """Bytes the core holds per queued job (nodes are full, so every job waits in the queue)."""
    core = SchedulerCore(prefetch=1)
    for i in range(nodes):
        core.handle(NodeJoined(f"node-{i}", cpus))
    for i in range(nodes * cpus * 2):  # fill every slot first
        core.handle(JobSubmitted(f"fill-{i}"))
    ids = [f"job-{i}" for i in range(jobs)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for job_id in ids:
            core.handle(JobSubmitted(job_id))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / jobs


def client_memory_per_queued_job(jobs: int) -> float:
    """Bytes the whole client (JobCluster) holds per job it cannot place yet.

    The cluster's only node address refuses connections, so every job stays queued; counted:
    the job object (its id, key and empty kwargs), its pickled arguments, the runtime's entry
    and the scheduling core's record. Not counted: the caller's arguments and the list that
    holds the jobs (made before). No future (made only on demand) and no statistics record
    (made at first dispatch) exist yet for a queued job.
    """
    import benchjobs
    from clusterpy.client import JobCluster
    from frameworks import SECRET

    cluster = JobCluster(benchjobs.inc, nodes=["127.0.0.1:1"], secret=SECRET, connect_timeout=1.0)
    try:
        args = list(range(1_000, 1_000 + jobs))  # ints past the small-int cache: the caller's, not counted
        held: list[Any] = [None] * jobs
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(jobs):
                held[i] = cluster.submit(args[i])
            cluster.nodes()  # runs in the loop thread after every queued submission: a barrier
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        return (after - before) / jobs
    finally:
        cluster.close(terminate=True, timeout=60)


def run(quick: bool) -> dict[str, Any]:
    jobs = 100_000 if quick else 1_000_000
    out: dict[str, Any] = {"sims": [simulate(n, jobs) for n in NODE_COUNTS]}
    out["core_bytes_per_job"] = memory_per_queued_job(20_000 if quick else 100_000)
    try:
        out["client_bytes_per_job"] = client_memory_per_queued_job(5_000 if quick else 20_000)
    except Exception as exc:  # noqa: BLE001 -- reported, not fatal: the core figures stand alone
        out["client_error"] = repr(exc)
    return out


def format_report(res: dict[str, Any]) -> str:
    lines = ["| nodes | jobs | submit events/s | drain jobs/s (report+start+dispatch) | whole lifecycle jobs/s | "
             "us/job: deepest queue -> last window |", "|---:|---:|---:|---:|---:|---|"]
    for s in res["sims"]:
        first, last = s["samples"][0], s["samples"][-1]
        lines.append(f"| {s['nodes']:,} | {s['jobs']:,} | {s['submit_per_s']:,.0f} | {s['drain_per_s']:,.0f} | "
                     f"{s['lifecycle_per_s']:,.0f} | {first[1]:.2f} (queue {first[0]:,}) -> "
                     f"{last[1]:.2f} (queue {last[0]:,}) |")
    lines.append("")
    lines.append(f"Memory per queued job, core alone: {res['core_bytes_per_job']:,.0f} bytes")
    if "client_bytes_per_job" in res:
        lines.append(f"Memory per queued job, whole JobCluster client (job, pickled args, runtime and core records): "
                     f"{res['client_bytes_per_job']:,.0f} bytes")
    else:
        lines.append(f"Client memory not measured: {res.get('client_error')}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    print(format_report(run(parser.parse_args().quick)))
