"""A JobCluster's computation as its nodes receive it: the options checked, the code packaged.

::

    JobCluster(computation, depends, setup=..., only_if=..., verify=..., dest_path=...)
        check_*()        the options, refused with ConfigurationError before anything starts
        package()   -->  Package(name, dependencies, deploy)
                            dependencies: files and by-value objects (clusterpy.deps)
                            deploy: the DeployComputation message each node gets on joining

A function travels by value where it is local (cloudpickle), with ``setup``, ``cleanup``,
``only_if`` and the objects of ``depends`` in one pickled bundle; a program travels as a file
and runs with each job's arguments. Plain Python, no I/O beyond reading the dependencies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import cloudpickle

from . import _tracebacks
from . import deps as deps_mod
from ._byvalue import pickle_by_value_if_local
from .errors import ClusterError, ConfigurationError
from .filestore import validate_comp_id
from .protocol import messages as m

__all__ = ["Package", "package", "check_callable", "check_cpus_per_job", "check_dest_path", "trust_options"]


@dataclass(frozen=True, slots=True)
class Package:
    """A packaged computation: ``name`` (for stats, the monitor, the journal), the
    ``dependencies`` found (files and objects), and the ``deploy`` message for the nodes."""

    name: str
    dependencies: deps_mod.Dependencies
    deploy: m.DeployComputation


def package(comp_id: str, computation: Any, depends: Iterable[Any], *, setup: Callable[..., Any] | None = None,
            setup_args: tuple[Any, ...] = (), cleanup: Callable[[], Any] | None = None,
            only_if: Callable[[Any], Any] | None = None, return_files: bool = False, keep_files: bool = False,
            reentrant: bool = False, dest_path: str | None = None) -> Package:
    """Package ``computation`` (a callable, or a program's path) with its ``depends`` for the
    computation ``comp_id``.

    Raises:
        ConfigurationError: the computation is neither a callable nor an existing file.
        DependencyError: a dependency cannot be shipped.
    """
    depends = list(depends)
    if callable(computation):
        # Modules in depends travel as files: the computation directory is on the worker's sys.path.
        found = deps_mod.collect(depends)
        for fn in (computation, setup, cleanup, only_if, *found.objects):
            pickle_by_value_if_local(fn)
        _tracebacks.remember((computation, setup, cleanup, *found.objects))  # for remote tracebacks
        bundle = cloudpickle.dumps({
            "compute": computation, "setup": setup, "cleanup": cleanup,
            "depends": list(found.objects), "setup_args": tuple(setup_args),
            "only_if": only_if, "return_files": return_files,
        })
        deploy = m.DeployComputation(comp_id, "function", _metas(found), bundle, None,
                                     keep_files=keep_files, reentrant=reentrant, dest_path=dest_path)
        return Package(getattr(computation, "__name__", repr(computation)), found, deploy)
    if isinstance(computation, (str, os.PathLike)):
        path = os.fspath(computation)
        if not os.path.isfile(path):
            raise ConfigurationError(f"program {path!r} does not exist or is not a file")
        found = deps_mod.collect(depends, program=path)
        options = None  # only_if / return_files for a program travel in an otherwise empty bundle
        if only_if is not None or return_files:
            pickle_by_value_if_local(only_if)
            options = cloudpickle.dumps({"only_if": only_if, "return_files": return_files})
        deploy = m.DeployComputation(comp_id, "program", _metas(found), options, (os.path.basename(path),),
                                     keep_files=keep_files, reentrant=reentrant, dest_path=dest_path)
        return Package(os.path.basename(path), found, deploy)
    raise ConfigurationError(f"computation must be a callable or a program's path, not {type(computation).__name__}")


def _metas(found: deps_mod.Dependencies) -> tuple[m.FileMeta, ...]:
    return tuple(m.FileMeta(f.name, f.sha256, f.size, f.mode) for f in found.files)


# ---------------------------------------------------------------- option checks


def check_callable(name: str, value: Any) -> None:
    """Raise ConfigurationError unless ``value`` is None or callable."""
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be callable, not {type(value).__name__}")


def check_cpus_per_job(value: Any) -> int:
    """``cpus_per_job`` checked: a positive int. Raises ConfigurationError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"cpus_per_job must be a positive int, not {value!r}")
    return value


def check_dest_path(value: str | None) -> str | None:
    """``dest_path`` checked: None, or one directory name. Raises ConfigurationError."""
    if value is not None:
        try:
            validate_comp_id(value)
        except ClusterError as exc:
            raise ConfigurationError(f"dest_path must be one directory name: {exc}") from None
    return value


def trust_options(verify: Any, replicas: int, fraction: float, max_reruns: int, distrust_after: int,
                  rerun_untrusted: bool) -> dict[str, Any] | None:
    """JobCluster's trust arguments, checked (the keyword arguments of ``TrustShell``); None
    when neither verify nor replicas is asked for. Raises ConfigurationError."""
    check_callable("verify", verify)
    for name, value, low in (("replicas", replicas, 1), ("max_reruns", max_reruns, 0), ("distrust_after", distrust_after, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an int of at least {low}, not {value!r}")
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"replicate_fraction must be between 0 and 1, not {fraction!r}")
    if verify is None and (replicas == 1 or fraction == 0):
        return None  # plain jobs: no trust layer at all
    return dict(verify=verify, replicas=replicas, replicate_fraction=float(fraction), max_reruns=max_reruns,
                distrust_after=distrust_after, rerun_untrusted=bool(rerun_untrusted))
