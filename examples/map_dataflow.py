"""map with chunks, dataflow between jobs, and scatter (large shared data sent once per node).

    python examples/map_dataflow.py               # embedded local node
    python examples/map_dataflow.py 10.0.0.5      # real nodes
"""

import sys

import clusterpy


def square(x):
    return x * x


def add(a, b):
    return a + b


def lookup(table, key):
    return table[key]


def main(nodes):
    options = {"nodes": nodes} if nodes else {"local": True, "local_cpus": 2}
    with clusterpy.JobCluster(square, **options) as cluster:
        # 100,000 tiny calls as 100 jobs of 1,000 items each; results in order.
        results = list(cluster.map(range(100_000), chunksize=1000))
        print(f"{len(results)} results, last {results[-1]}")

        # Dataflow: a job (or future) given as an argument is replaced by its result first.
        ex = cluster.executor()
        a = cluster.submit(3)               # 9
        b = ex.submit(add, a, 1)            # 10
        c = ex.submit(add, b, [a][0])       # 19 ... plus b again:
        c = ex.submit(add, c, b)            # 29
        print("c =", c.result())
        failed = ex.submit(add, ex.submit(square, "x"), 1)
        try:
            failed.result()
        except clusterpy.UpstreamJobError as exc:
            print(f"UpstreamJobError: {exc} (cause: {type(exc.__cause__).__name__})")

        # Scatter: a large object travels to each node once; jobs receive it through a handle.
        table = {i: str(i) * 10 for i in range(200_000)}
        handle = cluster.scatter(table)
        values = [ex.submit(lookup, handle, k) for k in (1, 500, 199_999)]
        print("scattered", handle, "->", [v.result() for v in values])


if __name__ == "__main__":
    main(sys.argv[1:])
