"""The operator commands: the ``ff-sync`` CLI (:mod:`.cli`, the only module importing click)
and what only the commands use: ``watch``, ``status`` (:mod:`.status`, :mod:`.status_table`),
``verify`` (:mod:`.verify`, with :mod:`.expected`: what a spool should have become) and ``gc``.
"""
