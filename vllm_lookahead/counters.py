"""The drafter's counters, each declared once: `COUNTERS`.

From each declaration come the field of the step kernel's counter record (`KERNEL_COUNTERS`, a
numpy record the kernels increment by name), the field of `LookaheadStats` (what `snapshot()`
reports and tests read), and the Prometheus family `vllm:lookahead_<metric>` with its help text
(`metrics`). Totals since the engine started. Knows nothing about vLLM.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np


class Source(enum.IntEnum):
    """What proposed a draft token; drafts and acceptance are counted per source."""

    PROMPT = 0
    """Copied from the request's prompt after a match of its context."""
    OUTPUT = 1
    """Copied from the request's own output so far."""
    SHARED = 2
    """Copied from earlier requests' outputs (the cross-request corpus)."""
    TRAJECTORY = 3
    """An n-gram of the Jacobi trajectory (the target's own predictions) from the pool."""
    JACOBI = 4
    """The current Jacobi guess for that position."""
    FILL = 5
    """Prompt tokens drawn by a seeded generator: the Jacobi starting point."""


SOURCE_NAMES = tuple(source.name.lower() for source in Source)


class CountedBy(enum.Enum):
    STEP = "step"
    """The step kernel (and the reference drafter, identically)."""
    DRAFTER = "drafter"
    """The compiled drafter's Python side (admission, memory, prefill)."""
    PROPOSER = "proposer"
    """The vLLM-facing proposer."""


@dataclasses.dataclass(frozen=True)
class Counter:
    name: str
    """The field in the kernels' record and in `LookaheadStats`, and the snapshot key."""
    help: str
    metric: str | None
    """The Prometheus family after `vllm:lookahead_`; None: exported only through the counter
    that splits it by source (`total_of`)."""
    counted_by: CountedBy = CountedBy.STEP
    by_source: bool = False
    """One count per `Source` (Prometheus label `source`)."""
    total_of: str | None = None
    """For a by-source counter: the counter it splits."""
    seconds: bool = False


COUNTERS = (
    Counter("steps", "Engine steps the lookahead proposer ran in.", "steps", CountedBy.DRAFTER),
    Counter("chains", "Draft chains proposed (one per request per step with drafts).", "chains"),
    Counter("draft_tokens", "Draft tokens proposed.", None),
    Counter("cut_tokens", "Candidate draft tokens the adaptive cut left out (not worth "
                          "verifying).", "cut_tokens"),
    Counter("verified_chains", "Draft chains verified by the target model.", "verified_chains"),
    Counter("verified_tokens", "Draft tokens verified by the target model (vLLM's "
                               "spec_decode_num_draft_tokens).", "verified_tokens"),
    Counter("accepted_tokens", "Draft tokens accepted.", None),
    Counter("drafted_by_source", "Draft tokens proposed, by what filled them.", "draft_tokens",
            by_source=True, total_of="draft_tokens"),
    Counter("accepted_by_source", "Draft tokens accepted, by what filled them (sums to vLLM's "
                                  "spec_decode_num_accepted_tokens).", "accepted_tokens",
            by_source=True, total_of="accepted_tokens"),
    Counter("trajectory_ngrams", "n-grams harvested from the Jacobi trajectory into the pool.",
            "trajectory_ngrams"),
    Counter("resyncs", "Times a request's state was rebuilt from its committed tokens.",
            "resyncs"),
    Counter("memory_evictions", "Evictions that kept the drafter within its memory budget.",
            "memory_evictions", CountedBy.DRAFTER),
    Counter("prompt_tokens_indexed_in_prefill", "Prompt tokens indexed in the steps that "
            "prefilled them (the rest is indexed at a request's first sample).",
            "prefill_indexed_tokens", CountedBy.DRAFTER),
    Counter("propose_seconds", "Seconds spent in the lookahead proposer.", "proposer_seconds",
            CountedBy.PROPOSER, seconds=True),
)
BY_NAME = {counter.name: counter for counter in COUNTERS}

KERNEL_COUNTERS = np.dtype([
    (c.name, np.int64, (len(Source),)) if c.by_source else (c.name, np.int64)
    for c in COUNTERS if c.counted_by is CountedBy.STEP])
"""The step kernel's counters, one record: `counters.resyncs += 1` in a kernel."""


def _default(counter: Counter) -> Any:
    if counter.by_source:
        return dataclasses.field(default_factory=lambda: [0] * len(Source))
    return dataclasses.field(default=0.0 if counter.seconds else 0)


LookaheadStats = dataclasses.make_dataclass(
    "LookaheadStats",
    [(c.name, list[int] if c.by_source else float if c.seconds else int, _default(c))
     for c in COUNTERS],
    namespace={
        "__doc__": "Every counter of `COUNTERS`, as plain Python values.",
        "as_dict": lambda self: {
            c.name: dict(zip(SOURCE_NAMES, getattr(self, c.name), strict=True))
            if c.by_source else getattr(self, c.name) for c in COUNTERS},
        "step_counts": lambda self: {c.name: getattr(self, c.name) for c in COUNTERS
                                     if c.counted_by is CountedBy.STEP},
    },
)
LookaheadStats.__module__ = __name__


def read_kernel_counters(record: np.ndarray, stats: Any) -> None:
    """Copy the kernel's counter record (a one-entry array) into `stats`."""
    for name in KERNEL_COUNTERS.names:
        value = record[name][0]
        setattr(stats, name, value.tolist())
