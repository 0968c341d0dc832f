# A dispy program: the client dies while its jobs run; a later run collects their results.
# Run: python recover.py crash RECOVER_FILE HOST:PORT   then   python recover.py recover RECOVER_FILE
import os
import sys


def compute(n):
    import time
    time.sleep(0.5)
    return n * 10


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    mode, recover_file = sys.argv[1], sys.argv[2]
    if mode == 'crash':
        nodes = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[3:])]
        cluster = dispy.JobCluster(compute, nodes=nodes, recover_file=recover_file)
        jobs = [cluster.submit_job_id('job-%s' % i, i) for i in range(3)]
        while not any(job.status == dispy.DispyJob.Running for job in jobs):
            cluster.wait(0.02)
        print('jobs running; the client dies now', flush=True)
        os._exit(3)
    for job in sorted(dispy.recover_jobs(recover_file, timeout=20), key=lambda job: job.id):
        print('%s: %s %s' % (job.id, job.status, job.result))
