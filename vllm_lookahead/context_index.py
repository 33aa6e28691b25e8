"""Longest-suffix matching over token text: where did the end of the context occur before?

A `TextIndex` holds a token text (a request's prompt and output, or a namespace's shared corpus of
finished outputs) and indexes its k-grams for every k in `ORDERS`. A k-gram is indexed once the
token after it is known, under the end of its latest occurrence and whether every occurrence went
on with the same token. `match` finds the longest indexed suffix of a context; the token after that
occurrence is the draft (prompt lookup and suffix decoding draft this way; keys of several lengths
let the acceptance model say how far to trust each). The plain-Python specification is
`reference.context_index.ContextIndex`.

Each order has its own open-addressing table; all of them lie end to end in `table`. An entry is
`end + 1` of the latest occurrence (its low bits), the key's fingerprint (`hashing`) and
`INCONSISTENT`, set once two occurrences continued differently. No key is stored: a hit is checked
by reading the text at the stored end, and the old successor is `tokens[end + 1]`. A table grows
past load 2/3 and is sized for load at most 3/5 (with the fingerprint, the longer probes of a
fuller table rarely read the text, and a table half the size keeps more of a large batch in the
caches).
"""

from __future__ import annotations

import numpy as np
from numba import from_dtype, types
from numba.experimental import structref

from vllm_lookahead.compiled import (
    I32,
    MEMORY,
    RecordType,
    borrowed,
    define_record,
    grown,
    kernel,
    release,
    replaced,
    zeros,
)
from vllm_lookahead.hashing import (
    MAX_ORDER,
    MAX_VALUE,
    POWERS,
    bucket,
    entry_value,
    fingerprint,
    insert_new,
    same_fingerprint,
    suffix_hashes,
    token_term,
)

ORDERS = (1, 2, 3, 4, 6, 8, 12, 16)
"""k-gram lengths indexed; the longest match is found among these (a match of 10 counts as 8)."""
NUM_ORDERS = len(ORDERS)
SEPARATOR = -1
"""Between sequences of a shared corpus: no k-gram spans it, no continuation runs past it."""
MAX_TEXT = MAX_VALUE
"""Tokens a text may hold: an entry keeps `end + 1` beside its fingerprint."""
INCONSISTENT = np.int32(1 << 30)
BULK = 256
"""From this many new ends on, index order by order (`_index_bulk`): one order's table stays in
cache while every end is inserted into it."""
_ORDERS = np.array(ORDERS, dtype=np.int64)
ORDER_TABLE = np.dtype([
    ("bits", np.int64),  # log2 of the table's size (0: no table)
    ("count", np.int64),  # keys held
    ("offset", np.int64),  # where the table starts in `table`
], align=True)
"""Where one order's table lies in a text index's `table`, and how full it is."""


class TextIndexType(RecordType):
    pass


class TextIndex(structref.StructRefProxy):
    """A text and its k-gram index (a compiled record; see the module docstring)."""


TEXT_INDEX = define_record(TextIndexType, TextIndex, [
    ("tokens", I32),  # the text; its first `length` entries are held
    ("length", types.int64),
    ("indexed", types.int64),  # ends below this are indexed (all but the last token's)
    ("evicted", types.boolean),  # text and index dropped for the memory budget
    ("table", I32),  # every order's table, end to end
    ("orders", types.Array(from_dtype(ORDER_TABLE), 1, "C")),  # per order, where its table is
    ("memory", MEMORY),
])


@kernel
def new_text_index(memory: np.ndarray) -> TextIndex:
    index = structref.new(TEXT_INDEX)
    index.memory = memory
    index.tokens = np.zeros(0, dtype=np.int32)
    index.table = np.zeros(0, dtype=np.int32)
    index.orders = np.zeros(NUM_ORDERS, dtype=ORDER_TABLE)
    index.length = 0
    index.indexed = 0
    index.evicted = False
    return index


@kernel(inline=True)
def _entry(end: int, fp: np.int32, inconsistent: np.int32) -> np.int32:
    return (end + 1) | inconsistent | fp


@kernel(inline=True)
def _entry_end(entry: np.int32) -> int:
    return entry_value(entry) - 1


@kernel(inline=True)
def _same_key(text: np.ndarray, a: int, b: int, k: int) -> bool:
    for m in range(k):  # noqa: SIM110 (numba compiles loops, not generators)
        if text[a - m] != text[b - m]:
            return False
    return True


@kernel(inline=True)
def _over(count: int, bits: int, num: int, den: int) -> bool:
    """More than num/den of a table of 2**bits entries would be in use."""
    return bits == 0 or den * count > num << bits


@kernel
def _reserve(index: TextIndex, extra: int) -> None:
    """Room for `extra` more keys in every order's table. A table must grow past load 2/3 and
    grows to load at most 3/5; in between, at most one table grows per call, the fullest: the
    orders of a decoding request fill at about the same rate, and growing them all in one step
    would stall that step with every table's rehash. The tables are rebuilt end to end, their
    entries rehashed from the text they point to."""
    orders = index.orders
    must, early, fullest = False, -1, 0.0
    for o in range(NUM_ORDERS):
        count, bits = orders[o].count + extra, orders[o].bits
        if _over(count, bits, 2, 3):
            must = True
        elif _over(count, bits, 3, 5) and count / (1 << bits) > fullest:
            early, fullest = o, count / (1 << bits)
    if not must and early < 0:
        return
    old, text, before = index.table, index.tokens, orders.copy()
    size = 0
    for o in range(NUM_ORDERS):
        bits = before[o].bits
        if _over(orders[o].count + extra, bits, 2, 3) if must else o == early:
            bits = max(bits, 4)
            while _over(orders[o].count + extra, bits, 3, 5):
                bits += 1
        orders[o].bits = bits
        orders[o].offset = size
        size += 1 << bits
    release(index.memory, old)
    table = zeros(index.memory, old, size)
    index.table = table
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    for o in range(NUM_ORDERS):
        k, offset, bits = ORDERS[o], orders[o].offset, orders[o].bits
        old_offset, old_bits = before[o].offset, before[o].bits
        if old_bits == bits:
            table[offset:offset + (1 << bits)] = old[old_offset:old_offset + (1 << bits)]
            continue
        for i in range(old_offset, old_offset + (1 << old_bits) if old_bits else 0):
            v = old[i]
            if v != 0:
                suffix_hashes(text, _entry_end(v), k, hashes)
                insert_new(table, offset, bits, hashes[k - 1], v)


@kernel
def _index_end(index: TextIndex, text: np.ndarray, table: np.ndarray, e: int,
               hashes: np.ndarray) -> None:
    """Every order's k-gram ending at e, with the successor text[e+1]: the latest occurrence
    wins, successors that differ mark the key inconsistent."""
    succ = text[e + 1]
    if succ == SEPARATOR:
        return
    suffix_hashes(text, e, min(MAX_ORDER, e + 1), hashes)
    orders = borrowed(index.orders)
    fresh = False  # a shorter suffix was new here: so is every longer one, no compare needed
    known_end, known_len = -1, 0  # the latest occurrence of the last order that matched
    for o in range(NUM_ORDERS):
        k = ORDERS[o]
        if k > e + 1 or text[e - k + 1] == SEPARATOR:
            break
        offset, bits = orders[o].offset, orders[o].bits
        mask = (1 << bits) - 1
        i = bucket(hashes[k - 1], bits)
        fp = fingerprint(hashes[k - 1])
        while True:
            v = table[offset + i]
            if v == 0:
                table[offset + i] = _entry(e, fp, 0)
                orders[o].count += 1
                fresh = True
                break
            if not fresh and same_fingerprint(v, fp):
                old = _entry_end(v)
                # Where the shorter key matched at this very end, its tokens need no compare.
                skip = known_len if old == known_end else 0
                if _same_key(text, old - skip, e - skip, k - skip):
                    inconsistent = v & INCONSISTENT
                    if text[old + 1] != succ:
                        inconsistent = INCONSISTENT
                    table[offset + i] = _entry(max(old, e), fp, inconsistent)
                    known_end, known_len = old, k
                    break
            i = (i + 1) & mask


@kernel
def _index_bulk(index: TextIndex, text: np.ndarray, table: np.ndarray, lo: int,
                hi: int) -> None:
    """`_index_end` for every end in [lo, hi), one order at a time, with a rolling hash per order.
    The entries are the same whatever the order of insertion (the latest end wins, successors
    that differ mark a key inconsistent), so this indexes exactly what `_index_end` would."""
    n = hi - lo
    alive = np.empty(n, dtype=np.uint8)  # every shorter order was indexed at this end
    fresh = np.zeros(n, dtype=np.uint8)  # a shorter order's key was new at this end
    for i in range(n):
        alive[i] = 1 if text[lo + i + 1] != SEPARATOR else 0
    orders = index.orders
    for o in range(NUM_ORDERS):
        k = ORDERS[o]
        offset, bits = orders[o].offset, orders[o].bits
        mask = (1 << bits) - 1
        top = POWERS[k - 1]
        h = np.uint64(0)
        have = False  # h holds the hash of the k tokens ending at the previous end
        for i in range(n):
            e = lo + i
            if e + 1 < k:
                alive[i] = 0
                continue
            if have:
                h = token_term(text[e]) + POWERS[1] * (h - token_term(text[e - k]) * top)
            else:
                h = np.uint64(0)
                for m in range(k):
                    h += token_term(text[e - m]) * POWERS[m]
                have = True
            if alive[i] == 0:
                continue
            if text[e - k + 1] == SEPARATOR:
                alive[i] = 0
                continue
            succ = text[e + 1]
            j = bucket(h, bits)
            fp = fingerprint(h)
            while True:
                v = table[offset + j]
                if v == 0:
                    table[offset + j] = _entry(e, fp, 0)
                    orders[o].count += 1
                    fresh[i] = 1
                    break
                if fresh[i] == 0 and same_fingerprint(v, fp):
                    old = _entry_end(v)
                    if _same_key(text, old, e, k):
                        inconsistent = v & INCONSISTENT
                        if text[old + 1] != succ:
                            inconsistent = INCONSISTENT
                        table[offset + j] = _entry(max(old, e), fp, inconsistent)
                        break
                j = (j + 1) & mask


@kernel
def index_ends(index: TextIndex, lo: int, hi: int, hashes: np.ndarray) -> None:
    """Index the k-grams ending at lo .. hi-1 (their successors are in the text)."""
    if hi <= lo:
        return
    _reserve(index, hi - lo)
    if hi - lo >= BULK:
        _index_bulk(index, index.tokens, index.table, lo, hi)
    else:
        text, table = borrowed(index.tokens), borrowed(index.table)
        for e in range(lo, hi):
            _index_end(index, text, table, e, hashes)
    if hi > index.indexed:
        index.indexed = hi


@kernel
def append(index: TextIndex, tokens: np.ndarray, lo: int, hi: int,
           hashes: np.ndarray) -> None:
    """Append tokens[lo:hi] and index every end whose successor is now known (an evicted text
    is only counted)."""
    n = index.length
    if index.evicted:
        index.length = n + hi - lo
        return
    text = grown(index.memory, index.tokens, n + hi - lo)
    index.tokens = text
    for i in range(lo, hi):
        text[n + i - lo] = tokens[i]
    index.length = n + hi - lo
    index_ends(index, max(n - 1, 0), n + hi - lo - 1, hashes)


@kernel
def extend(index: TextIndex, tokens: np.ndarray) -> None:
    """`append` of the whole of `tokens`, from Python."""
    append(index, tokens, 0, tokens.shape[0], np.empty(MAX_ORDER, dtype=np.uint64))


@kernel
def reserve(index: TextIndex, n: int) -> None:
    """Room for n tokens of text in an empty index and for their k-grams, sized as `extend` of
    all n at once sizes it: a prompt indexed over several steps then rebuilds no table on the
    way and ends up in the same arrays."""
    if index.evicted or n < 2:
        return
    index.tokens = grown(index.memory, index.tokens, n)
    _reserve(index, n - 1)


@kernel
def clear(index: TextIndex) -> None:
    """Forget every k-gram (the text stays)."""
    index.table = replaced(index.memory, index.table, 0)
    for order in index.orders:
        order.bits = order.count = order.offset = 0
    index.indexed = 0


@kernel
def evict(index: TextIndex) -> None:
    """Drop text and index for good (the memory budget): their owner drafts from its pool and
    Jacobi window only, and its output is not shared when it finishes."""
    clear(index)
    index.tokens = replaced(index.memory, index.tokens, 0)
    index.evicted = True


@kernel
def free(index: TextIndex) -> None:
    """Release every array: the index holds nothing and is empty again."""
    clear(index)
    index.tokens = replaced(index.memory, index.tokens, 0)
    index.length = 0
    index.evicted = False


@kernel(inline=True)
def _lookup(text: np.ndarray, table: np.ndarray, offset: int, bits: int, k: int,
            ctx: np.ndarray, clen: int, h: np.uint64) -> np.int32:
    """The entry of order k whose key is ctx's last k tokens, or 0."""
    if bits == 0:
        return np.int32(0)
    mask = (1 << bits) - 1
    i = bucket(h, bits)
    fp = fingerprint(h)
    while True:
        v = table[offset + i]
        if v == 0:
            return v
        if not same_fingerprint(v, fp):
            i = (i + 1) & mask
            continue
        end = _entry_end(v)
        same = True
        for m in range(k):
            if text[end - m] != ctx[clen - 1 - m]:
                same = False
                break
        if same:
            return v
        i = (i + 1) & mask


@kernel(inline=True)
def _lookup_order(orders: np.ndarray, text: np.ndarray, table: np.ndarray, o: int,
                  ctx: np.ndarray, clen: int, hashes: np.ndarray) -> np.int32:
    k = ORDERS[o]
    return _lookup(text, table, orders[o].offset, orders[o].bits, k, ctx, clen, hashes[k - 1])


@kernel(inline=True)
def match(index: TextIndex, ctx: np.ndarray, clen: int, hashes: np.ndarray,
          hint: int) -> tuple[int, int, bool]:
    """The longest indexed suffix of ctx[:clen] as (order, end of its latest occurrence, every
    occurrence went on alike), order -1 if none; `hashes` holds ctx's suffix hashes. If order
    k's suffix is indexed, so are all shorter ones, so a search that starts at `hint` (the
    order that matched last) and walks up or down finds what a binary search over the orders
    finds, in fewer lookups: a chain extends its context one token at a time, and the match
    length moves little."""
    n = 0
    while n < NUM_ORDERS and ORDERS[n] <= clen:
        n += 1
    if n == 0:
        return -1, -1, False
    text, table, orders = borrowed(index.tokens), borrowed(index.table), borrowed(index.orders)
    j = min(max(hint, 0), n - 1)
    v = _lookup_order(orders, text, table, j, ctx, clen, hashes)
    if v == 0:
        while j > 0 and v == 0:
            j -= 1
            v = _lookup_order(orders, text, table, j, ctx, clen, hashes)
        if v == 0:
            return -1, -1, False
    else:
        while j + 1 < n:
            w = _lookup_order(orders, text, table, j + 1, ctx, clen, hashes)
            if w == 0:
                break
            j, v = j + 1, w
    return j, _entry_end(v), (v & INCONSISTENT) == 0


@kernel
def longest_match(index: TextIndex, ctx: np.ndarray) -> tuple[int, int, int]:
    """`match` from Python (tests): (matched length, end, consistent), or (0, -1, 0)."""
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    clen = ctx.shape[0]
    suffix_hashes(ctx, clen - 1, min(MAX_ORDER, clen), hashes)
    order, end, consistent = match(index, ctx, clen, hashes, 0)
    if order < 0:
        return 0, -1, 0
    return _ORDERS[order], end, int(consistent)


@kernel
def table_bits(index: TextIndex) -> np.ndarray:
    """Each order's table size (log2), a copy (tests)."""
    bits = np.empty(NUM_ORDERS, dtype=np.int64)
    for o in range(NUM_ORDERS):
        bits[o] = index.orders[o].bits
    return bits


@kernel
def text_of(index: TextIndex, start: int) -> np.ndarray:
    """A copy of the text from `start` on."""
    return index.tokens[start:index.length].copy()


@kernel
def length_of(index: TextIndex) -> int:
    return index.length


@kernel
def nbytes(index: TextIndex) -> int:
    return index.tokens.nbytes + index.table.nbytes


@kernel
def table_nbytes(index: TextIndex) -> int:
    return index.table.nbytes
