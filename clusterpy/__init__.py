"""clusterpy: fan plain Python functions and programs out over the machines you have.

>>> import clusterpy
>>> with clusterpy.JobCluster(pow, local=True) as cluster:   # doctest: +SKIP
...     job = cluster.submit(2, 10)
...     job()
1024
"""

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .job import ClusterJob, JobStatus  # noqa: E402
from .client import JobCluster  # noqa: E402

__all__ = ["__version__", "JobCluster", "ClusterJob", "JobStatus", *_errors_all]
