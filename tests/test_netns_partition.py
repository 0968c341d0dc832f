"""A network partition between hosts (network namespaces): a node's link goes down for longer
than the detection time; its jobs are resubmitted; when the link returns, its late results are
discarded, so every job is delivered exactly once."""

from __future__ import annotations

import json
import time

import pytest

from .netns import Network, _ip, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

CLIENT = r'''
import collections, json, logging, sys, threading, time
import clusterpy

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)

def work(x):
    import time
    time.sleep(3.0 if x < 2 else 0.2)
    return x * 7

seen = collections.Counter()
lock = threading.Lock()
def callback(job):
    with lock:
        seen[job.id] += 1

nodes = sys.argv[1:]
with clusterpy.JobCluster(work, nodes=nodes, reentrant=True, pulse_interval=0.2, node_timeout=0.8,
                          connect_timeout=1.0, prefetch=0, callback=callback, discover=False) as cluster:
    while len(cluster.nodes()) < 2:
        time.sleep(0.05)
    jobs = [cluster.submit(i) for i in range(8)]
    while not all(j.status is clusterpy.JobStatus.Running for j in jobs[:2]):
        time.sleep(0.02)
    print(json.dumps({"event": "running", "on": {str(j.id): j.ip_addr for j in jobs[:2]}}), flush=True)
    results = [j() for j in jobs]
    cluster.wait()
    time.sleep(2.5)  # the partitioned node's late reports arrive meanwhile
    print(json.dumps({"event": "done", "results": results, "nodes": [j.ip_addr for j in jobs],
                      "connected": sum(n["connected"] for n in cluster.nodes())}), flush=True)
print(json.dumps({"event": "callbacks", "counts": sorted(seen.values()), "jobs": len(seen)}), flush=True)
'''


def test_partitioned_node_jobs_are_resubmitted_and_late_results_discarded(tmp_path):
    with Network(tmp_path, hosts_a=["c", "n1", "n2"], hosts_b=[]) as net:
        for label in ("n1", "n2"):
            net[label].start_node("--no-discovery").wait_for(r"listening on")
        client = net["c"].python(CLIENT, f"{net['n1'].address}:9700", f"{net['n2'].address}:9700", name="client")
        running = client.json("running")
        assert set(running["on"].values()) == {net["n1"].address, net["n2"].address}
        # Partition n1: its port on the subnet's bridge goes down for longer than node_timeout.
        _ip("-n", net.router, "link", "set", "vn1", "down")
        time.sleep(1.6)
        _ip("-n", net.router, "link", "set", "vn1", "up")
        done = client.json("done", timeout=40)
        assert done["results"] == [i * 7 for i in range(8)]
        counts = client.json("callbacks", timeout=20)
        assert counts == {"event": "callbacks", "counts": [1] * 8, "jobs": 8}
        assert client.proc.wait(20) == 0, client.log()
        log = client.log()
        assert "declaring it lost" in log
        assert "discarded a late report" in log  # n1 finished the first attempt after the partition
        assert done["connected"] == 2  # n1 rejoined
