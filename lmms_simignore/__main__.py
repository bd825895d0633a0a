"""`python -m lmms_simignore`."""

import sys

from lmms_simignore.cli import main

sys.exit(main())
