"""The n-gram pool of the Jacobi trajectory: context key → up to G continuations with evidence.

An n-gram `t[s], t[s+1], ..., t[s+N-1]` harvested from the trajectory is stored under the keys
`t[s-k+1 .. s]` for every key length k = 1 .. max_key_len (LADE keys by the first token only,
k = 1). Each key keeps at most `capacity` continuations (LADE's GUESS_SET_SIZE, G), each with the
number of times it was harvested: harvesting it again refreshes it and counts a hit; a new one on
a full key evicts the least recently refreshed. `candidates` returns all of a context's
continuations, longest key first, so that the drafter can choose among them by their evidence
(LADE verifies all G in parallel; vLLM verifies one chain, so the choice has to be made before
verification).

Python dicts keep insertion order, so one dict per key is an O(1) LRU (pop + re-insert to
refresh, first key to evict). A step adds a handful of n-grams per request, so keys are sliced
from Python lists: numpy's per-call overhead costs more than it saves at that size.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

Key = tuple[int, ...]
Continuation = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Candidate:
    key_len: int
    tokens: Continuation
    hits: int
    """How many times this continuation was harvested under this key."""


class NGramPool:
    def __init__(self, ngram_size: int, capacity: int, max_key_len: int) -> None:
        if ngram_size < 2:
            raise ValueError(f"ngram_size must be >= 2, got {ngram_size}")
        self.cont_len = ngram_size - 1
        self.capacity = capacity
        self.max_key_len = max_key_len
        self._table: dict[Key, dict[Continuation, int]] = {}
        self.num_continuations = 0

    def __len__(self) -> int:
        return self.num_continuations

    @property
    def num_keys(self) -> int:
        return len(self._table)

    def add(self, seq: np.ndarray, starts: np.ndarray, conts: np.ndarray) -> None:
        """Insert continuation `conts[i]` under every key of `seq` that ends at `starts[i]`; keys
        that reach before the start of `seq` or hold a negative (missing) token are skipped."""
        if not len(starts):
            return
        tokens = seq.tolist()
        insert = self._insert
        for start, cont in zip(starts.tolist(), map(tuple, conts.tolist()), strict=True):
            for k in range(1, min(self.max_key_len, start + 1) + 1):
                key = tuple(tokens[start - k + 1:start + 1])
                # Each longer key adds one token in front; once that one is missing, so are all
                # longer keys.
                if key[0] < 0:
                    break
                insert(key, cont)

    def candidates(self, context: list[int]) -> list[Candidate]:
        """Every continuation stored under a key that ends the context, longest key first and,
        within a key, most recently refreshed first."""
        out: list[Candidate] = []
        for k in range(min(self.max_key_len, len(context)), 0, -1):
            bucket = self._table.get(tuple(context[-k:]))
            if bucket:
                out.extend(Candidate(k, cont, hits) for cont, hits in reversed(bucket.items()))
        return out

    def continuations(self, key: Key) -> list[Continuation]:
        """Continuations stored under `key`, least recently refreshed first."""
        return list(self._table.get(key, ()))

    def nbytes(self) -> int:
        """Approximate memory held: the table, its buckets, keys, continuations and the int
        objects in them (CPython caches small ints; counted anyway, as an upper bound)."""
        total = sys.getsizeof(self._table)
        for key, bucket in self._table.items():
            total += sys.getsizeof(key) + sys.getsizeof(bucket)
            total += sum(sys.getsizeof(t) for t in key)
            for cont in bucket:
                total += sys.getsizeof(cont) + sum(sys.getsizeof(t) for t in cont)
        return total

    def _insert(self, key: Key, cont: Continuation) -> None:
        bucket = self._table.get(key)
        if bucket is None:
            self._table[key] = {cont: 1}
            self.num_continuations += 1
            return
        hits = bucket.pop(cont, 0)
        if hits == 0:
            if len(bucket) >= self.capacity:
                del bucket[next(iter(bucket))]
            else:
                self.num_continuations += 1
        bucket[cont] = hits + 1
