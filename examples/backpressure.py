"""Backpressure: submitting far more jobs than the cluster can run, in bounded memory.

    python examples/backpressure.py                      # embedded local node, 10,000 jobs
    python examples/backpressure.py --jobs 3000 10.0.0.5 # real nodes

A JobCluster holds at most ``max_queued`` jobs that wait for a node (default 100,000, about
1 KB each); at that bound ``submit()`` blocks until the nodes take more, so a loop over a huge
input paces itself to the cluster. ``submit_timeout`` bounds the wait: past it, submit raises
QueueFullError and the program can do something else first (``submit_timeout=0``: never wait).
"""

import argparse
import time

import clusterpy
from clusterpy import QueueFullError


def work(x):
    import time

    time.sleep(0.001)  # a little real work, so that submitting outruns the two CPUs
    return x * x


def main(nodes, jobs, bound=200):
    options = {"nodes": nodes} if nodes else {"local": True, "local_cpus": 2}
    with clusterpy.JobCluster(work, max_queued=bound, **options) as cluster:
        # 1. submit() blocks at the bound: the loop runs at the speed of the cluster.
        peak, blocked = 0, 0.0
        submitted = []
        for x in range(jobs):
            start = time.perf_counter()
            submitted.append(cluster.submit(x))
            took = time.perf_counter() - start
            blocked += took if took > 0.001 else 0.0
            peak = max(peak, cluster.queued)
        print(f"submitted {jobs} jobs with max_queued={bound}: never more than {bound} jobs queued "
              f"(peak {peak}); submit() waited {blocked:.2f} s in all for the nodes to catch up")
        results = [job() for job in submitted]
        ok = results == [x * x for x in range(jobs)]
        print(f"{len(results)} results, all correct" if ok else "WRONG RESULTS")

        # 2. submit_timeout=0: never wait; on QueueFullError, do other work, then try again.
        accepted, refused = [], 0
        x = 0
        while x < 2 * bound:
            try:
                accepted.append(cluster.submit_job((x,), submit_timeout=0))
                x += 1
            except QueueFullError as exc:
                if not refused:
                    print(f"after {len(accepted)} jobs: QueueFullError: {exc}")
                refused += 1
                time.sleep(0.01)  # something useful instead; the cluster works meanwhile
        assert [job() for job in accepted] == [x * x for x in range(2 * bound)]
        print(f"submit_timeout=0: {len(accepted)} jobs submitted, {refused} attempts found the queue full")
        return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nodes", nargs="*", help="node addresses (default: an embedded local node)")
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    raise SystemExit(main(args.nodes, args.jobs))
