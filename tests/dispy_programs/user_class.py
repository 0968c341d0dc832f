# A dispy program: objects of a user-defined class as job arguments and results.
import sys


class Point(object):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def scaled(self, factor):
        return Point(self.x * factor, self.y * factor)

    def __repr__(self):
        return 'Point(%s, %s)' % (self.x, self.y)


def compute(point, factor=2):
    return point.scaled(factor)


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    nodes = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[1:])]
    cluster = dispy.JobCluster(compute, nodes=nodes, depends=[Point])
    jobs = [cluster.submit(Point(i, -i), factor=3) for i in range(5)]
    jobs.append(cluster.submit('not a point'))  # fails on the node
    for job in jobs:
        result = job()
        if job.status == dispy.DispyJob.Finished:
            print('job %s: %r is a %s' % (job.id, result, type(result).__name__))
        else:
            print('job %s failed (%s): %s' % (job.id, job.status, job.exception.strip().splitlines()[-1]))
    cluster.close()
