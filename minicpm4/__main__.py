"""`python -m minicpm4 ...` entry point."""

import sys

from minicpm4.cli import main

sys.exit(main())
