"""``python -m mtil.data status|prepare ...`` (see :mod:`mtil.data.cli`)."""
from mtil.data.cli import main

raise SystemExit(main())
