"""A joblib parallel backend that runs ``joblib.Parallel`` work on a clusterpy cluster.

::

    import joblib, clusterpy, clusterpy.joblib
    clusterpy.joblib.register()
    with clusterpy.JobCluster(pow, local=True) as cluster:          # any computation
        with joblib.parallel_backend("clusterpy", cluster=cluster):
            joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(i) for i in range(1000))

scikit-learn's ``n_jobs`` work (``GridSearchCV(..., n_jobs=-1)``) then spreads over the nodes.
joblib batches tiny calls by itself (the backend auto-tunes batches to ~0.2-2 s each), and
each batch is one job on the cluster (through :meth:`JobCluster.executor`). ``n_jobs=-1``
means every CPU of the cluster's connected nodes.

joblib is an optional dependency: ``pip install clusterpy[joblib]``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable

import joblib
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from .errors import ConfigurationError

__all__ = ["ClusterBackend", "register"]

BACKEND_NAME = "clusterpy"


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """The ``"clusterpy"`` joblib backend.

    Args:
        cluster: a :class:`~clusterpy.JobCluster` (its executor is borrowed; the cluster stays
            open) or a :class:`~clusterpy.ClusterExecutor`.
        wait_for_nodes: seconds to wait for a first node to join, to know how many CPUs
            ``n_jobs=-1`` means.

    Raises:
        ConfigurationError: no ``cluster`` was given.
    """

    supports_retrieve_callback = True
    default_n_jobs = -1

    def __init__(self, cluster: Any = None, wait_for_nodes: float = 10.0, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if cluster is None:
            raise ConfigurationError('the clusterpy joblib backend needs a cluster: '
                                     'joblib.parallel_backend("clusterpy", cluster=JobCluster(...))')
        from .executor import ClusterExecutor

        self._executor = cluster if isinstance(cluster, ClusterExecutor) else cluster.executor()
        self._wait_for_nodes = wait_for_nodes
        self._futures: set[concurrent.futures.Future[Any]] = set()
        # joblib's completion callbacks dispatch the next batches and take joblib's locks:
        # they run in a thread of ours, never in the cluster's event-loop thread.
        self._callbacks: concurrent.futures.ThreadPoolExecutor | None = None
        self._callbacks_lock = threading.Lock()

    def _cpus(self) -> int:
        cluster = self._executor.cluster
        deadline = time.monotonic() + self._wait_for_nodes
        while True:
            cpus = sum(n["cpus"] for n in cluster.nodes() if n["connected"])
            if cpus or time.monotonic() >= deadline:
                return max(cpus, 1)
            time.sleep(0.05)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` as joblib counts it: -1 is every CPU of the cluster, -2 all but one..."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            cpus = self._cpus()
            return max(cpus + 1 + (n_jobs if n_jobs is not None else -1), 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None,
                  **kwargs: Any) -> int:
        """Called by joblib at the start of each ``Parallel`` call; returns the worker count."""
        if require == "sharedmem":
            raise ValueError("the clusterpy backend runs calls in other processes and machines: "
                             "it cannot provide require='sharedmem'")
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None) -> Any:
        """Run one joblib batch (a picklable callable) as one job."""
        future = self._executor.submit(func)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        if callback is not None:
            with self._callbacks_lock:
                if self._callbacks is None:
                    self._callbacks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clusterpy-joblib")
                pool = self._callbacks
            future.add_done_callback(lambda f: pool.submit(callback, f))
        return future

    def retrieve_result_callback(self, out: concurrent.futures.Future[Any]) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call failed: cancel the batches that have not started (running ones finish)."""
        for future in list(self._futures):
            future.cancel()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: release the callback thread (the cluster stays)."""
        with self._callbacks_lock:
            pool, self._callbacks = self._callbacks, None
        if pool is not None:
            pool.shutdown(wait=False)
        self.reset_batch_stats()


def register() -> None:
    """Make ``joblib.parallel_backend("clusterpy", cluster=...)`` available."""
    joblib.register_parallel_backend(BACKEND_NAME, ClusterBackend)
