"""Tracker sinks for ``--report-to``: one file each, registered with ``@register_sink`` (see
:mod:`mtil.records.sink`). Adding a tracker (MLflow, trackio, ...) is adding a file here."""
