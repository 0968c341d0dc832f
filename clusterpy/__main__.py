"""``python -m clusterpy`` is the ``clusterpy`` command."""

import sys

from .cli import main

sys.exit(main())
