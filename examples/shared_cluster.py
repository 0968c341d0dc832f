"""Share nodes among several programs through clusterpy-scheduler.

Start the daemons (each in its own terminal, or in the background):
    clusterpy-node --port 9700
    clusterpy-scheduler --nodes 127.0.0.1:9700
then run this script (as many copies at once as you like):
    python examples/shared_cluster.py [SCHEDULER_HOST:PORT]

Compared with examples/sample.py, only the cluster line changes.
"""

import sys

import clusterpy


def compute(n):
    import os

    return os.getpid(), n * n


def main(scheduler):
    with clusterpy.SharedJobCluster(compute, scheduler) as cluster:
        jobs = [cluster.submit(i) for i in range(20)]
        for job in jobs:
            pid, square = job()
            print(f"job {job.id}: {square} computed by worker {pid} on {job.ip_addr}")
        cluster.print_status()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9702")
