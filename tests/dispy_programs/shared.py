# A dispy program: nodes shared with other programs through a scheduler (SharedJobCluster).
# Run: python shared.py SCHEDULER_HOST:PORT
import sys


def compute(n):
    return (dispy_node_name, n * 2)


def job_status(job):
    if job.status == dispy.DispyJob.Finished:
        done.append(job.result[1])


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    done = []
    cluster = dispy.SharedJobCluster(compute, scheduler_host=sys.argv[1], job_status=job_status)
    jobs = [cluster.submit(i) for i in range(10)]
    cluster.wait()
    cluster.close()
    print('results %s' % [job.result[1] for job in jobs])
    print('job_status saw %s' % sorted(done))
    print('node names %s' % sorted(set(job.result[0] for job in jobs)))
