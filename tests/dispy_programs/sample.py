# A dispy program: a sampling loop that prints which node ran each job.
# Run: python sample.py HOST:PORT [HOST:PORT ...]   (nodes, as dispy's nodes= list)
import sys


def compute(n):
    import time
    time.sleep(0.05)
    return (dispy_node_name, dispy_node_ip_addr, n * n)


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    nodes = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[1:])]
    cluster = dispy.JobCluster(compute, nodes=nodes, pulse_interval=0.5)
    jobs = []
    for i in range(12):
        job = cluster.submit(i)
        job.id = i  # any object can serve as the job's id
        jobs.append(job)
    for job in jobs:
        host, ip_addr, square = job()
        print('%s (%s) executed job %s: %s, status %s' % (host, ip_addr, job.id, square, job.status))
    cluster.wait()
    cluster.print_status()
    status = cluster.status()
    print('nodes used: %s' % sorted('%s/%s' % (node.name, node.jobs_done) for node in status.nodes))
    cluster.close()
