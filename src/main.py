"""``python -m src.main`` (the original tool's command) is ``python -m mtil.main``."""
import sys

from mtil.main import main

if __name__ == "__main__":
    sys.exit(main())
