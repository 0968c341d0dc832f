"""The node side of a dispy computation: what dispynode gave a computation, in a clusterpy worker.

dispy ran a computation in a namespace holding ``dispy_node_name``, ``dispy_node_ip_addr``,
``dispy_job_path``, ``dispy_provisional_result``, ``dispy_send_file`` and ``dispynode_logger``.
Here the client pickles the user's ``compute``, ``setup`` and ``cleanup`` (and the functions and
classes in ``depends``) once, into one payload; each node gets a :class:`NodeSide` holding that
payload and the node's name and address as the client sees them. In the worker, the payload is
unpickled on first use (when the computation loads, in ``setup``) and those names are bound in
the globals the user's functions share, so ``setup`` and the jobs see them as plain globals, and
globals that ``setup`` assigns are visible to the jobs (cloudpickle gives functions pickled
together one globals dict).

This module is imported by workers: it stays light (nothing from the client).
"""

from __future__ import annotations

import logging
import os
import socket
import types
from typing import Any, Callable

__all__ = ["NodeSide", "dispy_provisional_result", "dispy_send_file", "MSG_TIMEOUT"]

#: dispy's default timeout for messages from a job to the client (accepted, not needed here).
MSG_TIMEOUT = 10

_log = logging.getLogger("dispynode")


def dispy_provisional_result(result: Any, relay: bool = False, timeout: float = MSG_TIMEOUT) -> int:
    """Send ``result`` to the client as the running job's provisional result (dispy's contract).

    Returns 0 when the value is on its way (it arrives before the job's final result), -1 if it
    cannot be sent (not inside a job, or not picklable); the reason is logged on the node.
    ``relay`` and ``timeout`` are accepted for dispy's signature: values always travel on the
    job's own channel to the client (through the scheduler for a SharedJobCluster).
    """
    from clusterpy.progress import provisional_result

    try:
        provisional_result(result)
    except Exception as exc:  # noqa: BLE001 -- dispy reports failure as -1, not by raising
        _log.warning("dispy_provisional_result failed: %r", exc)
        return -1
    return 0


def dispy_send_file(path: str | os.PathLike[str], relay: bool = False, timeout: float = MSG_TIMEOUT) -> int:
    """Send a file the job made to the client (dispy's contract): 0 once it was read, -1 if it
    cannot be sent (missing, not a regular file, over the node's ``--max-send-file``); the
    reason is logged on the node. On the client it lands in ``<files_dir>/<job id>/<name>`` and
    its path is in ``job.files``."""
    from clusterpy.progress import send_file

    try:
        send_file(path)
    except Exception as exc:  # noqa: BLE001 -- dispy reports failure as -1, not by raising
        _log.warning("dispy_send_file(%r) failed: %r", os.fspath(path), exc)
        return -1
    return 0


def _guess_ip() -> str:
    """This machine's address, for a node whose address the client did not know (shared scheduler)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _globals_of(fn: Any) -> dict[str, Any] | None:
    fn = getattr(fn, "__func__", fn)  # a bound method's function
    namespace = getattr(fn, "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


class NodeSide:
    """The computation a node runs for a dispy cluster: callable as the computation, with
    :meth:`setup` and :meth:`cleanup` for the worker to call.

    Args:
        payload: cloudpickle of ``(compute, setup, cleanup, depends_objects)``.
        name: the computation's name (``compute.__name__``).
        node: ``{"name": ..., "ip_addr": ...}`` as the client knows the node; missing values
            are found on the node (a SharedJobCluster does not know its nodes).
    """

    def __init__(self, payload: bytes, name: str, node: dict[str, str]) -> None:
        self.payload = payload
        self.__name__ = name
        self.node = dict(node)
        self._loaded: tuple[Callable[..., Any], Any, Any] | None = None
        self._setup_args: tuple[Any, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {"payload": self.payload, "__name__": self.__name__, "node": self.node}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded = None
        self._setup_args = ()

    def __repr__(self) -> str:
        return f"<dispy computation {self.__name__}>"

    def _load(self) -> tuple[Callable[..., Any], Any, Any]:
        if self._loaded is None:
            import cloudpickle

            compute, setup, cleanup, objects = cloudpickle.loads(self.payload)
            names: dict[str, Any] = {
                "dispy_node_name": self.node.get("name") or socket.gethostname(),
                "dispy_node_ip_addr": self.node.get("ip_addr") or _guess_ip(),
                "dispy_job_path": os.getcwd(),  # the computation's directory: jobs run there
                "dispy_provisional_result": dispy_provisional_result,
                "dispy_send_file": dispy_send_file,
                "dispynode_logger": _log,
            }
            for obj in objects:  # depends=[function or class]: bound under its name, as dispy did
                if isinstance(obj, types.ModuleType):
                    names[obj.__name__.partition(".")[0]] = obj
                else:
                    names[obj.__name__] = obj
            seen: set[int] = set()
            for fn in (compute, setup, cleanup):
                namespace = _globals_of(fn)
                if namespace is not None and id(namespace) not in seen:
                    seen.add(id(namespace))
                    namespace.update(names)
            self._loaded = (compute, setup, cleanup)
        return self._loaded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()[0](*args, **kwargs)

    def setup(self, *args: Any) -> Any:
        """Load the computation; run the user's ``setup(*args)`` (this node's ``setup_args``)."""
        _compute, setup, _cleanup = self._load()
        self._setup_args = args
        return setup(*args) if setup is not None else 0

    def cleanup(self) -> None:
        """Run the user's ``cleanup`` with the arguments ``setup`` had (dispy's contract)."""
        if self._loaded is None:
            return
        cleanup = self._loaded[2]
        if callable(cleanup):
            cleanup(*self._setup_args)
