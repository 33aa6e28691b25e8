"""The n-gram pool: context key → bounded LRU of (N-1)-token continuations.

An n-gram `t[s], t[s+1], ..., t[s+N-1]` is stored under the keys `t[s-k+1 .. s]` for every key
length k = 1 .. max_key_len (LADE keys by the first token only, k = 1). Lookup tries the longest
key that matches the end of the context, then shorter ones, and returns that key's most recently
refreshed continuation. Each key keeps at most `capacity` continuations (LADE's GUESS_SET_SIZE):
re-inserting one moves it to the most-recent end, a new one on a full key evicts the oldest.

Python dicts keep insertion order, so one dict per key is an O(1) LRU (pop + re-insert to
refresh, first key to evict). A step adds a handful of n-grams per request, so keys are sliced
from Python lists: numpy's per-call overhead costs more than it saves at that size.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable

import numpy as np

Key = tuple[int, ...]
Continuation = tuple[int, ...]


class Origin(enum.IntEnum):
    """Where an n-gram was first seen; kept across refreshes so proposals can be attributed."""

    PROMPT = 0
    OUTPUT = 1
    TRAJECTORY = 2


class NGramPool:
    def __init__(self, ngram_size: int, capacity: int, max_key_len: int) -> None:
        if ngram_size < 2:
            raise ValueError(f"ngram_size must be >= 2, got {ngram_size}")
        self.cont_len = ngram_size - 1
        self.capacity = capacity
        self.max_key_len = max_key_len
        self._table: dict[Key, dict[Continuation, Origin]] = {}
        self.num_continuations = 0

    def __len__(self) -> int:
        return self.num_continuations

    @property
    def num_keys(self) -> int:
        return len(self._table)

    def add(self, seq: np.ndarray, starts: np.ndarray, conts: np.ndarray, origin: Origin) -> None:
        """Insert continuation `conts[i]` under every key of `seq` that ends at `starts[i]`; keys
        that reach before the start of `seq` or hold a negative (missing) token are skipped."""
        if len(starts):
            self._add(seq.tolist(), starts.tolist(), map(tuple, conts.tolist()), origin)

    def add_sequence(self, seq: np.ndarray, first_start: int, origin: Origin) -> None:
        """Insert every n-gram of `seq` that starts at index `first_start` or later."""
        n = self.cont_len + 1
        first_start = max(first_start, 0)
        starts = range(first_start, len(seq) - n + 1)
        if starts:
            tokens = seq.tolist()
            self._add(tokens, starts, (tuple(tokens[s + 1:s + n]) for s in starts), origin)

    def _add(self, tokens: list[int], starts: Iterable[int], conts: Iterable[Continuation],
             origin: Origin) -> None:
        insert = self._insert
        for start, cont in zip(starts, conts, strict=True):
            for k in range(1, min(self.max_key_len, start + 1) + 1):
                key = tuple(tokens[start - k + 1:start + 1])
                # Each longer key adds one token in front; once that one is missing, so are all
                # longer keys.
                if key[0] < 0:
                    break
                insert(key, cont, origin)

    def lookup(self, context: np.ndarray) -> tuple[Continuation, Origin] | None:
        """The most recent continuation under the longest key that ends the context."""
        tail = context[-self.max_key_len:].tolist()
        for k in range(len(tail), 0, -1):
            bucket = self._table.get(tuple(tail[-k:]))
            if bucket:
                cont = next(reversed(bucket))
                return cont, bucket[cont]
        return None

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

    def continuations(self, key: Key) -> list[Continuation]:
        """Continuations stored under `key`, oldest first."""
        return list(self._table.get(key, ()))

    def _insert(self, key: Key, cont: Continuation, origin: Origin) -> None:
        bucket = self._table.get(key)
        if bucket is None:
            self._table[key] = {cont: origin}
            self.num_continuations += 1
            return
        first_origin = bucket.pop(cont, None)
        if first_origin is None:
            if len(bucket) >= self.capacity:
                del bucket[next(iter(bucket))]
            else:
                self.num_continuations += 1
        bucket[cont] = origin if first_origin is None else first_origin
