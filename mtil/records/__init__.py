"""Everything a run records, one owner (:class:`Records`) and its sinks: mtil's files and the trackers."""
from mtil.records.owner import Records

__all__ = ["Records"]
