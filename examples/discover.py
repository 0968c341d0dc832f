"""Find nodes by UDP broadcast (and relays), then run jobs on them.

Start `clusterpy-node --host 0.0.0.0` on each machine (same secret file everywhere), then:

    python examples/discover.py                        # every node that answers
    python examples/discover.py "192.168.1.*"          # only nodes matching a pattern
    python examples/discover.py --relay 10.0.2.1       # also nodes behind a clusterpy-netrelay
    python examples/discover.py --interfaces eth0      # broadcast on eth0 only

It waits up to --wait seconds for at least --min-nodes nodes, prints them, and runs 10 jobs.
"""

from __future__ import annotations

import argparse
import time

import clusterpy


def where_am_i(n):
    import socket

    return socket.gethostname(), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patterns", nargs="*", help='node patterns or addresses, e.g. "10.0.1.*" "10.0.2.5:9700"')
    p.add_argument("--relay", action="append", default=[], help="host[:port] of a clusterpy-netrelay")
    p.add_argument("--interfaces", default=None, help="comma-separated interfaces to broadcast on")
    p.add_argument("--discovery-port", type=int, default=None, help="the nodes' UDP discovery port (default 9700)")
    p.add_argument("--wait", type=float, default=3.0, help="seconds to wait for nodes (default 3)")
    p.add_argument("--min-nodes", type=int, default=1)
    args = p.parse_args()

    with clusterpy.JobCluster(where_am_i, nodes=args.patterns or None, discover=True, local=False,
                              relays=args.relay, discovery_interfaces=args.interfaces,
                              discovery_port=args.discovery_port) as cluster:
        deadline = time.monotonic() + args.wait
        while len(cluster.nodes()) < args.min_nodes and time.monotonic() < deadline:
            time.sleep(0.1)
        nodes = cluster.nodes()
        for node in nodes:
            print(f"found {node['name']} ({node['hostname']}, {node['cpus']} CPUs, id {node['node_id']})")
        if not nodes:
            raise SystemExit("no node found: is clusterpy-node running with the same secret?")
        jobs = [cluster.submit(i) for i in range(10)]
        used = {job.ip_addr for job in jobs if job() is not None}
        print(f"{len(jobs)} jobs on {len(used)} node{'s' if len(used) != 1 else ''}")


if __name__ == "__main__":
    main()
