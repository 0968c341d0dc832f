"""D. Cold start, as a whole process: ``python bench/coldstart.py FRAMEWORK CPUS``.

Starts the framework's local equivalent of an embedded node, runs one trivial job, prints
``first-result <time.time()>`` as soon as its result is in, then shuts everything down and
exits. The parent notes ``time.time()`` just before starting this process, so "first result"
includes interpreter start-up and imports, as a user would see it.

The local equivalents: clusterpy ``JobCluster(f, local=True)``; dask ``Client(LocalCluster())``;
``ProcessPoolExecutor`` and loky executors; dispy has no embedded node, so its equivalent
starts ``dispynode.py`` on 127.0.0.1 and then a ``JobCluster`` (only in a private network
namespace: dispy broadcasts).
"""

from __future__ import annotations

import sys
import time


def inc(x):
    return x + 1


def report() -> None:
    print(f"first-result {time.time():.6f}", flush=True)


def main(name: str, cpus: int) -> None:
    if name == "clusterpy":
        from clusterpy.client import JobCluster

        with JobCluster(inc, local=True, local_cpus=cpus) as cluster:
            assert cluster.submit(1)() == 2
            report()
    elif name == "dask":
        import logging

        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=cpus, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            assert client.submit(inc, 1).result() == 2
            report()
    elif name == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(cpus) as ex:
            assert ex.submit(inc, 1).result() == 2
            report()
    elif name == "loky":
        import loky

        with loky.ProcessPoolExecutor(max_workers=cpus) as ex:
            assert ex.submit(inc, 1).result() == 2
            report()
    elif name == "dispy":
        import atexit
        import logging
        import os
        import shutil
        import tempfile

        import dispy
        from frameworks import _stop_process, start_dispynode

        tmp = tempfile.mkdtemp(prefix="bench-dispy-cold-")
        # Registered before dispy's own exit handler, so it runs after it wrote its recovery file.
        atexit.register(shutil.rmtree, tmp, True)
        node = start_dispynode(cpus, os.path.join(tmp, "node"))
        try:
            cluster = dispy.JobCluster(inc, nodes=["127.0.0.1"], host="127.0.0.1", loglevel=logging.WARNING,
                                       recover_file=os.path.join(tmp, "recover"))
            assert cluster.submit(1)() == 2
            report()
            cluster.close()
        finally:
            _stop_process(node)
    else:
        raise SystemExit(f"unknown framework {name!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
