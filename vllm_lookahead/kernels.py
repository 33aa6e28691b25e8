"""The compiled drafter's per-step work (numba): text indexes, trajectory pools, Jacobi windows,
chain composition and the batch-wide cut, over flat arrays.

Everything a request owns lives in one engine-wide *store*: a numba typed list of int32 arrays,
`NREG` regions per slot (slot `s`, region `r` at `store[s * NREG + r]`), grown inside the
kernels. One typed list, not one per region: the dispatcher unboxes each typed-list argument
in about 1 µs, an array in about 0.05 µs. The list owns the arrays; the kernels read them
through the address and length that `_alloc` records in `meta` (`_region`), which skips the
list's reference counting, about 40 ns an access and a dozen accesses a row. Fixed-size
per-slot state sits in 2-D arrays indexed by slot (`meta`, `jw`, `jl`, `rng`). Namespace slots
hold a shared corpus (text and index only). The per-step kernel takes all of these, and its
output buffers, in one `StepState` (a numba structref, bound once and again whenever an array
is replaced): one argument instead of sixteen saves about 1 µs of dispatch on every step.

Exactness: every function mirrors the reference (`reference_drafter.py` and its modules) step for
step, including float arithmetic (decay powers are precomputed in Python, the step cost comes from
the Python cost model), tie-breaking and LRU order, so that both produce identical chains.

Text index layout (one open-addressing table per order): an entry is `end + 1` of the latest
occurrence (bits 0-23), six bits of the key's hash (24-29: a probe that meets another key rarely
reads the text) and bit 30, set once two occurrences continued differently. No key is stored: a
hit is verified by reading the text at the stored end, and the old successor is `text[end + 1]`.
The reference's occurrence count is never used by a draft, so it is not kept.

Pool layout: a hash table (key id + 1) over key records and continuation nodes (below); each key's
nodes form a list, most recently refreshed first (the reference's LRU order reversed), evicting
the tail.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.experimental import structref
from numba.extending import intrinsic, register_jitable
from numba.typed import List

SEP = -1
INCONS = np.int32(1 << 30)
FP_SHIFT = 24
EMASK = np.int32((1 << FP_SHIFT) - 1)
FPMASK = np.int32(63 << FP_SHIFT)
MAX_TEXT = (1 << FP_SHIFT) - 1
"""Tokens a slot's text may hold: an index entry keeps `end + 1` in FP_SHIFT bits."""
MAX_ORDER = 16
NORD_MAX = 8

# Regions of a slot in the store.
R_TEXT = 0
R_FILL = 1
R_STOPS = 2
R_PHASH = 3
R_PKEYS = 4
R_PNODES = 5
R_INDEX = 6  # one table per order, laid end to end (offsets in meta)
NREG = 7

# Fields of meta[slot].
M_KIND = 0  # 0 free, 1 request, 2 namespace
M_TEXT_LEN = 1
M_NPROMPT = 2
M_COMMITTED = 3
M_LAST = 4
M_BUDGET = 5
M_GREEDY = 6
M_NSID = 7  # namespace id (index into nsmap), -1: does not share
M_NKEYS = 8
M_NNODES = 9
M_NCONT = 10
M_HBITS = 11
M_ANCHOR = 12
M_NGUESS = 13
M_ISSUED = 14
M_NFILL = 15
M_NSTOPS = 16
M_BYTES = 17
M_INDEXED = 18  # ends below this are indexed (ContextIndex: all ends but the last token's)
M_NOINDEX = 19  # 1: text and index evicted (memory budget): no own-text matching, no sharing
M_TBITS = 20  # .. + NORD_MAX: bits of each order's table
M_TCOUNT = M_TBITS + NORD_MAX  # .. + NORD_MAX: entries in each order's table
M_TOFF = M_TCOUNT + NORD_MAX  # .. + NORD_MAX: where each order's table starts in the region
M_HINT_OWN = M_TOFF + NORD_MAX  # the order that matched at the last step's first position
M_HINT_SHARED = M_HINT_OWN + 1
M_ADDR = M_HINT_SHARED + 1  # .. + NREG: each region's data address (`_region`)
M_SIZE = M_ADDR + NREG  # .. + NREG: each region's length
M_FIELDS = M_SIZE + NREG

# jw[slot, plane, pos] planes.
J_GUESS = 0
J_FLAG = 1
J_SRC = 2
J_FEAT = 3
# jl[slot, plane, pos, :] planes.
J_LINEAGE = 0
J_ISSUED = 1

# tabs[]: cfg fields, then the orders, then the feature tables (primary feature by evidence).
C_K = 0
C_CONT = 1  # N-1
C_MKL = 2
C_G = 3
C_LIN = 4  # lineage length
C_MAXLEN = 5
C_SUPPORT = 6  # SUPPORT_LEVELS
C_FILLFEAT = 7
C_NORD = 8
C_HITS = 9  # rows of the pool feature table - 1 (hits clamp)
C_TPOOL = 10  # where the pool feature table starts
C_FIELDS = 11
T_ORD = C_FIELDS  # the orders (NORD_MAX entries)
T_COPY = T_ORD + NORD_MAX  # copy_primary[shared][order index][consistent]
T_JAC = T_COPY + 4 * NORD_MAX  # jacobi_primary[position], K+1 entries; the pool table follows

# Sources (estimator.Source) and kinds of source (bits).
S_PROMPT, S_OUTPUT, S_SHARED, S_TRAJ, S_JACOBI, S_FILL = 0, 1, 2, 3, 4, 5
K_OWN, K_SHARED, K_POOL, K_JACOBI = 1, 2, 4, 8

# stats[] fields.
T_CHAINS = 0
T_DRAFT = 1
T_CUT = 2
T_VCHAINS = 3
T_VTOKENS = 4
T_ACCEPTED = 5
T_NGRAMS = 6
T_RESYNCS = 7
T_DRAFTED = 8  # .. + 6 by source
T_ACC_SRC = 14  # .. + 6 by source
T_TOTAL = 20  # bytes held by every region of the store
T_FIELDS = 21

# fl[]: the acceptance model's floor, then the decay's powers (fl[F_DPOW + n] = decay ** n).
F_FLOOR = 0
F_DPOW = 1

_MIX = np.uint64(0xBF58476D1CE4E5B9)
_KEYLEN_MIX = np.uint64(0x94D049BB133111EB)


def _powers() -> np.ndarray:
    out, value, base = [], 1, 0x9E3779B97F4A7C15
    for _ in range(MAX_ORDER):
        out.append(value)
        value = (value * base) & ((1 << 64) - 1)
    return np.array(out, dtype=np.uint64)


POW = _powers()
EMPTY = np.zeros(0, dtype=np.int32)


def new_store(num_slots: int) -> List:
    store = List.empty_list(types.int32[::1])
    for _ in range(num_slots * NREG):
        store.append(EMPTY)
    return store


@structref.register
class _StepStateType(types.StructRef):
    pass


class StepState(structref.StructRefProxy):
    """What `step` reads and writes besides the step's own inputs (`bind_step_state`)."""


structref.define_boxing(_StepStateType, StepState)
_I32, _I64, _F64 = types.int32, types.int64, types.float64
STEP_STATE = _StepStateType([
    ("store", types.ListType(_I32[::1])), ("meta", _I64[:, ::1]), ("rng", types.uint64[::1]),
    ("jw", _I32[:, :, ::1]), ("jl", _I32[:, :, :, ::1]), ("acc", _F64[:, :, ::1]),
    ("fl", _F64[::1]), ("cost", _F64[::1]), ("tabs", _I64[::1]), ("nsmap", _I64[::1]),
    ("counters", _I64[::1]), ("out", _I32[:, :, ::1]), ("out_len", _I32[::1]),
    ("out_reach", _F64[:, ::1]), ("flat", _I32[::1]), ("grid", _I64[:, ::1])])


@njit(cache=True)
def bind_step_state(store, meta, rng, jw, jl, acc, fl, cost, tabs, nsmap, counters, out,
                    out_len, out_reach, flat, grid):
    """The arrays `step` works on, by reference: bind again after replacing any of them."""
    st = structref.new(STEP_STATE)
    st.store, st.meta, st.rng, st.jw, st.jl, st.acc = store, meta, rng, jw, jl, acc
    st.fl, st.cost, st.tabs, st.nsmap, st.counters = fl, cost, tabs, nsmap, counters
    st.out, st.out_len, st.out_reach, st.flat, st.grid = out, out_len, out_reach, flat, grid
    return st


# --- hashing ----------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _mix(h):
    h = h ^ (h >> np.uint64(31))
    return h * _MIX


@njit(cache=True, inline="always")
def _bucket(h, bits):
    return np.int64(_mix(h) >> np.uint64(64 - bits))


@njit(cache=True, inline="always")
def _fingerprint(h):
    """Six bits of a key's hash (below the bucket's), kept in its index entry: most probes that
    meet another key are told apart without reading the text."""
    return np.int32((_mix(h) >> np.uint64(20)) & np.uint64(63)) << FP_SHIFT


@njit(cache=True, inline="always")
def _suffix_hashes(buf, end, n, out):
    """out[m]: hash of buf[end-m .. end] (m+1 tokens), for m < n."""
    h = np.uint64(0)
    for m in range(n):
        h += np.uint64(np.int64(buf[end - m]) + 1) * POW[m]
        out[m] = h


@intrinsic
def _prefetch(typingctx, array, index):
    """Start loading the cache line of array[index] (LLVM's prefetch; no effect on values)."""

    def codegen(context, builder, signature, args):
        view = context.make_array(signature.args[0])(context, builder, args[0])
        address = builder.gep(view.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3),
            "llvm.prefetch.p0")
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(address, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(array, types.int64), codegen


# --- store bookkeeping ------------------------------------------------------------------------


@intrinsic
def _int32_at(typingctx, address):
    """The int32 pointer at an address (LLVM's inttoptr)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return types.CPointer(types.int32)(types.int64), codegen


@njit(cache=True, inline="always")
def _region(meta, s, r):
    """Region r of slot s, read through the address `_alloc` recorded in `meta`: a view that
    owns nothing, about 40 ns cheaper than the typed list's reference-counted access. Valid
    until the region is next replaced (`_alloc`, `_grow`, `free_slot`): the store holds the
    array, and a caller that replaces a region goes on with the array that call returns."""
    return carray(_int32_at(meta[s, M_ADDR + r]), meta[s, M_SIZE + r])


@njit(cache=True)
def _alloc(store, meta, totals, s, r, n):
    """A zeroed region of n int32 for slot s, replacing (and freeing) the old one."""
    new = np.zeros(n, dtype=np.int32)
    delta = 4 * (n - meta[s, M_SIZE + r])
    meta[s, M_BYTES] += delta
    totals[T_TOTAL] += delta
    store[s * NREG + r] = new
    meta[s, M_ADDR + r] = new.ctypes.data
    meta[s, M_SIZE + r] = n
    return new


@njit(cache=True)
def _grow(store, meta, totals, s, r, need):
    """Region r of slot s with room for `need` int32, its content kept (grown by half)."""
    if meta[s, M_SIZE + r] >= need:
        return _region(meta, s, r)
    old = store[s * NREG + r]  # owned: _alloc frees the store's reference
    cap = max(16, old.shape[0])
    while cap < need:
        cap += cap // 2
    new = _alloc(store, meta, totals, s, r, cap)
    new[:old.shape[0]] = old
    return new


@njit(cache=True)
def free_slot(store, meta, totals, s):
    for r in range(NREG):
        totals[T_TOTAL] -= 4 * store[s * NREG + r].shape[0]
        store[s * NREG + r] = np.zeros(0, dtype=np.int32)
    meta[s, :] = 0


@njit(cache=True)
def set_region(store, meta, totals, s, r, values):
    region = _alloc(store, meta, totals, s, r, values.shape[0])
    for i in range(values.shape[0]):
        region[i] = values[i]


# --- the text index (ContextIndex) ------------------------------------------------------------


@njit(cache=True, inline="always")
def _same_key(text, a, b, k):
    for m in range(k):  # noqa: SIM110 (numba compiles loops, not generators)
        if text[a - m] != text[b - m]:
            return False
    return True


@njit(cache=True)
def _table_insert_new(table, off, bits, h, value):
    mask = (1 << bits) - 1
    i = _bucket(h, bits)
    while table[off + i] != 0:
        i = (i + 1) & mask
    table[off + i] = value


@njit(cache=True, inline="always")
def _over(count, bits, num, den):
    """More than num/den of a table of 2**bits entries would be in use."""
    return bits == 0 or den * count > num << bits


@njit(cache=True)
def _reserve_index(store, meta, totals, s, extra, tabs):
    """Room for `extra` more keys in every order's table. A table must grow past load 2/3 (with
    six bits of fingerprint in each entry, the longer probes of a fuller table rarely read the
    text, and a table half the size keeps more of a large batch in the caches), and grows to
    load at most 3/5. In between, at most one table grows per call, the fullest: the orders of
    a decoding request fill at about the same rate, and growing them all in one step would stall
    that step with every table's rehash. The region is rebuilt with the larger tables, their
    entries rehashed from the text they point to."""
    nord = tabs[C_NORD]
    must, early, fullest = False, -1, 0.0
    for o in range(nord):
        count, bits = meta[s, M_TCOUNT + o] + extra, meta[s, M_TBITS + o]
        if _over(count, bits, 2, 3):
            must = True
        elif _over(count, bits, 3, 5) and count / (1 << bits) > fullest:
            early, fullest = o, count / (1 << bits)
    if not must and early < 0:
        return
    old = store[s * NREG + R_INDEX]
    text = store[s * NREG + R_TEXT]
    old_off = meta[s, M_TOFF:M_TOFF + nord].copy()
    old_bits = meta[s, M_TBITS:M_TBITS + nord].copy()
    size = 0
    for o in range(nord):
        bits = old_bits[o]
        if _over(meta[s, M_TCOUNT + o] + extra, bits, 2, 3) if must else o == early:
            bits = max(bits, 4)
            while _over(meta[s, M_TCOUNT + o] + extra, bits, 3, 5):
                bits += 1
        meta[s, M_TBITS + o] = bits
        meta[s, M_TOFF + o] = size
        size += 1 << bits
    table = _alloc(store, meta, totals, s, R_INDEX, size)
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    for o in range(nord):
        k, off, bits = tabs[T_ORD + o], meta[s, M_TOFF + o], meta[s, M_TBITS + o]
        if old_bits[o] == bits:
            table[off:off + (1 << bits)] = old[old_off[o]:old_off[o] + (1 << bits)]
            continue
        for i in range(old_off[o], old_off[o] + (1 << old_bits[o]) if old_bits[o] else 0):
            v = old[i]
            if v != 0:
                _suffix_hashes(text, (v & EMASK) - 1, k, hashes)
                _table_insert_new(table, off, bits, hashes[k - 1], v)


@njit(cache=True)
def _index_end(text, table, meta, s, e, tabs, hashes):
    """ContextIndex.extend for one end position: every order's k-gram ending at e, with the
    successor text[e+1]; the latest occurrence wins, differing successors mark it inconsistent."""
    succ = text[e + 1]
    if succ == SEP:
        return
    _suffix_hashes(text, e, min(MAX_ORDER, e + 1), hashes)
    # In a long text every order's probe is a likely cache miss: start them all at once rather
    # than one after another (a prefetch never faults and changes no value).
    for o in range(tabs[C_NORD]):
        k = tabs[T_ORD + o]
        if k > e + 1:
            break
        _prefetch(table, meta[s, M_TOFF + o] + _bucket(hashes[k - 1], meta[s, M_TBITS + o]))
    fresh = False  # a shorter suffix was new here: so is every longer one, no compare needed
    known_end, known_len = -1, 0  # the latest occurrence of the last order that matched
    for o in range(tabs[C_NORD]):
        k = tabs[T_ORD + o]
        if k > e + 1 or text[e - k + 1] == SEP:
            break
        off, bits = meta[s, M_TOFF + o], meta[s, M_TBITS + o]
        mask = (1 << bits) - 1
        i = _bucket(hashes[k - 1], bits)
        fp = _fingerprint(hashes[k - 1])
        while True:
            v = table[off + i]
            if v == 0:
                table[off + i] = (e + 1) | fp
                meta[s, M_TCOUNT + o] += 1
                fresh = True
                break
            if not fresh and (v & FPMASK) == fp:
                old = (v & EMASK) - 1
                # Where the shorter key matched at this very end, its tokens need no compare.
                skip = known_len if old == known_end else 0
                if _same_key(text, old - skip, e - skip, k - skip):
                    inc = v & INCONS
                    if text[old + 1] != succ:
                        inc = INCONS
                    table[off + i] = (max(old, e) + 1) | inc | fp
                    known_end, known_len = old, k
                    break
            i = (i + 1) & mask


BULK = 256
"""From this many ends on, index order by order (`_index_bulk`): one order's table stays in cache
while every end is inserted into it."""


@njit(cache=True)
def index_range(store, meta, totals, s, lo, hi, tabs, hashes):
    _index_text(_region(meta, s, R_TEXT), store, meta, totals, s, lo, hi, tabs, hashes)


@njit(cache=True)
def _index_text(text, store, meta, totals, s, lo, hi, tabs, hashes):
    """index_range with slot s's text already at hand."""
    if hi <= lo:
        return
    _reserve_index(store, meta, totals, s, hi - lo, tabs)
    table = _region(meta, s, R_INDEX)
    if hi - lo >= BULK:
        _index_bulk(text, table, meta, s, lo, hi, tabs)
    else:
        for e in range(lo, hi):
            _index_end(text, table, meta, s, e, tabs, hashes)
    if hi > meta[s, M_INDEXED]:
        meta[s, M_INDEXED] = hi


@njit(cache=True)
def _index_bulk(text, table, meta, s, lo, hi, tabs):
    """`_index_end` for every end in [lo, hi), one order at a time, with a rolling hash per order.
    The entries are the same whatever the order of insertion (the latest end wins, successors
    that differ mark a key inconsistent), so this indexes exactly what `_index_end` would."""
    n = hi - lo
    alive = np.empty(n, dtype=np.uint8)  # every shorter order was indexed at this end
    fresh = np.zeros(n, dtype=np.uint8)  # a shorter order's key was new at this end
    for i in range(n):
        alive[i] = 1 if text[lo + i + 1] != SEP else 0
    for o in range(tabs[C_NORD]):
        k = tabs[T_ORD + o]
        off, bits = meta[s, M_TOFF + o], meta[s, M_TBITS + o]
        mask = (1 << bits) - 1
        top = POW[k - 1]
        h = np.uint64(0)
        have = False  # h holds the hash of the k tokens ending at the previous end
        for i in range(n):
            e = lo + i
            if e + 1 < k:
                alive[i] = 0
                continue
            if have:
                h = np.uint64(np.int64(text[e]) + 1) + POW[1] * (
                    h - np.uint64(np.int64(text[e - k]) + 1) * top)
            else:
                h = np.uint64(0)
                for m in range(k):
                    h += np.uint64(np.int64(text[e - m]) + 1) * POW[m]
                have = True
            if alive[i] == 0:
                continue
            if text[e - k + 1] == SEP:
                alive[i] = 0
                continue
            succ = text[e + 1]
            j = _bucket(h, bits)
            fp = _fingerprint(h)
            while True:
                v = table[off + j]
                if v == 0:
                    table[off + j] = (e + 1) | fp
                    meta[s, M_TCOUNT + o] += 1
                    fresh[i] = 1
                    break
                if fresh[i] == 0 and (v & FPMASK) == fp:
                    old = (v & EMASK) - 1
                    if _same_key(text, old, e, k):
                        inc = v & INCONS
                        if text[old + 1] != succ:
                            inc = INCONS
                        table[off + j] = (max(old, e) + 1) | inc | fp
                        break
                j = (j + 1) & mask


@njit(cache=True)
def text_extend(store, meta, totals, s, tokens, lo, hi, tabs, hashes):
    """Append tokens[lo:hi] to slot s's text and index every end whose successor is now known
    (a text whose index was evicted is only counted)."""
    n = meta[s, M_TEXT_LEN]
    if meta[s, M_NOINDEX] != 0:
        meta[s, M_TEXT_LEN] = n + hi - lo
        return
    text = _grow(store, meta, totals, s, R_TEXT, n + hi - lo)
    for i in range(lo, hi):
        text[n + i - lo] = tokens[i]
    meta[s, M_TEXT_LEN] = n + hi - lo
    _index_text(text, store, meta, totals, s, max(n - 1, 0), n + hi - lo - 1, tabs, hashes)


@njit(cache=True)
def extend_text(store, meta, counters, s, tokens, tabs):
    """text_extend from Python: the whole of `tokens`."""
    text_extend(store, meta, counters, s, tokens, 0, tokens.shape[0], tabs,
                np.empty(MAX_ORDER, dtype=np.uint64))


@njit(cache=True)
def reserve_text(store, meta, totals, s, n, tabs):
    """Room for n tokens of text in an empty slot and for their index, sized as `extend_text` of
    all n at once sizes it: a prompt indexed over several steps then rebuilds no table on the way
    and ends up in the same arrays."""
    if meta[s, M_NOINDEX] != 0 or n < 2:
        return
    _grow(store, meta, totals, s, R_TEXT, n)
    _reserve_index(store, meta, totals, s, n - 1, tabs)


@njit(cache=True)
def evict_text(store, meta, totals, s, tabs):
    """Drop slot s's text and index for good (the memory budget): it drafts from its pool and
    Jacobi window only, and its output is not shared when it finishes."""
    clear_index(store, meta, totals, s, tabs)
    _alloc(store, meta, totals, s, R_TEXT, 0)
    meta[s, M_NOINDEX] = 1


@njit(cache=True)
def clear_index(store, meta, totals, s, tabs):
    _alloc(store, meta, totals, s, R_INDEX, 0)
    for o in range(tabs[C_NORD]):
        meta[s, M_TBITS + o] = 0
        meta[s, M_TCOUNT + o] = 0
        meta[s, M_TOFF + o] = 0
    meta[s, M_INDEXED] = 0


@njit(cache=True, inline="always")
def _lookup(text, table, off, bits, k, ctx, clen, h):
    """The entry of order k whose key is ctx's last k tokens, or 0."""
    if bits == 0:
        return 0
    mask = (1 << bits) - 1
    i = _bucket(h, bits)
    fp = _fingerprint(h)
    while True:
        v = table[off + i]
        if v == 0:
            return 0
        if (v & FPMASK) != fp:
            i = (i + 1) & mask
            continue
        end = (v & EMASK) - 1
        same = True
        for m in range(k):
            if text[end - m] != ctx[clen - 1 - m]:
                same = False
                break
        if same:
            return v
        i = (i + 1) & mask


@njit(cache=True, inline="always")
def _match(text, table, meta, s, ctx, clen, hashes, tabs, result, hint):
    """ContextIndex.match: the longest order whose suffix of ctx is indexed. result = (order
    index, end, consistent); returns False if nothing matched. If order k's suffix is indexed, so
    are all shorter ones, so a search that starts at `hint` (the order that matched last) and
    walks up or down finds what the reference's binary search finds, in fewer lookups: a chain
    extends its context one token at a time, and the match length moves little."""
    n = 0
    while n < tabs[C_NORD] and tabs[T_ORD + n] <= clen:
        n += 1
    if n == 0:
        return False
    j = min(max(hint, 0), n - 1)
    k = tabs[T_ORD + j]
    v = _lookup(text, table, meta[s, M_TOFF + j], meta[s, M_TBITS + j], k, ctx, clen,
                hashes[k - 1])
    if v == 0:
        while j > 0 and v == 0:
            j -= 1
            k = tabs[T_ORD + j]
            v = _lookup(text, table, meta[s, M_TOFF + j], meta[s, M_TBITS + j], k, ctx, clen,
                        hashes[k - 1])
        if v == 0:
            return False
    else:
        while j + 1 < n:
            k = tabs[T_ORD + j + 1]
            w = _lookup(text, table, meta[s, M_TOFF + j + 1], meta[s, M_TBITS + j + 1], k, ctx,
                        clen, hashes[k - 1])
            if w == 0:
                break
            j, v = j + 1, w
    result[0] = j
    result[1] = (v & EMASK) - 1
    result[2] = 1 if (v & INCONS) == 0 else 0
    return True


# --- the trajectory pool (NGramPool) ----------------------------------------------------------


@njit(cache=True, inline="always")
def _key_hash(h, klen):
    return h ^ (np.uint64(klen) * _KEYLEN_MIX)


# A key record is [tokens (mkl), head node, len << 16 | count]; a node is [tokens (N-1),
# (next + 1) << 8 | hits], hits saturating at 255 (features read at most _HITS_TABLE of them).
# Packed so that a stored continuation costs 16 bytes at N = 4 (N-1 tokens and one link).
HITS_MAX = 255
MAX_NODES = (1 << 23) - 2
"""Continuations a pool may hold. Every key holds one, so key ids stay below it too: a hash-table
entry keeps `id + 1` in FP_SHIFT bits, beside the key's fingerprint."""
assert MAX_NODES < MAX_TEXT


@njit(cache=True, inline="always")
def _next(nodes, nb, c):
    return (nodes[nb + c] >> 8) - 1


@njit(cache=True, inline="always")
def _set_next(nodes, nb, c, nxt):
    nodes[nb + c] = ((nxt + 1) << 8) | (nodes[nb + c] & 255)


@njit(cache=True, inline="always")
def _find_key(phash, pkeys, hbits, kw, mkl, buf, end, klen, h):
    """Key id of buf[end-klen+1 .. end], or -1 if absent."""
    if hbits == 0:
        return -1
    mask = (1 << hbits) - 1
    i = _bucket(h, hbits)
    fp = _fingerprint(h)
    while True:
        v = phash[i]
        if v == 0:
            return -1
        kb = ((v & EMASK) - 1) * kw
        if (v & FPMASK) == fp and pkeys[kb + mkl + 1] >> 16 == klen:
            same = True
            for m in range(klen):
                if pkeys[kb + klen - 1 - m] != buf[end - m]:
                    same = False
                    break
            if same:
                return (v & EMASK) - 1
        i = (i + 1) & mask


@njit(cache=True)
def _new_key(store, meta, totals, s, mkl, phash, pkeys, buf, end, klen, h):
    """Add key buf[end-klen+1 .. end]; returns (its id, the hash table, the key records), the
    arrays replaced where they grew."""
    kw = mkl + 2
    nkeys = meta[s, M_NKEYS]
    hbits = meta[s, M_HBITS]
    if hbits == 0 or 2 * (nkeys + 1) > (1 << hbits):
        nbits = max(hbits + 1, 4)
        phash = _alloc(store, meta, totals, s, R_PHASH, 1 << nbits)
        hashes = np.empty(MAX_ORDER, dtype=np.uint64)
        for kid in range(nkeys):
            kb = kid * kw
            kl = pkeys[kb + mkl + 1] >> 16
            _suffix_hashes(pkeys, kb + kl - 1, kl, hashes)
            kh = _key_hash(hashes[kl - 1], kl)
            _table_insert_new(phash, 0, nbits, kh, _fingerprint(kh) | (kid + 1))
        meta[s, M_HBITS] = nbits
        hbits = nbits
    if pkeys.shape[0] < (nkeys + 1) * kw:
        pkeys = _grow(store, meta, totals, s, R_PKEYS, (nkeys + 1) * kw)
    kb = nkeys * kw
    for m in range(klen):
        pkeys[kb + m] = buf[end - klen + 1 + m]
    pkeys[kb + mkl] = -1
    pkeys[kb + mkl + 1] = klen << 16
    _table_insert_new(phash, 0, hbits, h, _fingerprint(h) | (nkeys + 1))
    meta[s, M_NKEYS] = nkeys + 1
    return nkeys, phash, pkeys


@njit(cache=True, inline="always")
def _same_cont(nodes, nb, buf, at, c):
    for m in range(c):  # noqa: SIM110 (numba compiles loops, not generators)
        if nodes[nb + m] != buf[at + m]:
            return False
    return True


@njit(cache=True)
def _pool_insert(store, meta, totals, s, tabs, phash, pkeys, nodes, buf, end, klen, h, cont_at):
    """NGramPool._insert of continuation buf[cont_at : cont_at+N-1] under key buf[..end];
    returns the pool's three arrays (replaced where they grew)."""
    mkl, c, g = tabs[C_MKL], tabs[C_CONT], tabs[C_G]
    kw, nw = mkl + 2, c + 1
    kid = _find_key(phash, pkeys, meta[s, M_HBITS], kw, mkl, buf, end, klen, h)
    if kid < 0:
        if meta[s, M_NNODES] >= MAX_NODES:
            return phash, pkeys, nodes  # a new key would hold no continuation
        kid, phash, pkeys = _new_key(store, meta, totals, s, mkl, phash, pkeys, buf, end, klen,
                                     h)
    kb = kid * kw
    prev, node, last_prev = -1, pkeys[kb + mkl], -1
    while node >= 0:
        if _same_cont(nodes, node * nw, buf, cont_at, c):
            break
        last_prev = prev
        prev, node = node, _next(nodes, node * nw, c)
    if node >= 0:  # refresh: unlink, count a hit, move to the front
        if prev >= 0:
            _set_next(nodes, prev * nw, c, _next(nodes, node * nw, c))
            _set_next(nodes, node * nw, c, pkeys[kb + mkl])
            pkeys[kb + mkl] = node
        if nodes[node * nw + c] & 255 < HITS_MAX:
            nodes[node * nw + c] += 1
        return phash, pkeys, nodes
    count = pkeys[kb + mkl + 1] & 0xFFFF
    if count >= g or meta[s, M_NNODES] >= MAX_NODES:
        # Full: the tail (least recently refreshed) makes room.
        node = prev
        if last_prev >= 0:
            _set_next(nodes, last_prev * nw, c, -1)
            _set_next(nodes, node * nw, c, pkeys[kb + mkl])
            pkeys[kb + mkl] = node
    else:
        n = meta[s, M_NNODES]
        if nodes.shape[0] < (n + 1) * nw:
            nodes = _grow(store, meta, totals, s, R_PNODES, (n + 1) * nw)
        meta[s, M_NNODES] = n + 1
        meta[s, M_NCONT] += 1
        pkeys[kb + mkl + 1] += 1
        node = n
        nodes[node * nw + c] = 0
        _set_next(nodes, node * nw, c, pkeys[kb + mkl])
        pkeys[kb + mkl] = node
    for m in range(c):
        nodes[node * nw + m] = buf[cont_at + m]
    nodes[node * nw + c] = (nodes[node * nw + c] & ~255) | 1
    return phash, pkeys, nodes


@njit(cache=True)
def clear_pool(store, meta, totals, s):
    for r in (R_PHASH, R_PKEYS, R_PNODES):
        _alloc(store, meta, totals, s, r, 0)
    meta[s, M_NKEYS] = 0
    meta[s, M_NNODES] = 0
    meta[s, M_NCONT] = 0
    meta[s, M_HBITS] = 0


# --- the Jacobi window ------------------------------------------------------------------------


@njit(cache=True)
def _splitmix(state):
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _fill_token(fill, nfill, rng, s):
    """JacobiWindow.random_fill, one token (callers check that there are fill tokens)."""
    state, value = _splitmix(rng[s])
    rng[s] = state
    return fill[np.int64(value % np.uint64(nfill))]


@njit(cache=True, inline="always")
def _is_stop(stops, nstops, token):
    for i in range(nstops):  # noqa: SIM110 (numba compiles loops, not generators)
        if stops[i] == token:
            return True
    return False


@njit(cache=True)
def _observe(store, meta, totals, rng, jw, jl, s, tabs, tokens, base, fd, fy, lo, n, accepted,
             grid, hashes):
    """JacobiWindow.observe followed by NGramPool.add of its harvest; returns the n-grams."""
    span, mkl = tabs[C_LIN], tabs[C_MKL]
    width = span + 2
    rows = max(n - accepted - 1, 0)
    for r in range(rows):
        j = accepted + 1 + r
        i = j - 1  # the input whose lineage is followed
        if jw[s, J_FLAG, i] != 0:
            for m in range(span):
                grid[r, m] = jl[s, J_ISSUED, i, m]
        else:
            for m in range(span):
                p = i + m  # position in [-1 padding] + context[base-span:base] + drafts
                if p < span:
                    q = base - span + p
                    grid[r, m] = tokens[q] if q >= 0 else -1
                else:
                    grid[r, m] = fd[lo + p - span]
        grid[r, span] = fd[lo + j - 1]
        grid[r, span + 1] = fy[lo + j]
    # The next iterate: guesses and their lineages (stop tokens replaced by fill tokens).
    kept = rows
    nfill, nstops = meta[s, M_NFILL], meta[s, M_NSTOPS]
    stops = _region(meta, s, R_STOPS)
    fill = _region(meta, s, R_FILL)
    for r in range(rows):
        guess = grid[r, span + 1]
        stop = nstops > 0 and _is_stop(stops, nstops, guess)
        if stop and nfill == 0:
            kept = r
            break
        if stop:
            jw[s, J_GUESS, r] = _fill_token(fill, nfill, rng, s)
            for m in range(span):
                jl[s, J_LINEAGE, r, m] = -1
        else:
            jw[s, J_GUESS, r] = guess
            for m in range(span):
                jl[s, J_LINEAGE, r, m] = grid[r, 1 + m]
    meta[s, M_NGUESS] = kept
    meta[s, M_ANCHOR] = base + accepted + 1
    jw[s, J_FLAG, :] = 0
    # Harvest: n-grams with all N tokens, under every key whose tokens exist.
    harvested = 0
    phash = _region(meta, s, R_PHASH)
    pkeys = _region(meta, s, R_PKEYS)
    nodes = _region(meta, s, R_PNODES)
    for r in range(rows):
        ok = True
        for m in range(mkl - 1, width):
            if grid[r, m] < 0:
                ok = False
                break
        if not ok:
            continue
        harvested += 1
        row = grid[r]
        _suffix_hashes(row, mkl - 1, mkl, hashes)
        for k in range(1, mkl + 1):
            if row[mkl - k] < 0:
                break
            phash, pkeys, nodes = _pool_insert(store, meta, totals, s, tabs, phash, pkeys,
                                               nodes, row, mkl - 1, k,
                                               _key_hash(hashes[k - 1], k), mkl)
    return harvested


# --- the acceptance model ---------------------------------------------------------------------


@njit(cache=True)
def _learn(meta, jw, acc, fl, stats, s, verified, accepted):
    """LookaheadDrafter._learn: statistics and AcceptanceModel.observe for the issued chain."""
    issued = meta[s, M_ISSUED]
    stats[T_VCHAINS] += 1
    stats[T_VTOKENS] += verified
    stats[T_ACCEPTED] += accepted
    for i in range(min(accepted, issued)):
        stats[T_ACC_SRC + jw[s, J_SRC, i]] += 1
    touched = min(min(verified, issued), accepted + 1)
    if touched == 0:
        return
    g = meta[s, M_GREEDY]
    decay, floor = fl[F_DPOW + touched], fl[F_FLOOR]
    for i in range(touched):
        f = jw[s, J_FEAT, i]
        acc[0, g, f] *= decay
        acc[1, g, f] = max(acc[1, g, f] * decay, floor)
        acc[1, g, f] += 1.0
        if i < accepted:
            acc[0, g, f] += 1.0
        acc[2, g, f] = min(acc[0, g, f] / acc[1, g, f], 0.999)


# --- the step cost model (estimator.CostModel's arithmetic) -----------------------------------
# Plain functions that numba also compiles inline into the step: the Python cost model and the
# compiled drafter run the very same scalar operations in the same order, so their fits agree bit
# for bit. Here rather than in estimator.py because numba invalidates its cache by the file that
# defines a kernel: an edit here recompiles the step.

CS_XX, CS_XY, CS_SF, CS_THETA, CS_SHAPE = 0, 9, 12, 14, 17
CS_DECAY, CS_PRIOR_STEPS, CS_OBSERVATIONS = 20, 21, 22
CS_FIELDS = 23


@register_jitable
def cost_predict(st, rows, tokens):
    return max(st[CS_THETA] + st[CS_THETA + 1] * rows + st[CS_THETA + 2] * tokens, 1e-9)


@register_jitable
def reach_floor(st, rows):
    """The reach below which the cut (`estimator.cut_chains`) keeps no draft token of a batch of
    `rows` chains, less a margin for rounding, so that composing can stop there. The cut keeps a
    token of reach q only while q * step > c * expected, and every token kept before it has reach
    >= q; after k of them, q * (S0 + c * k) > c * (rows + k * q), so q * S0 > c * rows (S0: the
    predicted step without drafts, c: the cost of a verified token). 0 if c is not positive."""
    c = st[CS_THETA + 2]
    if c <= 0.0:
        return 0.0
    return c * rows / cost_predict(st, rows, rows) * (1.0 - 1e-6)


@register_jitable
def cost_observe(st, rows, tokens, seconds):
    """One step's time: update the decayed statistics and refit."""
    # One pause (a client gone quiet, a GC, a busy machine) must not teach the model that
    # tokens are dear.
    if st[CS_OBSERVATIONS] >= 10 and seconds > 3 * cost_predict(st, rows, tokens):
        return
    d = st[CS_DECAY]
    x = (1.0, rows, tokens)
    for i in range(3):
        for j in range(3):
            st[CS_XX + 3 * i + j] = d * st[CS_XX + 3 * i + j] + x[i] * x[j]
        st[CS_XY + i] = d * st[CS_XY + i] + x[i] * seconds
    shaped = st[CS_SHAPE] + rows * st[CS_SHAPE + 1] + tokens * st[CS_SHAPE + 2]
    st[CS_SF] = d * st[CS_SF] + seconds * shaped
    st[CS_SF + 1] = d * st[CS_SF + 1] + shaped * shaped
    st[CS_OBSERVATIONS] += 1.0
    _cost_refit(st)


@register_jitable
def _cost_refit(st):
    """Ridge regression towards the prior shape scaled to the observed times."""
    scale = st[CS_SF] / st[CS_SF + 1]
    xx00 = st[CS_XX]
    # As strong as `prior_steps` typical steps, per parameter.
    weight = st[CS_PRIOR_STEPS] * min(1.0, xx00)
    a = np.empty((3, 4))
    for i in range(3):
        prior_i = st[CS_SHAPE + i] * scale
        ridge = weight * (st[CS_XX + 4 * i] / max(xx00, 1e-9))
        for j in range(3):
            a[i, j] = st[CS_XX + 3 * i + j]
        a[i, i] += ridge
        a[i, 3] = st[CS_XY + i] + ridge * prior_i
    # Gaussian elimination: the matrix is symmetric positive definite, no pivoting needed.
    for i in range(3):
        for r in range(i + 1, 3):
            f = a[r, i] / a[i, i]
            for j in range(i, 4):
                a[r, j] -= f * a[i, j]
    theta = np.empty(3)
    for i in range(2, -1, -1):
        acc = a[i, 3]
        for j in range(i + 1, 3):
            acc -= a[i, j] * theta[j]
        theta[i] = acc / a[i, i]
    # Costs are positive, and a verified token costs no more than two rows do by the prior
    # (a row is a token plus its sampling and bookkeeping).
    for i in range(3):
        st[CS_THETA + i] = max(theta[i], 0.02 * st[CS_SHAPE + i] * scale)
    cap = 2 * (st[CS_SHAPE + 1] * scale + st[CS_SHAPE + 2] * scale)
    st[CS_THETA + 2] = min(st[CS_THETA + 2], cap)


@njit(cache=True)
def cost_observe_compiled(st, rows, tokens, seconds):
    cost_observe(st, rows, tokens, seconds)


# --- one step: sync ---------------------------------------------------------------------------


@njit(cache=True)
def _rebuild_text(store, meta, totals, s, tokens, length, tabs, hashes):
    """LookaheadDrafter._rebuild_text: the prompt as stored, then the committed tokens."""
    if meta[s, M_NOINDEX] != 0:
        meta[s, M_TEXT_LEN] = length
        return
    keep = min(meta[s, M_NPROMPT], length, meta[s, M_TEXT_LEN])
    meta[s, M_TEXT_LEN] = keep
    clear_index(store, meta, totals, s, tabs)
    index_range(store, meta, totals, s, 0, max(keep - 1, 0), tabs, hashes)
    text_extend(store, meta, totals, s, tokens, keep, length, tabs, hashes)


@njit(cache=True, inline="always")
def _is_this_step(tokens, prev, length, nsamp, base, fd, lo, n):
    accepted = nsamp - 1
    if base != prev or length != base + nsamp or accepted > n:
        return False
    for i in range(accepted):  # noqa: SIM110 (numba compiles loops, not generators)
        if tokens[base + i] != fd[lo + i]:
            return False
    return True


@njit(cache=True)
def _sync(store, meta, rng, jw, jl, acc, fl, tabs, counters, s, tokens, length, nsamp, base, lo,
          hi, fd, fy, grid, hashes):
    """LookaheadDrafter._sync for one row; returns the drafts verified."""
    prev = meta[s, M_COMMITTED]
    verified = 0
    if length < prev or tokens[prev - 1] != meta[s, M_LAST]:
        counters[T_RESYNCS] += 1
        meta[s, M_NGUESS] = 0
        jw[s, J_FLAG, :] = 0
        _rebuild_text(store, meta, counters, s, tokens, length, tabs, hashes)
    else:
        if hi > lo and _is_this_step(tokens, prev, length, nsamp, base, fd, lo, hi - lo):
            verified = hi - lo
            _learn(meta, jw, acc, fl, counters, s, verified, nsamp - 1)
            counters[T_NGRAMS] += _observe(store, meta, counters, rng, jw, jl, s, tabs, tokens,
                                           base, fd, fy, lo, verified, nsamp - 1, grid, hashes)
        elif length != prev + nsamp:
            counters[T_RESYNCS] += 1
        text_extend(store, meta, counters, s, tokens, prev, length, tabs, hashes)
    meta[s, M_ISSUED] = 0
    meta[s, M_COMMITTED] = length
    meta[s, M_LAST] = tokens[length - 1]
    return verified


# --- one step: compose ------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _offer(otok, op, oprim, osrc, okind, orun, noff, token, kind, source, primary, run_node,
           run_j, run_k, run_hits, acc, g, support):
    p = acc[2, g, primary * support]
    for i in range(noff):
        if otok[i] == token:
            okind[i] |= kind
            if p > op[i]:
                op[i] = p
                oprim[i] = primary
                osrc[i] = source
                orun[i, 0], orun[i, 1], orun[i, 2], orun[i, 3] = run_node, run_j, run_k, run_hits
            return noff
    otok[noff] = token
    op[noff] = p
    oprim[noff] = primary
    osrc[noff] = source
    okind[noff] = kind
    orun[noff, 0], orun[noff, 1], orun[noff, 2], orun[noff, 3] = run_node, run_j, run_k, run_hits
    return noff + 1


@njit(cache=True)
def _compose(store, meta, rng, jw, jl, acc, tabs, nsmap, s, tokens, length, out, out_reach, row,
             scratch, hashes, result, otok, op, oprim, osrc, okind, orun, floor):
    """LookaheadDrafter._compose for one row: the chain, its per-token reach, sources and
    features (out[0], out_reach, out[1], out[2]); returns its length. It stops after the first
    token whose reach is below `floor` (no later token could survive the cut)."""
    c, mkl = tabs[C_CONT], tabs[C_MKL]
    support, hits_max, tpool = tabs[C_SUPPORT], tabs[C_HITS], tabs[C_TPOOL]
    g = meta[s, M_GREEDY]
    budget = min(meta[s, M_BUDGET], tabs[C_MAXLEN] - length - 1)
    n = 0
    if budget <= 0:
        return 0  # the reference returns before issuing: the window keeps what it had
    clen = 0
    for i in range(max(0, length - MAX_ORDER), length):
        scratch[clen] = tokens[i]
        clen += 1
    offset = length - meta[s, M_ANCHOR]
    nguess = meta[s, M_NGUESS] - offset if offset >= 0 else 0
    nsid = meta[s, M_NSID]
    ns = nsmap[nsid] if nsid >= 0 else -1
    own = meta[s, M_NOINDEX] == 0
    text = _region(meta, s, R_TEXT)
    index = _region(meta, s, R_INDEX)
    ntext = _region(meta, ns, R_TEXT) if ns >= 0 else text
    nindex = _region(meta, ns, R_INDEX) if ns >= 0 else index
    nprompt = meta[s, M_NPROMPT]
    hbits = meta[s, M_HBITS]
    phash = _region(meta, s, R_PHASH)
    pkeys = _region(meta, s, R_PKEYS)
    nodes = _region(meta, s, R_PNODES)
    kw, nw = mkl + 2, c + 1
    run_node, run_j, run_k, run_hits = -1, 0, 0, 0
    reach = 1.0
    hint_own, hint_shared = meta[s, M_HINT_OWN], meta[s, M_HINT_SHARED]
    while n < budget:
        _suffix_hashes(scratch, clen - 1, min(MAX_ORDER, clen), hashes)
        noff = 0
        if own and _match(text, index, meta, s, scratch, clen, hashes, tabs, result, hint_own):
            hint_own = result[0]
            if n == 0:
                meta[s, M_HINT_OWN] = hint_own
            end = result[1]
            source = S_PROMPT if end + 1 < nprompt else S_OUTPUT
            noff = _offer(otok, op, oprim, osrc, okind, orun, noff, text[end + 1], K_OWN, source,
                          tabs[T_COPY + 2 * result[0] + result[2]], -1, 0, 0, 0, acc, g,
                          support)
        if ns >= 0 and _match(ntext, nindex, meta, ns, scratch, clen, hashes, tabs, result,
                              hint_shared):
            hint_shared = result[0]
            if n == 0:
                meta[s, M_HINT_SHARED] = hint_shared
            noff = _offer(otok, op, oprim, osrc, okind, orun, noff, ntext[result[1] + 1],
                          K_SHARED, S_SHARED,
                          tabs[T_COPY + 2 * NORD_MAX + 2 * result[0] + result[2]], -1, 0, 0, 0,
                          acc, g, support)
        if run_node >= 0:
            nxt = run_node if run_j + 1 < c else -1
            primary = tabs[tpool + (run_k * (hits_max + 1) + min(run_hits, hits_max)) * c
                           + run_j]
            noff = _offer(otok, op, oprim, osrc, okind, orun, noff, nodes[run_node * nw + run_j],
                          K_POOL, S_TRAJ, primary, nxt, run_j + 1, run_k, run_hits, acc, g,
                          support)
        for k in range(min(mkl, clen), 0, -1):
            kid = _find_key(phash, pkeys, hbits, kw, mkl, scratch, clen - 1, k,
                            _key_hash(hashes[k - 1], k))
            if kid < 0:
                continue
            node = pkeys[kid * kw + mkl]
            while node >= 0:
                hits = nodes[node * nw + c] & 255
                nxt = node if c > 1 else -1
                primary = tabs[tpool + (k * (hits_max + 1) + min(hits, hits_max)) * c]
                noff = _offer(otok, op, oprim, osrc, okind, orun, noff, nodes[node * nw],
                              K_POOL, S_TRAJ, primary, nxt, 1, k, hits, acc, g, support)
                node = _next(nodes, node * nw, c)
        if n < nguess:
            guess = jw[s, J_GUESS, offset + n]
            if guess >= 0:
                noff = _offer(otok, op, oprim, osrc, okind, orun, noff, guess, K_JACOBI,
                              S_JACOBI, tabs[T_JAC + n], -1, 0, 0, 0, acc, g, support)
        if noff == 0:
            break
        best, best_p, best_f = -1, 0.0, 0
        for i in range(noff):
            kinds = okind[i]
            agree = (kinds & 1) + ((kinds >> 1) & 1) + ((kinds >> 2) & 1) + ((kinds >> 3) & 1)
            f = oprim[i] * support + min(agree - 1, support - 1)
            p = acc[2, g, f]
            if best < 0 or p > best_p:
                best, best_p, best_f = i, p, f
        reach = reach * best_p
        token = otok[best]
        out[0, row, n] = token
        out[1, row, n] = osrc[best]
        out[2, row, n] = best_f
        out_reach[row, n] = reach
        scratch[clen] = token
        clen += 1
        n += 1
        if reach < floor:
            break
        run_node, run_j, run_k, run_hits = orun[best, 0], orun[best, 1], orun[best, 2], \
            orun[best, 3]
    nfill = meta[s, M_NFILL]
    if n < budget and nfill > 0 and reach >= floor:
        fill = _region(meta, s, R_FILL)
        fill_feat = tabs[C_FILLFEAT]
        p_fill = acc[2, g, fill_feat]
        while n < budget:
            reach = reach * p_fill
            out[0, row, n] = _fill_token(fill, nfill, rng, s)
            out[1, row, n] = S_FILL
            out[2, row, n] = fill_feat
            out_reach[row, n] = reach
            n += 1
            if reach < floor:
                break
    _issue_window(meta, jw, jl, tabs, s, length, out, row, n)
    return n


@njit(cache=True)
def _issue_window(meta, jw, jl, tabs, s, index, out, row, n):
    """JacobiWindow.issue: which chain tokens are the current guesses for their positions."""
    span = tabs[C_LIN]
    jw[s, J_FLAG, :] = 0
    offset = index - meta[s, M_ANCHOR]
    avail = meta[s, M_NGUESS] - max(offset, 0)
    start = max(-offset, 0)
    for pos in range(start, min(n, start + max(avail, 0))):
        gi = pos - start + max(offset, 0)
        if out[0, row, pos] == jw[s, J_GUESS, gi]:
            jw[s, J_FLAG, pos] = 1
            for m in range(span):
                jl[s, J_ISSUED, pos, m] = jl[s, J_LINEAGE, gi, m]


@njit(cache=True)
def _cut(slots, out_len, out_reach, stats, rows, total, step_cost, token_cost):
    """estimator.cut_chains: tokens in decreasing (q, row) order while each pays."""
    q = np.empty(total, dtype=np.float64)
    r = np.empty(total, dtype=np.int64)
    i = 0
    for row in range(slots.shape[0] - 1, -1, -1):  # rows descending: the stable sort keeps it
        for j in range(out_len[row]):
            q[i] = -out_reach[row, j]
            r[i] = row
            i += 1
    order = np.argsort(q, kind="mergesort")
    keep = np.zeros(slots.shape[0], dtype=np.int64)
    expected = float(rows)
    for i in range(total):
        qi = -q[order[i]]
        if qi * step_cost <= token_cost * expected:
            break
        keep[r[order[i]]] += 1
        expected += qi
        step_cost += token_cost
    for row in range(slots.shape[0]):
        if slots[row] >= 0:
            stats[T_CUT] += out_len[row] - keep[row]
            out_len[row] = keep[row]


# --- the step ---------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _prefetch_slot(meta, jw, jl, slots, row):
    """Start loading the per-slot state of the batch's next row while this one is worked on."""
    if row + 1 >= slots.shape[0] or slots[row + 1] < 0:
        return
    s = slots[row + 1]
    for j in range(0, M_FIELDS, 8):
        _prefetch(meta, s * M_FIELDS + j)
    width = jw.shape[1] * jw.shape[2]
    for j in range(0, width, 16):
        _prefetch(jw, s * width + j)
    width = jl.shape[1] * jl.shape[2] * jl.shape[3]
    for j in range(0, width, 16):
        _prefetch(jl, s * width + j)


@njit(cache=True)
def step(st, rowsin, num_tokens, token_ids, tb, tcu, tidx, fd, fy, flags, seconds):
    """One engine step of the whole batch: sync every row (learn from its verified chain), fit the
    step cost (`flags` & 1: this step's time counts), compose every chain, cut the batch
    (`flags` & 2: adaptive) and issue the chains. rowsin[0]: slots (-1: no sample this step),
    rowsin[1]: tokens sampled; row r's drafts are fd/fy[tcu[t] : tcu[t + 1]] with t = tidx[r]
    (t < 0: none), or t = r where tidx is empty; none at all where tcu is empty. Returns the
    chains' total length; `st.flat` holds them end to end."""
    store, meta, rng, jw, jl, acc, fl = st.store, st.meta, st.rng, st.jw, st.jl, st.acc, st.fl
    cost, tabs, nsmap, counters, scratch = st.cost, st.tabs, st.nsmap, st.counters, st.grid
    out, out_len, out_reach, flat = st.out, st.out_len, st.out_reach, st.flat
    slots, nsamp = rowsin[0], rowsin[1]
    batch = slots.shape[0]
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    rows = 0
    verified = 0
    for row in range(batch):
        s = slots[row]
        if s < 0:
            continue
        rows += 1
        _prefetch_slot(meta, jw, jl, slots, row)
        t = -1 if tcu.shape[0] == 0 else row if tidx.shape[0] == 0 else tidx[row]
        base, lo, hi = (tb[t], tcu[t], tcu[t + 1]) if t >= 0 else (0, 0, 0)
        verified += _sync(store, meta, rng, jw, jl, acc, fl, tabs, counters, s, token_ids[row],
                          np.int64(num_tokens[row]), nsamp[row], base, lo, hi, fd, fy, scratch,
                          hashes)
    if flags & 1:
        # Only steps that verified nothing but these chains: a prefill would skew the fit.
        cost_observe(cost, float(rows), float(rows + verified), seconds)
    floor = reach_floor(cost, float(rows)) if flags & 2 else 0.0
    k_max, mkl, g = tabs[C_K], tabs[C_MKL], tabs[C_G]
    ctx = np.empty(MAX_ORDER + k_max + 1, dtype=np.int64)
    result = np.empty(3, dtype=np.int64)
    max_offers = 4 + g * mkl
    otok = np.empty(max_offers, dtype=np.int64)
    op = np.empty(max_offers, dtype=np.float64)
    oprim = np.empty(max_offers, dtype=np.int64)
    osrc = np.empty(max_offers, dtype=np.int64)
    okind = np.empty(max_offers, dtype=np.int64)
    orun = np.empty((max_offers, 4), dtype=np.int64)
    total = 0
    for row in range(batch):
        s = slots[row]
        out_len[row] = 0
        if s < 0:
            continue
        _prefetch_slot(meta, jw, jl, slots, row)
        n = _compose(store, meta, rng, jw, jl, acc, tabs, nsmap, s, token_ids[row],
                     np.int64(num_tokens[row]), out, out_reach, row, ctx, hashes, result, otok,
                     op, oprim, osrc, okind, orun, floor)
        out_len[row] = n
        total += n
    if flags & 2 and rows > 0:
        _cut(slots, out_len, out_reach, counters, rows, total,
             cost_predict(cost, float(rows), float(rows)), cost[CS_THETA + 2])
    total = 0
    for row in range(batch):
        s = slots[row]
        if s < 0:
            continue
        n = out_len[row]
        if n > 0:
            counters[T_CHAINS] += 1
        counters[T_DRAFT] += n
        meta[s, M_ISSUED] = n
        for i in range(n):
            jw[s, J_SRC, i] = out[1, row, i]
            jw[s, J_FEAT, i] = out[2, row, i]
            counters[T_DRAFTED + out[1, row, i]] += 1
            flat[total] = out[0, row, i]
            total += 1
    return total


@njit(cache=True)
def match_context(store, meta, s, ctx, tabs):
    """The longest indexed suffix of ctx in slot s's text as (length, end, consistent), or
    (0, -1, 0): `ContextIndex.match` from Python, for tests."""
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    result = np.zeros(3, dtype=np.int64)
    clen = ctx.shape[0]
    _suffix_hashes(ctx, clen - 1, min(MAX_ORDER, clen), hashes)
    if _match(_region(meta, s, R_TEXT), _region(meta, s, R_INDEX), meta, s, ctx, clen, hashes,
              tabs, result, 0):
        return tabs[T_ORD + result[0]], result[1], result[2]
    return 0, -1, 0
