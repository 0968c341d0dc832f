"""Other frameworks' APIs on clusterpy, so their programs run unchanged but for one import.

* :mod:`clusterpy.compat.dispy`: dispy's (``import clusterpy.compat.dispy as dispy``); see
  docs/DISPY.md.

To keep even that import unchanged (``import dispy``), put :func:`dispy_shim_path` on the
program's ``sys.path``; ``python -m clusterpy.compat`` prints it::

    PYTHONPATH=$(python -m clusterpy.compat) python my_dispy_program.py

The shim is never installed as a top-level ``dispy`` package: a program gets clusterpy's dispy
only when its user asks for it this way.
"""

from __future__ import annotations

import os

__all__ = ["dispy_shim_path"]


def dispy_shim_path() -> str:
    """The directory holding the opt-in ``dispy`` shim module (``import dispy`` there is
    ``clusterpy.compat.dispy``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")
