"""What one verification step tells the proposer: per request, the chain that was verified and the
target's greedy prediction at every chain position (including those after the first rejection)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class StepTrajectory:
    req_ids: list[str]
    bases: np.ndarray
    """Committed tokens of each row before the step (the token index of its first draft)."""
    cu_drafts: np.ndarray
    """Row i's drafts and predictions are `drafts[cu[i]:cu[i+1]]`, `argmax[cu[i]:cu[i+1]]`."""
    resolve: Callable[[], tuple[np.ndarray, np.ndarray]]
    """Returns the flat `(drafts, argmax)`; on CUDA it waits for the non-blocking copies, so it is
    called only when `propose` first needs them."""
    _arrays: tuple[np.ndarray, np.ndarray] | None = None
    _rows: dict[str, int] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The flat `(drafts, argmax)`, resolved once."""
        if self._arrays is None:
            self._arrays = self.resolve()
        return self._arrays

    def row(self, req_id: str) -> tuple[int, np.ndarray, np.ndarray] | None:
        """`(base, drafts, argmax)` of a request, or None if it had no drafts this step."""
        if self._rows is None:
            self._rows = {rid: i for i, rid in enumerate(self.req_ids)}
        i = self._rows.get(req_id)
        if i is None:
            return None
        lo, hi = int(self.cu_drafts[i]), int(self.cu_drafts[i + 1])
        if lo == hi:
            return None
        drafts, argmax = self.arrays()
        return int(self.bases[i]), drafts[lo:hi], argmax[lo:hi]
