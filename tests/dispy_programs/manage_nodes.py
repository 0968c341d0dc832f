# A dispy program: manage the cluster's nodes while it runs: submit to a chosen node, change
# the CPUs used, list a node's jobs, give a node back and take it again, close a node.
# Run: python manage_nodes.py HOST:PORT HOST:PORT
import sys
import time


def compute(seconds):
    import time
    time.sleep(seconds)
    return dispy_node_ip_addr


def ran_on(jobs, node):
    # clusterpy's job (DispyJob.cluster_job) knows its node's id: both test nodes share an address
    return sum(job.cluster_job.node_id == node._node_id for job in jobs)


if __name__ == '__main__':
    import clusterpy.compat.dispy as dispy
    first, second = [(host, int(port)) for host, port in (arg.rsplit(':', 1) for arg in sys.argv[1:3])]
    cluster = dispy.JobCluster(compute, nodes=[first])
    while len(cluster.status().nodes) < 1:
        time.sleep(0.05)
    node = cluster.status().nodes[0]
    print('first node: %s CPUs of %s' % (node.cpus, node.avail_cpus))
    print('set_node_cpus -> %s' % cluster.set_node_cpus(node, -1))
    pinned = [cluster.submit_node(node, 0.3) for _ in range(3)]
    time.sleep(0.15)
    print('jobs on first node: %s' % len(cluster.node_jobs(node)))
    cluster.wait()
    print('deallocate_node -> %s' % cluster.deallocate_node(node))
    print('allocate second node -> %s' % cluster.allocate_node(dispy.NodeAllocate(*second)))
    while len(cluster.status().nodes) < 2:
        time.sleep(0.05)
    late = [cluster.submit(0.05) for _ in range(4)]
    cluster.wait()
    print('while deallocated, jobs on first node: %s' % ran_on(late, node))
    print('allocate first node again -> %s' % cluster.allocate_node(dispy.NodeAllocate(*first)))
    again = [cluster.submit(0.2) for _ in range(6)]
    cluster.wait()
    print('given back, jobs on first node: %s' % (ran_on(again, node) > 0))
    print('submit to unknown node -> %s' % cluster.submit_node('192.0.2.1', 0))
    print('close_node -> %s' % cluster.close_node(node))
    while len(cluster.status().nodes) > 1:
        time.sleep(0.05)
    print('nodes left: %s' % ([n.port for n in cluster.status().nodes] == [second[1]]))
    print('set_node_cpus of a closed node -> %s' % cluster.set_node_cpus(node, 2))
    print('pinned jobs: %s' % [job.status for job in pinned])
    cluster.close()
