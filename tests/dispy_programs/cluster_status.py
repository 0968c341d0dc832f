# A dispy program: follow nodes and jobs with a cluster_status callback.
import sys


def compute(n):
    if n == 3:
        raise ValueError('three is not allowed')
    return n + 100


def cluster_status(status, node, job):
    names = {dispy.DispyNode.Initialized: 'Initialized', dispy.DispyNode.Closed: 'Closed',
             dispy.DispyJob.Created: 'Created', dispy.DispyJob.Running: 'Running',
             dispy.DispyJob.Finished: 'Finished', dispy.DispyJob.Terminated: 'Terminated',
             dispy.DispyJob.Cancelled: 'Cancelled', dispy.DispyJob.Abandoned: 'Abandoned'}
    if job is None:
        print('node %s:%s %s' % (node.ip_addr, node.port, names[status]))
    else:
        where = '%s:%s' % (node.ip_addr, node.port) if node else '-'
        print('job %s %s on %s' % (job.id, names[status], where))


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    nodes = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[1:])]
    cluster = dispy.JobCluster(compute, nodes=nodes, cluster_status=cluster_status,
                               loglevel=dispy.logger.WARNING)
    while len(cluster.status().nodes) < len(nodes):
        cluster.wait(0.05)
    jobs = [cluster.submit_job_id('j%s' % i, i) for i in range(5)]
    cluster.wait()
    cluster.close()
    print('results %s' % [job.result for job in jobs])
