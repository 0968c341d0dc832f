# A dispy program: each node gets its own data file and setup arguments from a NodeAllocate
# subclass; setup loads the file into a global that the jobs read.
# Run: python node_setup.py DATA_DIR HOST:PORT [HOST:PORT ...]
import sys


def setup(data_file):
    global data, file_name
    with open(data_file) as f:  # shipped to this node only, into the computation's directory
        data = f.read().strip()
    file_name = data_file
    return 0


def cleanup(data_file):
    global data, file_name
    del data, file_name


def compute(n):
    import time
    time.sleep(0.05)
    return (dispy_node_name, dispy_node_ip_addr, file_name, data, n)


if __name__ == '__main__':
    import glob
    import os
    import threading
    import clusterpy.compat.dispy as dispy

    data_files = sorted(glob.glob(os.path.join(sys.argv[1], '*.txt')))
    addresses = [arg.rsplit(':', 1) for arg in sys.argv[2:]]
    node_number = 0
    ready = threading.Semaphore(0)

    class NodeAllocate(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
            global node_number
            data_file = data_files[node_number % len(data_files)]
            node_number += 1
            print('node %s (%s, %s CPUs, %s) gets %s' % (ip_addr, name, cpus, platform, os.path.basename(data_file)))
            self.depends = [data_file]
            self.setup_args = (os.path.basename(data_file),)
            return 1  # one job at a time on each node

    def cluster_status(status, node, job):
        if status == dispy.DispyNode.Initialized:
            ready.release()

    cluster = dispy.JobCluster(compute, nodes=[NodeAllocate(host, int(port)) for host, port in addresses],
                               setup=setup, cleanup=cleanup, cluster_status=cluster_status)
    for _ in addresses:
        assert ready.acquire(timeout=30), 'a node was not set up'
    jobs = [cluster.submit(i) for i in range(8)]
    for job in jobs:
        name, ip_addr, file_name, data, n = job()
        print('job %s ran with %s: %s' % (n, file_name, data))
    print('cpus per node: %s' % [node.cpus for node in cluster.status().nodes])
    cluster.close()
