"""NumPy arrays and large byte strings as job arguments and results, without extra copies.

Large buffers travel beside the pickle (pickle protocol 5 out-of-band buffers): they are never
copied into a pickle on the way, and arrive as views of the received data, writable, as a
local call would give them. A job's arguments are what they were at ``submit()``: changing
the array afterwards does not change the job.

    python examples/numpy_arrays.py                    # on an embedded local node
    python examples/numpy_arrays.py 127.0.0.1:9700     # on a running clusterpy-node
"""

import sys
import time

import numpy as np

import clusterpy


def normalize(block):
    # The block arrives writable: normalize it in place and send it back.
    block -= block.mean(axis=0)
    block /= block.std(axis=0)
    return block


def main(nodes):
    rng = np.random.default_rng(7)
    blocks = [rng.normal(5.0, 3.0, size=(250_000, 4)) for _ in range(8)]  # 8 MB each
    options = {"nodes": nodes} if nodes else {"local": True, "local_cpus": 2}
    with clusterpy.JobCluster(normalize, **options) as cluster:
        began = time.perf_counter()
        jobs = [cluster.submit(block) for block in blocks]
        blocks[0][:] = 0.0  # too late to change job 0's argument: it was taken at submit()
        results = [job() for job in jobs]
        took = time.perf_counter() - began
    megabytes = 2 * sum(block.nbytes for block in blocks) / 1e6
    print(f"{len(results)} blocks, {megabytes:.0f} MB there and back in {took:.2f} s "
          f"({megabytes / took:.0f} MB/s)")
    for i, result in enumerate(results):
        assert result.shape == (250_000, 4) and result.flags.writeable
        assert np.allclose(result.mean(axis=0), 0.0) and np.allclose(result.std(axis=0), 1.0), i
    print("every block normalized: mean 0, std 1")


if __name__ == "__main__":
    main(sys.argv[1:])
