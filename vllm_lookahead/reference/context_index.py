"""Longest-suffix matching over token text: where did the end of the context occur before?

`ContextIndex` indexes a token sequence by its k-grams for k in `ORDERS` (1 .. 16). A k-gram is
indexed once the token after it is known, under the end position of its latest occurrence, with
how often it occurred and whether every occurrence continued with the same token. `match` finds the
longest indexed suffix of a context; the text after that occurrence is the draft (prompt lookup
and suffix decoding draft this way; keys of several lengths let the evidence say how far to trust
it). The index is append-only; `SharedCorpus` builds on it for text shared across requests, with a
token budget enforced by rebuilding from the retained sequences.

Lookups use binary search over the orders: if a context's k-gram suffix was seen, so were all
its shorter suffixes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

ORDERS = (1, 2, 3, 4, 6, 8, 12, 16)
"""k-gram lengths indexed; the longest match is found among these (a match of 10 counts as 8)."""

SEPARATOR = -1
"""Between sequences of a shared corpus: no k-gram spans it, no continuation runs past it."""


@dataclasses.dataclass(frozen=True)
class Match:
    length: int
    """Tokens of the context's end that matched (one of ORDERS)."""
    end: int
    """Index of the last matched token in the indexed text; the continuation starts after it."""
    count: int
    """Occurrences of the matched k-gram with a known successor."""
    consistent: bool
    """Every occurrence was followed by the same token."""


class ContextIndex:
    def __init__(self, max_order: int = ORDERS[-1]) -> None:
        self.orders = tuple(k for k in ORDERS if k <= max_order)
        self.tokens: list[int] = []
        # k-gram -> (end of latest occurrence, occurrences, successor or SEPARATOR if they differ)
        self._seen: dict[tuple[int, ...], tuple[int, int, int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_keys(self) -> int:
        return len(self._seen)

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Append tokens; every k-gram whose successor is now known gets indexed."""
        toks = self.tokens
        first_end = len(toks) - 1
        toks.extend(new_tokens)
        seen = self._seen
        for end in range(max(first_end, 0), len(toks) - 1):
            successor = toks[end + 1]
            if successor == SEPARATOR:
                continue
            for k in self.orders:
                if k > end + 1:
                    break
                key = tuple(toks[end - k + 1:end + 1])
                if key[0] == SEPARATOR:
                    break  # longer keys would span it too
                old = seen.get(key)
                if old is None:
                    seen[key] = (end, 1, successor)
                else:
                    seen[key] = (end, old[1] + 1, successor if old[2] == successor else SEPARATOR)

    def match(self, context: Sequence[int]) -> Match | None:
        """The longest suffix of `context` (one of the orders) that occurred in the text."""
        orders = [k for k in self.orders if k <= len(context)]
        lo, hi = 0, len(orders) - 1
        best: Match | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            k = orders[mid]
            hit = self._seen.get(tuple(context[-k:]))
            if hit is None:
                hi = mid - 1
            else:
                best = Match(k, hit[0], hit[1], hit[2] != SEPARATOR)
                lo = mid + 1
        return best

    def continuation(self, end: int, limit: int) -> list[int]:
        """Up to `limit` tokens after index `end`, stopping at a separator."""
        out = self.tokens[end + 1:end + 1 + limit]
        if SEPARATOR in out:
            out = out[:out.index(SEPARATOR)]
        return out

    def nbytes(self) -> int:
        """Approximate memory: the token list and the index entries (keys, values, slots)."""
        per_key = 8 * (sum(self.orders) / len(self.orders)) + 56 + 64 + 104
        return 8 * len(self.tokens) + int(per_key * len(self._seen))


class SharedCorpus:
    """Finished requests' text, matched like a request's own context: one index per namespace,
    all within one token budget.

    Sequences are appended whole with a separator; when the retained text passes the budget the
    oldest sequences (whatever their namespace) are dropped, and a namespace's index is rebuilt
    from what it retains once a quarter of it is stale, so that the cost of rebuilding stays
    proportional to what was added.
    """

    def __init__(self, max_tokens: int, max_order: int = ORDERS[-1]) -> None:
        self.max_tokens = max_tokens
        self.max_order = max_order
        self._indexes: dict[str | None, ContextIndex] = {}
        self._sequences: dict[str | None, deque[list[int]]] = {}
        self._order: deque[str | None] = deque()  # the namespace of each sequence, oldest first
        self.retained = 0

    def index(self, namespace: str | None) -> ContextIndex | None:
        return self._indexes.get(namespace)

    def add(self, namespace: str | None, tokens: Sequence[int]) -> None:
        if not len(tokens) or self.max_tokens <= 0:
            return
        seq = list(tokens[-self.max_tokens:])
        if namespace not in self._indexes:
            self._indexes[namespace] = ContextIndex(self.max_order)
            self._sequences[namespace] = deque()
        self._sequences[namespace].append(seq)
        self._order.append(namespace)
        self.retained += len(seq) + 1
        self._indexes[namespace].extend([*seq, SEPARATOR])
        stale: set[str | None] = set()
        while self.retained > self.max_tokens:
            oldest = self._order.popleft()
            self.retained -= len(self._sequences[oldest].popleft()) + 1
            stale.add(oldest)
        for ns in stale:
            self._rebuild_if_stale(ns)

    def _rebuild_if_stale(self, namespace: str | None) -> None:
        sequences = self._sequences[namespace]
        kept = sum(len(s) + 1 for s in sequences)
        if not sequences:
            del self._indexes[namespace], self._sequences[namespace]
        elif len(self._indexes[namespace]) > kept + kept // 4:
            index = ContextIndex(self.max_order)
            for seq in sequences:
                index.extend([*seq, SEPARATOR])
            self._indexes[namespace] = index

    def __len__(self) -> int:
        return self.retained

    def nbytes(self) -> int:
        return sum(index.nbytes() for index in self._indexes.values())
