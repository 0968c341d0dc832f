"""``import dispy`` for programs written for dispy: this module *is* clusterpy.compat.dispy.

Only importable as ``dispy`` when its directory is on ``sys.path`` (the user's opt-in:
``PYTHONPATH=$(python -m clusterpy.compat)``). Importing replaces this module with
clusterpy.compat.dispy in ``sys.modules``, so ``dispy.X`` is the same object everywhere and
functions that refer to ``dispy`` pickle as a reference to clusterpy.compat.dispy.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("clusterpy.compat.dispy")
