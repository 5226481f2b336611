"""``python -m mlplatform``: the command line (see :mod:`mlplatform.cli`)."""

import sys

from mlplatform.cli import main

sys.exit(main())
