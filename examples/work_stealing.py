"""A slow job does not hold back the jobs sent after it (work stealing).

Each node is sent a job ahead of time per CPU (``prefetch``), so its CPUs never wait for the
network. When one of those jobs lands behind a slow job, a node that runs out of work takes
it back, if it has not started, and runs it. Run with two nodes of one CPU each:

    clusterpy-node --cpus 1 --port 9700 &   clusterpy-node --cpus 1 --port 9710 &
    python examples/work_stealing.py 127.0.0.1:9700 127.0.0.1:9710
"""

import sys
import time

import clusterpy


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def fast_jobs_done_after(nodes, work_stealing):
    with clusterpy.JobCluster(nap, nodes=nodes, work_stealing=work_stealing) as cluster:
        while True:  # until both nodes are up: two jobs at once run one per node
            warm = [cluster.submit(0.3), cluster.submit(0.3)]
            for job in warm:
                job()
            if len({job.node_id for job in warm}) == 2:
                break
        began = time.monotonic()
        slow = cluster.submit(3.0)
        fast = [cluster.submit(0.2) for _ in range(3)]
        for job in fast:
            job()
        took = time.monotonic() - began
        slow()
        return took


def main(nodes):
    with_stealing = fast_jobs_done_after(nodes, work_stealing=True)
    without = fast_jobs_done_after(nodes, work_stealing=False)
    print(f"3 fast jobs next to a 3 s job: done after {with_stealing:.1f}s with work stealing, "
          f"{without:.1f}s without")
    return 0 if with_stealing < 2.5 <= without else 1


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python examples/work_stealing.py NODE NODE   (two nodes of one CPU each)")
    sys.exit(main(sys.argv[1:]))
