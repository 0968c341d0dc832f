# A dispy program: jobs report provisional results; the client cancels a job once its
# provisional result is good enough. Another job sends a file back with dispy_send_file.
import sys


def compute(kind, steps):
    import time
    if kind == 'file':
        with open('report-%s.txt' % steps, 'w') as f:
            f.write('report of %s steps\n' % steps)
        assert dispy_send_file('report-%s.txt' % steps) == 0
        assert dispy_send_file('no-such-file') == -1
        return 'sent'
    for i in range(steps):
        assert dispy_provisional_result(i) == 0
        time.sleep(0.02)
    return 'all %s steps' % steps


def job_status(job):
    if job.status == dispy.DispyJob.ProvisionalResult:
        seen.setdefault(job.id, []).append(job.result)
        if job.result >= 5:
            cluster.cancel(job)


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    seen = {}
    nodes = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[1:])]
    cluster = dispy.JobCluster(compute, nodes=nodes, job_status=job_status)
    jobs = [cluster.submit_job_id('search-%s' % i, 'search', 500) for i in range(2)]
    sender = cluster.submit_job_id('sender', 'file', 7)
    for job in jobs:
        job()
        print('%s: status %s, provisional results %s' % (job.id, job.status, sorted(set(seen.get(job.id, [])))[:6]))
    print('sender: %s %s' % (sender(), [open(path).read().strip() for path in sender.files]))
    cluster.close()
