"""The n-gram pool of the Jacobi trajectory: context key -> up to G continuations with evidence.

An n-gram `t[s], t[s+1], ..., t[s+N-1]` harvested from the trajectory (`jacobi_window`) is stored
under the keys `t[s-k+1 .. s]` for every key length k = 1 .. max_key_len (LADE keys by the first
token only, k = 1). Each key keeps at most G continuations (LADE's GUESS_SET_SIZE), each with the
number of times it was harvested: harvesting it again refreshes it and counts a hit; a new one on a
full key evicts the least recently refreshed. The chain composer (`chain`) reads every continuation
of a context's keys, longest key first, most recently refreshed first, and prices each by its
evidence. The plain-Python specification is `reference.ngram_cache.NGramPool`.

A `TrajectoryPool` is a compiled record: an open-addressing table of key ids (an entry is
`id + 1` beside the key's fingerprint, `hashing`), the keys (`KEY`: their first continuation,
how many they hold, their length; and their tokens) and the continuations (`CONTINUATION`: the
next one under the same key, their hits; and their tokens). A key's continuations form a list,
most recently refreshed first, evicted from the tail.
"""

from __future__ import annotations

import numpy as np
from numba import from_dtype, types
from numba.experimental import structref

from vllm_lookahead.compiled import (
    I32,
    I32_2D,
    MEMORY,
    RecordType,
    borrowed,
    define_record,
    grown,
    kernel,
    replaced,
)
from vllm_lookahead.hashing import (
    MAX_ORDER,
    MAX_VALUE,
    bucket,
    entry_value,
    fingerprint,
    insert_new,
    same_fingerprint,
    suffix_hashes,
    with_key_length,
)

HITS_MAX = 255
"""Hits saturate here (the acceptance features read at most a few)."""
MAX_CONTINUATIONS = (1 << 23) - 2
"""Continuations a pool may hold. Every key holds one, so key ids stay below it too, within what a
table entry keeps beside its fingerprint."""
assert MAX_CONTINUATIONS < MAX_VALUE
NONE = -1
"""No continuation (the end of a key's list)."""
KEY = np.dtype([
    ("first", np.int32),  # its most recently refreshed continuation, or NONE
    ("count", np.uint16),  # continuations held (at most G)
    ("length", np.uint8),  # tokens in the key
], align=True)
CONTINUATION = np.dtype([
    ("next", np.int32),  # the next (less recently refreshed) one under the same key, or NONE
    ("hits", np.uint8),  # times harvested, saturating at HITS_MAX
], align=True)


class TrajectoryPoolType(RecordType):
    pass


class TrajectoryPool(structref.StructRefProxy):
    """One request's trajectory n-grams (a compiled record; see the module docstring)."""


TRAJECTORY_POOL = define_record(TrajectoryPoolType, TrajectoryPool, [
    ("table", I32),  # key ids by hash
    ("table_bits", types.int64),  # log2 of the table's size (0: no table)
    ("keys", types.Array(from_dtype(KEY), 1, "C")),
    ("key_tokens", I32_2D),  # per key: its tokens, left-aligned
    ("continuations", types.Array(from_dtype(CONTINUATION), 1, "C")),
    ("continuation_tokens", I32_2D),  # per continuation: its N-1 tokens
    ("num_keys", types.int64),
    ("num_continuations", types.int64),
    ("cont_len", types.int64),  # N-1
    ("max_key_len", types.int64),
    ("capacity", types.int64),  # G: continuations per key
    ("memory", MEMORY),
])


@kernel
def new_pool(memory: np.ndarray, cont_len: int, max_key_len: int,
             capacity: int) -> TrajectoryPool:
    pool = structref.new(TRAJECTORY_POOL)
    pool.memory = memory
    pool.cont_len, pool.max_key_len, pool.capacity = cont_len, max_key_len, capacity
    pool.table = np.zeros(0, dtype=np.int32)
    pool.table_bits = 0
    pool.keys = np.zeros(0, dtype=KEY)
    pool.key_tokens = np.zeros((0, max_key_len), dtype=np.int32)
    pool.continuations = np.zeros(0, dtype=CONTINUATION)
    pool.continuation_tokens = np.zeros((0, cont_len), dtype=np.int32)
    pool.num_keys = 0
    pool.num_continuations = 0
    return pool


@kernel(inline=True)
def key_hash(h: np.uint64, length: int) -> np.uint64:
    """The table's hash of a key whose tokens hash to h."""
    return with_key_length(h, length)


@kernel(inline=True)
def find_key(pool: TrajectoryPool, buf: np.ndarray, end: int, length: int,
             h: np.uint64) -> int:
    """The id of key buf[end-length+1 .. end] (hash h, `key_hash`), or -1."""
    bits = pool.table_bits
    if bits == 0:
        return -1
    table, keys, key_tokens = borrowed(pool.table), borrowed(pool.keys), borrowed(pool.key_tokens)
    mask = (1 << bits) - 1
    i = bucket(h, bits)
    fp = fingerprint(h)
    while True:
        v = table[i]
        if v == 0:
            return -1
        kid = entry_value(v) - 1
        if same_fingerprint(v, fp) and keys[kid].length == length:
            same = True
            for m in range(length):
                if key_tokens[kid, length - 1 - m] != buf[end - m]:
                    same = False
                    break
            if same:
                return kid
        i = (i + 1) & mask


@kernel
def _rehash(pool: TrajectoryPool, bits: int) -> None:
    """A table of 2**bits entries holding every key."""
    table = replaced(pool.memory, pool.table, 1 << bits)
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    for kid in range(pool.num_keys):
        length = np.int64(pool.keys[kid].length)
        suffix_hashes(pool.key_tokens[kid], length - 1, length, hashes)
        h = key_hash(hashes[length - 1], length)
        insert_new(table, 0, bits, h, fingerprint(h) | (kid + 1))
    pool.table = table
    pool.table_bits = bits


@kernel
def _new_key(pool: TrajectoryPool, buf: np.ndarray, end: int, length: int,
             h: np.uint64) -> int:
    """Add key buf[end-length+1 .. end] (with no continuation yet); returns its id."""
    kid = pool.num_keys
    if pool.table_bits == 0 or 2 * (kid + 1) > (1 << pool.table_bits):
        _rehash(pool, max(pool.table_bits + 1, 4))
    pool.keys = grown(pool.memory, pool.keys, kid + 1)
    pool.key_tokens = grown(pool.memory, pool.key_tokens, kid + 1)
    for m in range(length):
        pool.key_tokens[kid, m] = buf[end - length + 1 + m]
    key = pool.keys[kid]
    key.length, key.first, key.count = length, NONE, 0
    insert_new(pool.table, 0, pool.table_bits, h, fingerprint(h) | (kid + 1))
    pool.num_keys = kid + 1
    return kid


@kernel(inline=True)
def _holds(pool: TrajectoryPool, node: int, buf: np.ndarray, at: int) -> bool:
    tokens = borrowed(pool.continuation_tokens)
    for m in range(pool.cont_len):  # noqa: SIM110 (numba compiles loops, not generators)
        if tokens[node, m] != buf[at + m]:
            return False
    return True


@kernel
def _new_continuation(pool: TrajectoryPool) -> int:
    node = pool.num_continuations
    pool.continuations = grown(pool.memory, pool.continuations, node + 1)
    pool.continuation_tokens = grown(pool.memory, pool.continuation_tokens, node + 1)
    pool.num_continuations = node + 1
    return node


@kernel
def insert(pool: TrajectoryPool, buf: np.ndarray, end: int, length: int, h: np.uint64,
           cont_at: int) -> None:
    """Continuation buf[cont_at : cont_at+N-1] under key buf[end-length+1 .. end] (hash h):
    refreshed (moved first, one more hit) if the key holds it, else added first, in place of
    the key's least recently refreshed one if the key is full."""
    kid = find_key(pool, buf, end, length, h)
    if kid < 0:
        if pool.num_continuations >= MAX_CONTINUATIONS:
            return  # a new key would hold no continuation
        kid = _new_key(pool, buf, end, length, h)
    key, nodes = borrowed(pool.keys)[kid], borrowed(pool.continuations)
    prev, node, before_prev = NONE, np.int64(key.first), NONE
    while node != NONE:
        if _holds(pool, node, buf, cont_at):
            break
        before_prev = prev
        prev, node = node, np.int64(nodes[node].next)
    if node != NONE:  # refresh: unlink, move to the front, count a hit
        if prev != NONE:
            nodes[prev].next = nodes[node].next
            nodes[node].next = key.first
            key.first = node
        if nodes[node].hits < HITS_MAX:
            nodes[node].hits += 1
        return
    if key.count >= pool.capacity or pool.num_continuations >= MAX_CONTINUATIONS:
        node = prev  # full: the tail (least recently refreshed) makes room, moved to the front
        if before_prev != NONE:
            nodes[before_prev].next = NONE
            nodes[node].next = key.first
            key.first = node
    else:
        node = _new_continuation(pool)
        nodes = borrowed(pool.continuations)
        key.count += 1
        nodes[node].next = key.first
        key.first = node
    tokens = borrowed(pool.continuation_tokens)
    for m in range(pool.cont_len):
        tokens[node, m] = buf[cont_at + m]
    nodes[node].hits = 1


@kernel
def add_harvest(pool: TrajectoryPool, grid: np.ndarray, rows: int,
                hashes: np.ndarray) -> int:
    """Every complete n-gram of `grid[:rows]` (`jacobi_window.observe`: a row is the key's
    context, then the n-gram) under each of its keys whose tokens exist; returns how many
    n-grams that was."""
    mkl = pool.max_key_len
    width = grid.shape[1]
    harvested = 0
    for r in range(rows):
        row = grid[r]
        complete = True
        for m in range(mkl - 1, width):
            if row[m] < 0:
                complete = False
                break
        if not complete:
            continue
        harvested += 1
        suffix_hashes(row, mkl - 1, mkl, hashes)
        for k in range(1, mkl + 1):
            if row[mkl - k] < 0:
                break
            insert(pool, row, mkl - 1, k, key_hash(hashes[k - 1], k), mkl)
    return harvested


@kernel
def clear(pool: TrajectoryPool) -> None:
    """Forget every n-gram, releasing the arrays."""
    memory = pool.memory
    pool.table = replaced(memory, pool.table, 0)
    pool.table_bits = 0
    pool.keys = replaced(memory, pool.keys, 0)
    pool.key_tokens = replaced(memory, pool.key_tokens, 0)
    pool.continuations = replaced(memory, pool.continuations, 0)
    pool.continuation_tokens = replaced(memory, pool.continuation_tokens, 0)
    pool.num_keys = 0
    pool.num_continuations = 0


@kernel
def nbytes(pool: TrajectoryPool) -> int:
    return (pool.table.nbytes + pool.keys.nbytes + pool.key_tokens.nbytes
            + pool.continuations.nbytes + pool.continuation_tokens.nbytes)
