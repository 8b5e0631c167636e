"""``python -m mtil.data``: which datasets are under ``--data-location``, and getting the missing ones.

``status`` lists every dataset mtil can read (the registry's, ImageNet and Conceptual Captions) as present,
missing or damaged, with image and class counts against a complete copy's and, for each missing one, the command
or the page that gets it. It reads file lists and annotation files only, never decodes more than the first image of
a split, and writes nothing. ``prepare NAMES`` downloads what torchvision can download, lays out the rest from
archives the user downloaded, verifies with the same checks as ``status`` and can be re-run after an interruption.

Modules: :mod:`~mtil.data.catalog` (the expected facts), :mod:`~mtil.data.check` (the status of one dataset),
:mod:`~mtil.data.report` (the printed table), :mod:`~mtil.data.staging` (the work folder a prepare fills before
anything reaches its place), :mod:`~mtil.data.prepare` (getting one dataset) and :mod:`~mtil.data.cli`.
"""
