"""Watch a cluster work in your browser: JobCluster(..., monitor=True).

    pip install 'clusterpy[monitor]'
    python examples/monitor.py                  # embedded local node; open the printed URL
    python examples/monitor.py -n 10.0.0.5 -n 10.0.0.6 --jobs 500

The page shows the nodes, the jobs by status, throughput, the running jobs and the latest
failures (every sixth job here fails on purpose, to show its traceback), live. It is served on
127.0.0.1 only, and the URL carries an access token: keep it to yourself. Scripts can read
the same data as JSON from /api/snapshot (with the token), as this example does at the end.
"""

import argparse
import json
import time
import urllib.request

import clusterpy


def compute(n):
    import random
    import time

    time.sleep(random.uniform(0.05, 0.4))
    if n % 6 == 5:
        raise RuntimeError(f"job {n} fails on purpose, to show a traceback on the page")
    return n * n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nodes", action="append", default=[], help="a node's address (default: a local node)")
    p.add_argument("--jobs", type=int, default=200, help="how many jobs to run (default 200)")
    p.add_argument("--linger", type=float, default=60.0,
                   help="seconds to keep the page up after the jobs end (default 60)")
    args = p.parse_args()

    with clusterpy.JobCluster(compute, nodes=args.nodes or None, local=not args.nodes, monitor=True) as cluster:
        print(f"monitor at {cluster.monitor_url}", flush=True)
        jobs = [cluster.submit(i) for i in range(args.jobs)]
        cluster.wait()
        failed = [job for job in jobs if job.status is not clusterpy.JobStatus.Finished]
        print(f"finished {len(jobs) - len(failed)}, failed {len(failed)}")

        # The JSON endpoint: what the page shows, for scripts (the token goes in a header).
        base, token = cluster.monitor_url.split("/?token=")
        request = urllib.request.Request(base + "/api/snapshot", headers={"X-Clusterpy-Token": token})
        with urllib.request.urlopen(request, timeout=10) as response:
            snapshot = json.load(response)
        for node in snapshot["nodes"]:
            print(f"node {node['name']}: {node['jobs_done']} jobs, {node['failures']} failed, {node['state']}")
        print("counts:", {k: v for k, v in snapshot["counts"].items() if v})
        if args.linger > 0:
            print(f"the page stays up for {args.linger:g}s (Ctrl-C to stop)", flush=True)
            try:
                time.sleep(args.linger)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
