"""Timestamps at each hop of a job's round trip, for ``bench/hops.py`` (never installed).

Put this directory first on ``PYTHONPATH`` and set ``CLUSTERPY_HOPS_LOG`` to a file: every
Python process started with that environment (client, node, workers) then wraps the functions
in :data:`HOPS` as their modules are imported, and appends ``pid tag monotonic_ns`` lines to
the file. All processes share CLOCK_MONOTONIC, so the lines of one round trip sort into order.
A name that no longer exists is an error: the table must follow the code.
"""

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

#: module -> (qualified name, tag, "before" or "after" the call)
HOPS = {
    "clusterpy.client": [("JobCluster.submit", "submit() called", "before")],
    "clusterpy._runtime": [("_Runtime.deliver", "client loop has the job", "before")],
    "clusterpy.transport.connection": [("Connection._flush", "flush", "before")],
    "clusterpy.node_session": [("ClientSession._submit", "node decoded SubmitJobs", "before")],
    "clusterpy._node_reports": [("Outbox.deliver", "node reports JobDone", "before")],
    "clusterpy._poolworker": [("_Worker._write", "node writes the job to the worker", "before"),
                              ("_Worker.on_data", "node reads the reply", "before")],
    "clusterpy._channel": [("ChannelReader.receive", "worker decoded the job", "after")],
    "clusterpy.worker": [("_Worker.run", "worker ran it", "after"),
                         ("_Worker.send", "worker writes the reply", "before")],
    "clusterpy.nodelink": [("NodeLink._on_payload", "client got JobDone", "before")],
    "clusterpy.job": [("ClusterJob._end", "client sets the result", "before"),
                      ("ClusterJob.__call__", "caller has the result", "after")],
}

_LOG = os.environ.get("CLUSTERPY_HOPS_LOG")


def _wrap(fn, tag, when):
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pid = os.getpid()

    def mark():
        os.write(fd, f"{pid} {tag} {time.monotonic_ns()}\n".encode())

    if when == "before":
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            mark()
            return fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            mark()
            return result
    return wrapper


def _patch(module):
    for qualname, tag, when in HOPS[module.__name__]:
        owner_name, _, attr = qualname.rpartition(".")
        owner = getattr(module, owner_name)
        setattr(owner, attr, _wrap(getattr(owner, attr), tag, when))


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # get_code and the rest: runpy runs `-m` modules through them
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in HOPS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
