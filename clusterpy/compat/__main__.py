"""``python -m clusterpy.compat``: print the directory to put on PYTHONPATH for ``import dispy``."""

from clusterpy.compat import dispy_shim_path

print(dispy_shim_path())
