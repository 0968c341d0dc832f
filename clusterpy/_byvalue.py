"""Which functions cloudpickle must ship by value: those of the user's own, uninstalled modules."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from typing import Any

import cloudpickle

__all__ = ["pickle_by_value_if_local"]


def pickle_by_value_if_local(obj: Any) -> None:
    """Ship functions from the user's own modules by value, as cloudpickle does for __main__.

    A module that is not installed (not under the standard library or site-packages) exists
    only on the client, so the nodes could not import it to find the function by reference.
    """
    name = getattr(obj, "__module__", None)
    module = sys.modules.get(name) if name else None
    path = getattr(module, "__file__", None)
    if module is None or not path or name == "__main__":
        return
    path = os.path.realpath(path)
    installed = {os.path.realpath(p) for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                               sysconfig.get_paths()["platlib"], *site.getsitepackages())}
    if any(path.startswith(prefix + os.sep) for prefix in installed) or name.split(".")[0] == "clusterpy":
        return
    cloudpickle.register_pickle_by_value(module)
