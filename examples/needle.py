"""Needle in a haystack: stop the whole search as soon as one job finds the answer.

We look for the candidate whose (deliberately slow) hash matches a target. ``only_if`` drops
every non-matching result on the nodes (nothing is sent back for them) and ``stop_when`` ends
the map at the first match: queued jobs are dropped, running ones terminated on their nodes.

    python examples/needle.py                 # embedded local node
    python examples/needle.py 10.0.0.5 10.0.0.6:9700
"""

import hashlib
import sys
import time

import clusterpy

ROUNDS = 100


def slow_hash(candidate):
    digest = str(candidate).encode()
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


TARGET = slow_hash(2719)  # the needle; the search does not know it


def check(candidate, target):
    return candidate if slow_hash(candidate) == target else None


def main(nodes):
    candidates = range(10_000)
    with clusterpy.JobCluster(check, nodes=nodes or None,
                              only_if=lambda found: found is not None) as cluster:
        began = time.monotonic()
        search = cluster.map(candidates, [TARGET] * len(candidates), chunksize=100,
                             stop_when=lambda found: found is not None)
        for found in search:
            print(f"found {found} in {time.monotonic() - began:.2f}s")
        stats = cluster.stats()
        done = sum(1 for job in stats.jobs if job.status == "Finished")
        print(f"stopped after {search.jobs_submitted} of {len(candidates) // 100} jobs were submitted "
              f"({done} ran to the end, the others were cancelled)")


if __name__ == "__main__":
    main(sys.argv[1:])
