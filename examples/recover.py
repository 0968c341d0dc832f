"""Crash recovery: a client dies mid-run; a new process collects its results.

    clusterpy-node --port 9700                     # in another terminal
    python examples/recover.py [NODE_HOST:PORT]

The script starts a child client that submits jobs with ``recover_file`` and then dies (SIGKILL)
before they finish. The node keeps running the jobs and keeps their results; this process then
calls ``clusterpy.recover_jobs`` on the journal and prints every result.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import clusterpy


def compute(x):
    import time

    time.sleep(0.3)
    return x * 2


def crash(node, journal):
    cluster = clusterpy.JobCluster(compute, nodes=[node], recover_file=journal)
    for i in range(8):
        cluster.submit(i)
    time.sleep(0.5)  # some jobs are running, some done
    os.kill(os.getpid(), signal.SIGKILL)


def main(node):
    journal = os.path.join(tempfile.mkdtemp(), "journal")
    child = subprocess.run([sys.executable, __file__, "--crash", node, journal])
    print(f"client died with signal {-child.returncode}; recovering from {journal}")
    jobs = clusterpy.recover_jobs(journal)
    for job in jobs:
        print(f"job {job.id}: {job.status.value} result={job.result}")
    resubmit = [job for job in jobs if job.status is clusterpy.JobStatus.Created]
    if resubmit:
        with clusterpy.JobCluster(compute, nodes=[node]) as cluster:
            for job in [cluster.submit(*j.args) for j in resubmit]:
                print(f"resubmitted job: result={job()}")
    os.unlink(journal)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--crash"]:
        crash(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9700")
