# A dispy program: submit many jobs but keep only a few pending, driven by job_status.
import sys
import threading


def compute(n):
    import time
    time.sleep(0.02)
    return n * n


def job_status(job):
    # called for each job as it ends (and for each provisional result)
    global pending, total
    if job.status in (dispy.DispyJob.Finished, dispy.DispyJob.Terminated,
                      dispy.DispyJob.Abandoned, dispy.DispyJob.Cancelled):
        with jobs_cond:
            pending -= 1
            if job.status == dispy.DispyJob.Finished:
                total += job.result
            if pending <= lower_bound:
                jobs_cond.notify()


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    lower_bound, upper_bound = 3, 6
    jobs_cond = threading.Condition()
    pending = most_pending = total = 0
    nodes = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[1:])]
    cluster = dispy.JobCluster(compute, nodes=nodes, job_status=job_status)
    for i in range(40):
        job = cluster.submit(i)
        with jobs_cond:
            pending += 1
            most_pending = max(most_pending, pending)
            if pending >= upper_bound:
                jobs_cond.wait()
    cluster.wait()
    cluster.close()
    print('total %s, most pending %s, pending now %s' % (total, most_pending, pending))
