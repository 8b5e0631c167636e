"""The original tool's entry point, kept so its commands work unchanged: ``python -m src.main ...`` runs
``python -m mtil.main ...`` (the package is ``mtil``; nothing else lives here)."""
