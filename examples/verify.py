"""Results you can trust from nodes you do not: verification, and voting among replicas.

Factorizing is slow, checking a factorization is fast: ``verify`` multiplies the factors back
on this machine, and a node whose result fails is no longer trusted (its jobs run again
elsewhere). With three or more nodes the same jobs also run with ``replicas=3``: each runs on
three different nodes and the majority wins. Try it with a lying node:

    clusterpy-node --port 9711 --inject-faults corrupt-results     # a testing aid
    python examples/verify.py 127.0.0.1:9700 127.0.0.1:9701 127.0.0.1:9702 127.0.0.1:9711

With no argument it runs on an embedded local node (verification only).
"""

import math
import sys

import clusterpy


def factorize(n):
    factors, d = [], 2
    while d * d <= n:
        while n % d == 0:
            factors.append(d)
            n //= d
        d += 1
    if n > 1:
        factors.append(n)
    return factors


def multiplies_back(factors, n):
    """verify(result, *args): cheap to check, unlike the computation."""
    return math.prod(factors) == n and all(f > 1 for f in factors)


def run(nodes, **trust):
    numbers = range(10**9 + 7, 10**9 + 7 + 40)
    with clusterpy.JobCluster(factorize, nodes=nodes or None, **trust) as cluster:
        jobs = [cluster.submit(n) for n in numbers]
        results = [job() for job in jobs]
        assert all(math.prod(f) == n for f, n in zip(results, numbers))
        cluster.wait()  # replicas still running are judged too
        stats = cluster.stats()
    how = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in trust.items())
    print(f"{how}: all results correct; verdicts {sorted({j.verification for j in stats.jobs})}")
    for node in stats.nodes:
        if not node.trusted:
            print(f"untrusted: {node.name} ({node.distrust_reason})")
    stats.to_json("trust-stats.json")


def main(nodes):
    run(nodes, verify=multiplies_back)
    if len(nodes) >= 3:
        run(nodes, replicas=3)


if __name__ == "__main__":
    main(sys.argv[1:])
