"""``python -m distill.plugins.serve``: the same as ``distill-serve``."""

import sys

from distill.plugins.serve import main

sys.exit(main())
