"""`python -m senderd`."""

import sys

from senderd.cli import main

sys.exit(main())
