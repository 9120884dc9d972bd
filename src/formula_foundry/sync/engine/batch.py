"""The replay's unit of work: a batch of one segment's events and the position it reaches.

A :class:`Cursor` walks one segment; its :class:`Batch` fills up to the sink's limits and is
sent as one write, after which the cursor's position is recorded as acknowledged.
"""

from __future__ import annotations

from formula_foundry.sync.engine.runs import RunContext
from formula_foundry.sync.engine.scan import SegmentFile
from formula_foundry.sync.engine.sink import ArtifactRef
from formula_foundry.sync.engine.sync_state import SegmentProgress
from formula_foundry.tracking.spool_reader import Event

Pos = tuple[int, int, int]  # byte offset, line, last sequence number
Row = tuple[str, float, int, int]


class Batch:
    """The events of one segment gathered for one ``log_batch`` (and the references sent
    right after it), within the sink's limits."""

    __slots__ = ("events", "files", "metrics", "n", "param_src", "params", "refs", "tags")

    def __init__(self) -> None:
        self.metrics: list[Row] = []
        self.params: dict[str, str] = {}
        self.param_src: dict[str, Event] = {}
        self.tags: dict[str, str] = {}
        self.refs: list[tuple[ArtifactRef, Event]] = []  # with its event, to quarantine it
        # Files to upload (``artifact`` events): a batch holds them alone (see replayer).
        self.files: list[tuple[ArtifactRef, Event]] = []
        self.events = 0
        self.n = 0  # metrics + params + tags: what counts against the batch's total limit

    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


class Cursor:
    """One segment being replayed: its batch and the position the batch reaches."""

    __slots__ = ("batch", "ctx", "done", "pos", "saved", "seg")

    def __init__(self, ctx: RunContext, seg: SegmentFile, prog: SegmentProgress) -> None:
        self.ctx, self.seg = ctx, seg
        self.batch = Batch()
        self.pos: Pos = (prog.offset, prog.line, prog.last_seq)
        self.saved: Pos = self.pos
        self.done = prog.done
