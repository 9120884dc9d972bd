"""The replay engine: spool segments in, idempotent writes to a :class:`~.sink.Sink` out.

Imports neither MLflow nor click. The flow of one pass (:mod:`.sync_pass`): :mod:`.scan` lists
the spool's segments; :mod:`.runs` resolves each spooled run to its destination run (creating
it from its ``run_start``, read by :mod:`.payloads`); :mod:`.replayer` reads each segment from
where :mod:`.sync_state` says the destination's acknowledgement ends, checks every payload
(:mod:`.payloads`), groups writes into batches (:mod:`.batch`) within the sink's limits and
records progress after each acknowledged batch; :mod:`.parallel` does that for several runs
at once toward a server; :mod:`.stale` and :mod:`.scheduler` end runs whose process died;
:mod:`.retry` retries a destination that is down; :mod:`.report` says what happened;
:mod:`.quarantine_log` and :mod:`.refusals` keep what cannot be synced;
:mod:`.destination_id` makes sure the state describes this destination.
"""
