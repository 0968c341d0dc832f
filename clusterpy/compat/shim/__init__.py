"""Holds the opt-in ``dispy`` shim (``dispy.py``); this directory goes on ``sys.path`` only when
a user puts it there (see :func:`clusterpy.compat.dispy_shim_path`)."""
