"""`python -m isofast ...`: the `isofast` command (isofast.cli), e.g. from a source tree on PYTHONPATH."""
import sys

from .cli import main

sys.exit(main())
