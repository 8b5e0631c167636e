"""``python -m mtil.sweep``: see :mod:`mtil.sweep.cli`."""
import sys

from mtil.sweep.cli import main

sys.exit(main())
