"""The quick start: run a function on the cluster's nodes.

With no argument it starts an embedded local node; pass node addresses to use real nodes:
    python examples/sample.py                 # embedded local node
    python examples/sample.py 10.0.0.5 10.0.0.6:9700
"""

import sys

import clusterpy


def compute(n):
    import socket
    import time

    time.sleep(n)
    print(f"slept {n}s")
    return socket.gethostname(), n


def main(nodes):
    with clusterpy.JobCluster(compute, nodes=nodes or None) as cluster:
        jobs = [cluster.submit(i % 3 / 10) for i in range(10)]
        for job in jobs:
            host, n = job()  # waits; re-raises the remote exception with its traceback
            print(f"job {job.id}: {host} slept {n}s on {job.ip_addr} "
                  f"in {job.end_time - job.start_time:.3f}s, stdout={job.stdout.strip()!r}")
        cluster.print_status()


if __name__ == "__main__":
    main(sys.argv[1:])
