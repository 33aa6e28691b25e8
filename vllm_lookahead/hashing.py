"""Hashes of token sequences, shared by the text index and the trajectory pool (compiled).

A sequence's hash is a polynomial in the tokens read backwards from its end, so the hashes of every
suffix of a context come from one pass (`suffix_hashes`), and a rolling hash slides a window of
fixed length along a text (`context_index`). Both tables are open-addressing tables whose entries
keep six bits of their key's hash (`fingerprint`), so that most probes that meet another key are
told apart without reading the key's tokens.
"""

from __future__ import annotations

import numpy as np

from vllm_lookahead.compiled import kernel

MAX_ORDER = 16
"""The longest sequence hashed: the longest context any source matches."""
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_KEY_LENGTH_MIX = np.uint64(0x94D049BB133111EB)
FINGERPRINT_SHIFT = 24
"""Table entries keep a value in their low 24 bits and the fingerprint in the 6 bits above."""
FINGERPRINT_MASK = np.int32(63 << FINGERPRINT_SHIFT)
VALUE_MASK = np.int32((1 << FINGERPRINT_SHIFT) - 1)
MAX_VALUE = (1 << FINGERPRINT_SHIFT) - 1
"""The largest value a table entry keeps beside its fingerprint."""


def _powers() -> np.ndarray:
    out, value, base = [], 1, 0x9E3779B97F4A7C15
    for _ in range(MAX_ORDER):
        out.append(value)
        value = (value * base) & ((1 << 64) - 1)
    return np.array(out, dtype=np.uint64)


POWERS = _powers()
"""POWERS[m]: the weight of the token m places before a sequence's end."""


@kernel(inline=True)
def token_term(token: int) -> np.uint64:
    return np.uint64(np.int64(token) + 1)


@kernel(inline=True)
def suffix_hashes(buf: np.ndarray, end: int, n: int, out: np.ndarray) -> None:
    """out[m]: the hash of buf[end-m .. end] (m+1 tokens), for m < n."""
    h = np.uint64(0)
    for m in range(n):
        h += token_term(buf[end - m]) * POWERS[m]
        out[m] = h


@kernel(inline=True)
def with_key_length(h: np.uint64, length: int) -> np.uint64:
    """A hash that also tells keys of different lengths apart (the pool keeps them in one
    table)."""
    return h ^ (np.uint64(length) * _KEY_LENGTH_MIX)


@kernel(inline=True)
def _mixed(h: np.uint64) -> np.uint64:
    h = h ^ (h >> np.uint64(31))
    return h * _MIX


@kernel(inline=True)
def bucket(h: np.uint64, bits: int) -> int:
    """The first slot probed for hash h in a table of 2**bits entries."""
    return np.int64(_mixed(h) >> np.uint64(64 - bits))


@kernel(inline=True)
def fingerprint(h: np.uint64) -> np.int32:
    """Six bits of the hash (below the bucket's), in place in an entry."""
    return np.int32((_mixed(h) >> np.uint64(20)) & np.uint64(63)) << FINGERPRINT_SHIFT


@kernel(inline=True)
def entry_value(entry: np.int32) -> int:
    return entry & VALUE_MASK


@kernel(inline=True)
def same_fingerprint(entry: np.int32, fp: np.int32) -> bool:
    return (entry & FINGERPRINT_MASK) == fp


@kernel
def insert_new(table: np.ndarray, offset: int, bits: int, h: np.uint64,
               entry: np.int32) -> None:
    """Put an entry for a key the table does not hold yet (the first empty slot of its probe)."""
    mask = (1 << bits) - 1
    i = bucket(h, bits)
    while table[offset + i] != 0:
        i = (i + 1) & mask
    table[offset + i] = entry
