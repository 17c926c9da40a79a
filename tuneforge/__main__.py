"""``python -m tuneforge``: the command line, as the ``tuneforge`` script runs it."""

import sys

from tuneforge.cli import main

sys.exit(main())
