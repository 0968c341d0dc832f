"""clusterpy: fan plain Python functions and programs out over the machines you have.

>>> import clusterpy
>>> with clusterpy.JobCluster(pow, local=True) as cluster:   # doctest: +SKIP
...     job = cluster.submit(2, 10)
...     job()
1024

The client API is imported lazily (PEP 562), so worker processes that only need
``clusterpy.worker`` start without loading asyncio and the client.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402

_LAZY = {
    "JobCluster": "clusterpy.client",
    "ClusterJob": "clusterpy.job",
    "JobStatus": "clusterpy.job",
    "recover_jobs": "clusterpy.recovery",
    "SharedJobCluster": "clusterpy.shared",
    "provisional_result": "clusterpy.progress",
    "send_file": "clusterpy.progress",
    "DROPPED": "clusterpy.progress",
    "ClusterStats": "clusterpy.stats",
    "ClusterExecutor": "clusterpy.executor",
    "Scattered": "clusterpy.scatter",
}

__all__ = ["__version__", *_LAZY, *_errors_all]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clusterpy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
