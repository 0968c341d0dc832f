#!/usr/bin/env python3
"""Where one round trip's time goes (workload B), hop by hop, across client, node and worker.

Usage: ``python bench/hops.py [--calls 300]``

Runs a real ``clusterpy-node --cpus 2`` and a client that submits one trivial job at a time.
Every process is started with ``bench/_hops`` first on ``PYTHONPATH``: its ``sitecustomize``
wraps the functions at each hop (the table ``HOPS`` there) to log a timestamp, so nothing in
clusterpy itself is instrumented. Prints the median time between consecutive hops over the
calls. Each mark costs about a microsecond (a ``write``), so the total is a little over an
unobserved round trip; the plain round trip is measured first for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECRET = "hops-bench-secret-0123456789"


def client(address: str, calls: int) -> None:
    """The client's side (run in a child process, so that it starts with the hooks)."""
    sys.path.insert(0, HERE)
    import benchjobs
    from clusterpy.client import JobCluster

    with JobCluster(benchjobs.inc, nodes=[address], secret=SECRET) as cluster:
        for i in range(100):  # warm up: workers started, computation loaded
            cluster.submit(i)()
        trips = []
        for i in range(calls):
            start = time.perf_counter()
            cluster.submit(i)()
            trips.append(time.perf_counter() - start)
        print(f"{statistics.median(trips) * 1e6:.0f}")


def run(calls: int, hooked: bool, workdir: str) -> tuple[float, str]:
    log = os.path.join(workdir, "hops.log")
    env = dict(os.environ, CLUSTERPY_SECRET=SECRET)
    paths = [ROOT, os.environ.get("PYTHONPATH", "")]
    if hooked:
        paths.insert(0, os.path.join(HERE, "_hops"))
        env["CLUSTERPY_HOPS_LOG"] = log
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    node = subprocess.Popen([sys.executable, "-m", "clusterpy.node", "--host", "127.0.0.1", "--port", "0",
                             "--cpus", "2", "--dest-path", os.path.join(workdir, "node"), "--no-discovery",
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert node.stdout is not None
        address = re.search(r"127\.0\.0\.1:\d+", node.stdout.readline()).group(0)  # type: ignore[union-attr]
        out = subprocess.run([sys.executable, __file__, "--client", address, "--calls", str(calls)],
                             env=env, check=True, capture_output=True, text=True).stdout
    finally:
        node.terminate()
        node.wait()
    return float(out.split()[-1]), log


def breakdown(log: str, calls: int) -> list[tuple[str, str, float]]:
    """Median microseconds between consecutive hops over the last ``calls`` round trips."""
    events = sorted((int(t), pid, tag) for pid, tag, t in (line.rsplit(" ", 1)[0].split(" ", 1) + [line.rsplit(" ", 1)[1]]
                                                           for line in open(log).read().splitlines()))
    client_pid = next(pid for _t, pid, tag in events if tag == "submit() called")
    trips: list[list[tuple[str, int]]] = []
    for t, pid, tag in events:
        if tag == "flush":
            tag = "client flushes" if pid == client_pid else "node flushes"
        if tag == "submit() called":
            trips.append([])
        if trips:
            trips[-1].append((tag, t))
    trips = trips[-calls:]
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    order: dict[tuple[str, str], int] = {}
    for trip in trips:
        for i, ((a, ta), (b, tb)) in enumerate(zip(trip, trip[1:])):
            gaps[a, b].append((tb - ta) / 1000)
            order.setdefault((a, b), i)
    common = [k for k in gaps if len(gaps[k]) >= len(trips) // 2]  # the usual path only
    return [(a, b, statistics.median(gaps[a, b])) for a, b in sorted(common, key=order.__getitem__)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client, args.calls)
        return 0
    with tempfile.TemporaryDirectory(prefix="clusterpy-hops-") as workdir:
        plain, _ = run(args.calls, False, workdir)
        hooked, log = run(args.calls, True, workdir)
        print(f"round trip median: {plain:.0f} us unobserved, {hooked:.0f} us with the marks\n")
        print(f"{'from':<36} {'to':<36} {'median us':>9}")
        total = 0.0
        for a, b, us in breakdown(log, args.calls):
            total += us
            print(f"{a:<36} {b:<36} {us:9.1f}")
        print(f"{'':<36} {'sum of medians':<36} {total:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
