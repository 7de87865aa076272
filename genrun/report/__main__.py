"""`python -m genrun.report DIR`: the same as `genrun-report DIR`."""

import sys

from genrun.report import main

sys.exit(main())
