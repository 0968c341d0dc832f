"""clusterpy as a concurrent.futures executor: code written for a process pool runs on the cluster.

    python examples/executor.py                   # embedded local node
    python examples/executor.py 10.0.0.5 10.0.0.6 # real nodes
"""

import concurrent.futures
import sys

import clusterpy


def square(x):
    return x * x


def check(value):
    if value < 0:
        raise ValueError(f"negative value {value}")
    return "ok"


def main(nodes):
    # ClusterExecutor owns its cluster; JobCluster(...).executor() would borrow one instead.
    options = {"nodes": nodes} if nodes else {"local": True, "local_cpus": 2}
    with clusterpy.ClusterExecutor(**options) as executor:
        print("squares:", list(executor.map(square, range(10))))
        # 10,000 tiny calls, 500 per job: the per-job overhead is paid 20 times, not 10,000
        print("sum of 10,000 squares:", sum(executor.map(square, range(10_000), chunksize=500)))

        futures = {executor.submit(check, v): v for v in (3, -1, 7)}
        for future in concurrent.futures.as_completed(futures):
            try:
                print(f"check({futures[future]}) -> {future.result()}")
            except ValueError as exc:  # re-raised here, the remote traceback as its __cause__
                print(f"check({futures[future]}) raised ValueError: {exc}")

        # a future passed as an argument is replaced by its result before the call runs
        total = executor.submit(sum, [executor.submit(square, 3), executor.submit(square, 4)])
        print("3² + 4² =", total.result())


if __name__ == "__main__":
    main(sys.argv[1:])
