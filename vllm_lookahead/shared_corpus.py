"""Finished requests' output, shared with later requests of the same namespace.

Each namespace has one compiled text index (`step.corpus`), matched like a request's own text. A
finished request's output is appended whole, with a separator; when the retained text passes the
token budget the oldest sequences (whatever their namespace) are dropped, and a namespace's index
is rebuilt from what it retains once a quarter of it is stale, so that the cost of rebuilding
stays proportional to what was added (the schedule of `reference.context_index.SharedCorpus`, so
that both match the same text).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from vllm_lookahead import context_index, step


class SharedCorpus:
    def __init__(self, state: step.DrafterState, max_tokens: int) -> None:
        self._state = state
        self.max_tokens = max_tokens
        self._sequences: dict[int, deque[np.ndarray]] = {}
        self._order: deque[int] = deque()  # the namespace of each sequence, oldest first
        self.retained = 0

    def __len__(self) -> int:
        return self.retained

    @property
    def sequence_bytes(self) -> int:
        """What the retained sequences hold, beside the indexes (counted with the state)."""
        return 4 * self.retained

    def add(self, namespace: int, tokens: np.ndarray) -> None:
        if not len(tokens) or self.max_tokens <= 0:
            return
        seq = np.asarray(tokens[-self.max_tokens:], dtype=np.int32)
        self._sequences.setdefault(namespace, deque()).append(seq)
        self._order.append(namespace)
        self.retained += len(seq) + 1
        self._extend(namespace, seq)
        stale: set[int] = set()
        while self.retained > self.max_tokens:
            stale.add(self._drop_oldest())
        for ns in stale:
            self._rebuild_if_stale(ns)

    def evict_until(self, done: Callable[[], bool]) -> None:
        """Drop the oldest sequences until `done()` (the memory budget)."""
        while self._order and not done():
            self._rebuild_if_stale(self._drop_oldest())

    def _drop_oldest(self) -> int:
        oldest = self._order.popleft()
        self.retained -= len(self._sequences[oldest].popleft()) + 1
        return oldest

    def _extend(self, namespace: int, seq: np.ndarray) -> None:
        context_index.extend(step.corpus(self._state, namespace),
                             np.append(seq, np.int32(context_index.SEPARATOR)))

    def _rebuild_if_stale(self, namespace: int) -> None:
        sequences = self._sequences[namespace]
        kept = sum(len(s) + 1 for s in sequences)
        index = step.corpus(self._state, namespace)
        if not sequences:
            del self._sequences[namespace]
            context_index.free(index)
        elif context_index.length_of(index) > kept + kept // 4:
            context_index.free(index)
            for seq in sequences:
                self._extend(namespace, seq)
