"""Sweeps: run a base command over a grid of flag values (and seeds), resume, and collect one results table.

``python -m mtil.sweep`` (:mod:`mtil.sweep.__main__`) and ``python -m mtil.main ... --seeds 1,2,3``
(:mod:`mtil.sweep.seeds`) share the pieces: :mod:`~mtil.sweep.grid` (axes, points, their folders),
:mod:`~mtil.sweep.command` (the base command and each point's command, checked before anything runs),
:mod:`~mtil.sweep.runner` (run or resume the points) and :mod:`~mtil.sweep.tables` (the results tables).
"""
