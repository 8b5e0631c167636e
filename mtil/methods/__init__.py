"""Training methods and components, one file each; every file registers itself (see :mod:`mtil.registry`)."""
