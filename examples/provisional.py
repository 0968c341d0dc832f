"""Provisional results and files sent back while a job runs.

Each job reports its progress with ``clusterpy.provisional_result`` (the callback sees the job
with status ``ProvisionalResult``) and sends a report file it wrote with ``clusterpy.send_file``;
the files land in ``./clusterpy-results/<job id>/``.

    python examples/provisional.py                 # embedded local node
    python examples/provisional.py 10.0.0.5 10.0.0.6:9700
"""

import os
import sys

import clusterpy


def simulate(name, steps):
    import os
    import time

    import clusterpy

    total = 0
    for step in range(1, steps + 1):
        total += step * step
        time.sleep(0.02)
        if step % (steps // 4) == 0:
            clusterpy.provisional_result(f"{name}: progress {100 * step // steps}%")
    # Jobs of a computation share its directory on a node: give each job's file its own name.
    report = f"report-{name}.txt"
    with open(report, "w") as f:
        f.write(f"{name}: sum of squares up to {steps} is {total}\n")
    clusterpy.send_file(report)
    os.unlink(report)
    return total


def on_update(job):
    if job.status is clusterpy.JobStatus.ProvisionalResult:
        print(f"job {job.id}: {job.result}", flush=True)
    else:
        print(f"job {job.id}: final {job.result} ({job.status.value})", flush=True)


def main(nodes):
    with clusterpy.JobCluster(simulate, nodes=nodes or None, callback=on_update,
                              files_dir="clusterpy-results") as cluster:
        jobs = [cluster.submit_job((name, 20), job_id=name) for name in ("alpha", "beta")]
        for job in jobs:
            job()
            for path in job.files:
                with open(path) as f:
                    print(f"{os.path.relpath(path)}: {f.read().strip()}")


if __name__ == "__main__":
    main(sys.argv[1:])
