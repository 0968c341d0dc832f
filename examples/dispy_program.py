"""A dispy program running on clusterpy: the only change from dispy is the import line.

    python examples/dispy_program.py 10.0.0.5 10.0.0.6:9700    # nodes running clusterpy-node
    python examples/dispy_program.py                            # discover nodes (else a local one)

To keep ``import dispy`` itself unchanged: ``PYTHONPATH=$(python -m clusterpy.compat) python prog.py``.
See docs/DISPY.md for every dispy name and how clusterpy treats it.
"""

import sys


def compute(n):  # runs on a node; dispy_node_name is a global there, as with dispynode
    import time
    time.sleep(0.05)
    return dispy_node_name, n * n


if __name__ == "__main__":
    import clusterpy.compat.dispy as dispy  # was: import dispy

    cluster = dispy.JobCluster(compute, nodes=sys.argv[1:] or None)
    jobs = []
    for i in range(10):
        job = cluster.submit(i)
        job.id = i
        jobs.append(job)
    for job in jobs:
        host, square = job()
        if job.status == dispy.DispyJob.Finished:
            print("job %s: %s computed on %s (%s)" % (job.id, square, host, job.ip_addr))
        else:
            print("job %s failed: %s" % (job.id, job.exception))
    cluster.print_status()
    cluster.close()
