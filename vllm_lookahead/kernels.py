"""The compiled drafter's per-step work (numba): text indexes, trajectory pools, Jacobi windows,
chain composition and the batch-wide cut, over flat arrays.

Everything a request owns lives in one engine-wide *store*: a numba typed list of int32 arrays,
`NREG` regions per slot (slot `s`, region `r` at `store[s * NREG + r]`), grown inside the
kernels. One typed list, not one per region: the dispatcher unboxes each typed-list argument
in about 2 µs, an array in about 0.15 µs. Fixed-size per-slot state sits in 2-D arrays indexed by
slot (`meta`, `jw`, `jl`, `rng`). Namespace slots hold a shared corpus (text and index only).

Exactness: every function mirrors the reference (`reference_drafter.py` and its modules) step for
step, including float arithmetic (decay powers are precomputed in Python, the step cost comes from
the Python cost model), tie-breaking and LRU order, so that both produce identical chains.

Text index layout (one open-addressing table per order): an entry is `end + 1` of the latest
occurrence (bits 0-29) with bit 30 set once two occurrences continued differently. No key is
stored: a hit is verified by reading the text at the stored end, and the old successor is
`text[end + 1]`. The reference's occurrence count is never used by a draft, so it is not kept.

Pool layout: a hash table (key id + 1) over key records and continuation nodes (below); each key's
nodes form a list, most recently refreshed first (the reference's LRU order reversed), evicting
the tail.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.typed import List

SEP = -1
INCONS = np.int32(1 << 30)
EMASK = np.int32((1 << 30) - 1)
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
M_NOINDEX = 19  # 1: the text index was evicted (memory budget); own-text matching is off
M_TBITS = 20  # .. + NORD_MAX: bits of each order's table
M_TCOUNT = M_TBITS + NORD_MAX  # .. + NORD_MAX: entries in each order's table
M_TOFF = M_TCOUNT + NORD_MAX  # .. + NORD_MAX: where each order's table starts in the region
M_HINT_OWN = M_TOFF + NORD_MAX  # the order that matched at the last step's first position
M_HINT_SHARED = M_HINT_OWN + 1
M_FIELDS = M_HINT_SHARED + 1

# jw[slot, plane, pos] planes.
J_GUESS = 0
J_FLAG = 1
J_SRC = 2
J_FEAT = 3
# jl[slot, plane, pos, :] planes.
J_LINEAGE = 0
J_ISSUED = 1

# cfg[] fields.
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
C_FIELDS = 10

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
T_FIELDS = 20

_U1 = np.uint64(1)
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


# --- hashing ----------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _bucket(h, bits):
    h = h ^ (h >> np.uint64(31))
    h = h * _MIX
    return np.int64(h >> np.uint64(64 - bits))


@njit(cache=True)
def _suffix_hashes(buf, end, n, out):
    """out[m]: hash of buf[end-m .. end] (m+1 tokens), for m < n."""
    h = np.uint64(0)
    for m in range(n):
        h += np.uint64(np.int64(buf[end - m]) + 1) * POW[m]
        out[m] = h


# --- store bookkeeping ------------------------------------------------------------------------


@njit(cache=True)
def _alloc(store, meta, totals, s, r, n):
    """A zeroed region of n int32 for slot s, replacing (and freeing) the old one."""
    old = store[s * NREG + r]
    new = np.zeros(n, dtype=np.int32)
    delta = 4 * (n - old.shape[0])
    meta[s, M_BYTES] += delta
    totals[0] += delta
    store[s * NREG + r] = new
    return new


@njit(cache=True)
def _grow(store, meta, totals, s, r, need):
    """Region r of slot s with room for `need` int32, its content kept (grown by half)."""
    old = store[s * NREG + r]
    if old.shape[0] >= need:
        return old
    cap = max(16, old.shape[0])
    while cap < need:
        cap += cap // 2
    new = _alloc(store, meta, totals, s, r, cap)
    new[:old.shape[0]] = old
    return new


@njit(cache=True)
def free_slot(store, meta, totals, s):
    for r in range(NREG):
        totals[0] -= 4 * store[s * NREG + r].shape[0]
        store[s * NREG + r] = np.zeros(0, dtype=np.int32)
    meta[s, :] = 0


@njit(cache=True)
def set_region(store, meta, totals, s, r, values):
    region = _alloc(store, meta, totals, s, r, values.shape[0])
    for i in range(values.shape[0]):
        region[i] = values[i]


# --- the text index (ContextIndex) ------------------------------------------------------------


@njit(cache=True)
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


@njit(cache=True)
def _reserve_index(store, meta, totals, s, extra, orders, nord):
    """Room for `extra` more keys in every order's table (load at most 1/2): the region is
    rebuilt with larger tables where needed, entries rehashed from the text they point to."""
    grow = False
    for o in range(nord):
        bits = meta[s, M_TBITS + o]
        if bits == 0 or 2 * (meta[s, M_TCOUNT + o] + extra) > (1 << bits):
            grow = True
    if not grow:
        return
    old = store[s * NREG + R_INDEX]
    text = store[s * NREG + R_TEXT]
    old_off = meta[s, M_TOFF:M_TOFF + nord].copy()
    old_bits = meta[s, M_TBITS:M_TBITS + nord].copy()
    size = 0
    for o in range(nord):
        bits = max(old_bits[o], 4)
        while 2 * (meta[s, M_TCOUNT + o] + extra) > (1 << bits):
            bits += 1
        meta[s, M_TBITS + o] = bits
        meta[s, M_TOFF + o] = size
        size += 1 << bits
    table = _alloc(store, meta, totals, s, R_INDEX, size)
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    for o in range(nord):
        k, off, bits = orders[o], meta[s, M_TOFF + o], meta[s, M_TBITS + o]
        if old_bits[o] == bits:
            table[off:off + (1 << bits)] = old[old_off[o]:old_off[o] + (1 << bits)]
            continue
        for i in range(old_off[o], old_off[o] + (1 << old_bits[o]) if old_bits[o] else 0):
            v = old[i]
            if v != 0:
                _suffix_hashes(text, (v & EMASK) - 1, k, hashes)
                _table_insert_new(table, off, bits, hashes[k - 1], v)


@njit(cache=True)
def _index_end(text, table, meta, s, e, orders, nord, hashes):
    """ContextIndex.extend for one end position: every order's k-gram ending at e, with the
    successor text[e+1]; the latest occurrence wins, differing successors mark it inconsistent."""
    succ = text[e + 1]
    if succ == SEP:
        return
    _suffix_hashes(text, e, min(MAX_ORDER, e + 1), hashes)
    fresh = False  # a shorter suffix was new here: so is every longer one, no compare needed
    known_end, known_len = -1, 0  # the latest occurrence of the last order that matched
    for o in range(nord):
        k = orders[o]
        if k > e + 1 or text[e - k + 1] == SEP:
            break
        off, bits = meta[s, M_TOFF + o], meta[s, M_TBITS + o]
        mask = (1 << bits) - 1
        i = _bucket(hashes[k - 1], bits)
        while True:
            v = table[off + i]
            if v == 0:
                table[off + i] = e + 1
                meta[s, M_TCOUNT + o] += 1
                fresh = True
                break
            if not fresh:
                old = (v & EMASK) - 1
                # Where the shorter key matched at this very end, its tokens need no compare.
                skip = known_len if old == known_end else 0
                if _same_key(text, old - skip, e - skip, k - skip):
                    inc = v & INCONS
                    if text[old + 1] != succ:
                        inc = INCONS
                    table[off + i] = (max(old, e) + 1) | inc
                    known_end, known_len = old, k
                    break
            i = (i + 1) & mask


@njit(cache=True)
def index_range(store, meta, totals, s, lo, hi, orders, nord):
    if hi <= lo:
        return
    _reserve_index(store, meta, totals, s, hi - lo, orders, nord)
    text = store[s * NREG + R_TEXT]
    table = store[s * NREG + R_INDEX]
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    for e in range(lo, hi):
        _index_end(text, table, meta, s, e, orders, nord, hashes)
    if hi > meta[s, M_INDEXED]:
        meta[s, M_INDEXED] = hi


@njit(cache=True)
def text_extend(store, meta, totals, s, tokens, lo, hi, orders, nord):
    """Append tokens[lo:hi] to slot s's text and index every end whose successor is now known."""
    n = meta[s, M_TEXT_LEN]
    text = _grow(store, meta, totals, s, R_TEXT, n + hi - lo)
    for i in range(lo, hi):
        text[n + i - lo] = tokens[i]
    meta[s, M_TEXT_LEN] = n + hi - lo
    if meta[s, M_NOINDEX] == 0:
        index_range(store, meta, totals, s, max(n - 1, 0), n + hi - lo - 1, orders, nord)


@njit(cache=True)
def clear_index(store, meta, totals, s, nord):
    _alloc(store, meta, totals, s, R_INDEX, 0)
    for o in range(nord):
        meta[s, M_TBITS + o] = 0
        meta[s, M_TCOUNT + o] = 0
        meta[s, M_TOFF + o] = 0
    meta[s, M_INDEXED] = 0


@njit(cache=True)
def _lookup(text, table, off, bits, k, ctx, clen, h):
    """The entry of order k whose key is ctx's last k tokens, or 0."""
    if bits == 0:
        return 0
    mask = (1 << bits) - 1
    i = _bucket(h, bits)
    while True:
        v = table[off + i]
        if v == 0:
            return 0
        end = (v & EMASK) - 1
        same = True
        for m in range(k):
            if text[end - m] != ctx[clen - 1 - m]:
                same = False
                break
        if same:
            return v
        i = (i + 1) & mask


@njit(cache=True)
def _match(store, meta, s, ctx, clen, hashes, orders, nord, result, hint):
    """ContextIndex.match: the longest order whose suffix of ctx is indexed. result = (order
    index, end, consistent); returns False if nothing matched. If order k's suffix is indexed, so
    are all shorter ones, so a search that starts at `hint` (the order that matched last) and
    walks up or down finds what the reference's binary search finds, in fewer lookups: a chain
    extends its context one token at a time, and the match length moves little."""
    text = store[s * NREG + R_TEXT]
    table = store[s * NREG + R_INDEX]
    n = 0
    while n < nord and orders[n] <= clen:
        n += 1
    if n == 0:
        return False
    j = min(max(hint, 0), n - 1)
    v = _lookup(text, table, meta[s, M_TOFF + j], meta[s, M_TBITS + j], orders[j], ctx, clen,
                hashes[orders[j] - 1])
    if v == 0:
        while j > 0 and v == 0:
            j -= 1
            v = _lookup(text, table, meta[s, M_TOFF + j], meta[s, M_TBITS + j], orders[j], ctx,
                        clen, hashes[orders[j] - 1])
        if v == 0:
            return False
    else:
        while j + 1 < n:
            k = orders[j + 1]
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


@njit(cache=True)
def _key_hash(h, klen):
    return h ^ (np.uint64(klen) * _KEYLEN_MIX)


# A key record is [tokens (mkl), head node, len << 16 | count]; a node is [tokens (N-1),
# (next + 1) << 8 | hits], hits saturating at 255 (features read at most _HITS_TABLE of them).
# Packed so that a stored continuation costs 16 bytes at N = 4 (N-1 tokens and one link).
HITS_MAX = 255
MAX_NODES = (1 << 23) - 2


@njit(cache=True, inline="always")
def _next(nodes, nb, c):
    return (nodes[nb + c] >> 8) - 1


@njit(cache=True, inline="always")
def _set_next(nodes, nb, c, nxt):
    nodes[nb + c] = ((nxt + 1) << 8) | (nodes[nb + c] & 255)


@njit(cache=True)
def _find_key(phash, pkeys, hbits, kw, mkl, buf, end, klen, h):
    """Key id of buf[end-klen+1 .. end], or -1 - (empty slot) if absent."""
    if hbits == 0:
        return -1
    mask = (1 << hbits) - 1
    i = _bucket(h, hbits)
    while True:
        v = phash[i]
        if v == 0:
            return -1 - i
        kb = (v - 1) * kw
        if pkeys[kb + mkl + 1] >> 16 == klen:
            same = True
            for m in range(klen):
                if pkeys[kb + klen - 1 - m] != buf[end - m]:
                    same = False
                    break
            if same:
                return v - 1
        i = (i + 1) & mask


@njit(cache=True)
def _new_key(store, meta, totals, s, cfg, buf, end, klen, h):
    mkl = cfg[C_MKL]
    kw = mkl + 2
    nkeys = meta[s, M_NKEYS]
    hbits = meta[s, M_HBITS]
    if hbits == 0 or 2 * (nkeys + 1) > (1 << hbits):
        nbits = max(hbits + 1, 4)
        phash = _alloc(store, meta, totals, s, R_PHASH, 1 << nbits)
        pkeys = store[s * NREG + R_PKEYS]
        hashes = np.empty(MAX_ORDER, dtype=np.uint64)
        for kid in range(nkeys):
            kb = kid * kw
            kl = pkeys[kb + mkl + 1] >> 16
            _suffix_hashes(pkeys, kb + kl - 1, kl, hashes)
            _table_insert_new(phash, 0, nbits, _key_hash(hashes[kl - 1], kl), kid + 1)
        meta[s, M_HBITS] = nbits
        hbits = nbits
    pkeys = _grow(store, meta, totals, s, R_PKEYS, (nkeys + 1) * kw)
    kb = nkeys * kw
    for m in range(klen):
        pkeys[kb + m] = buf[end - klen + 1 + m]
    pkeys[kb + mkl] = -1
    pkeys[kb + mkl + 1] = klen << 16
    _table_insert_new(store[s * NREG + R_PHASH], 0, hbits, h, nkeys + 1)
    meta[s, M_NKEYS] = nkeys + 1
    return nkeys


@njit(cache=True)
def _same_cont(nodes, nb, buf, at, c):
    for m in range(c):  # noqa: SIM110 (numba compiles loops, not generators)
        if nodes[nb + m] != buf[at + m]:
            return False
    return True


@njit(cache=True)
def _pool_insert(store, meta, totals, s, cfg, buf, end, klen, h, cont_at):
    """NGramPool._insert of continuation buf[cont_at : cont_at+N-1] under key buf[..end]."""
    mkl, c, g = cfg[C_MKL], cfg[C_CONT], cfg[C_G]
    kw, nw = mkl + 2, c + 1
    kid = _find_key(store[s * NREG + R_PHASH], store[s * NREG + R_PKEYS], meta[s, M_HBITS], kw,
                    mkl, buf, end, klen, h)
    if kid < 0:
        kid = _new_key(store, meta, totals, s, cfg, buf, end, klen, h)
    pkeys = store[s * NREG + R_PKEYS]
    kb = kid * kw
    nodes = store[s * NREG + R_PNODES]
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
        return
    count = pkeys[kb + mkl + 1] & 0xFFFF
    if count >= g or meta[s, M_NNODES] >= MAX_NODES:
        # Full: the tail (least recently refreshed) makes room.
        node = prev
        if node < 0:
            return  # a new key in a pool at MAX_NODES: nothing to reuse
        if last_prev >= 0:
            _set_next(nodes, last_prev * nw, c, -1)
            _set_next(nodes, node * nw, c, pkeys[kb + mkl])
            pkeys[kb + mkl] = node
    else:
        n = meta[s, M_NNODES]
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


@njit(cache=True)
def _fill_token(store, meta, rng, s):
    """JacobiWindow.random_fill, one token (callers check that there are fill tokens)."""
    state, value = _splitmix(rng[s])
    rng[s] = state
    fill = store[s * NREG + R_FILL]
    return fill[np.int64(value % np.uint64(meta[s, M_NFILL]))]


@njit(cache=True)
def _is_stop(store, meta, s, token):
    stops = store[s * NREG + R_STOPS]
    for i in range(meta[s, M_NSTOPS]):  # noqa: SIM110 (numba compiles loops, not generators)
        if stops[i] == token:
            return True
    return False


@njit(cache=True)
def _observe(store, meta, totals, rng, jw, jl, s, cfg, tokens, base, fd, fy, lo, n, accepted,
             grid, hashes):
    """JacobiWindow.observe followed by NGramPool.add of its harvest; returns the n-grams."""
    span, mkl = cfg[C_LIN], cfg[C_MKL]
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
    for r in range(rows):
        guess = grid[r, span + 1]
        stop = _is_stop(store, meta, s, guess)
        if stop and meta[s, M_NFILL] == 0:
            kept = r
            break
        if stop:
            jw[s, J_GUESS, r] = _fill_token(store, meta, rng, s)
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
            _pool_insert(store, meta, totals, s, cfg, row, mkl - 1, k,
                         _key_hash(hashes[k - 1], k), mkl)
    return harvested


# --- the acceptance model ---------------------------------------------------------------------


@njit(cache=True)
def _learn(meta, jw, acc, dpow, floor, stats, s, verified, accepted):
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
    decay = dpow[touched]
    for i in range(touched):
        f = jw[s, J_FEAT, i]
        acc[0, g, f] *= decay
        acc[1, g, f] = max(acc[1, g, f] * decay, floor)
        acc[1, g, f] += 1.0
        if i < accepted:
            acc[0, g, f] += 1.0
        acc[2, g, f] = min(acc[0, g, f] / acc[1, g, f], 0.999)


# --- one step: sync ---------------------------------------------------------------------------


@njit(cache=True)
def _rebuild_text(store, meta, totals, s, tokens, length, orders, nord):
    """LookaheadDrafter._rebuild_text: the prompt as stored, then the committed tokens."""
    keep = min(meta[s, M_NPROMPT], length, meta[s, M_TEXT_LEN])
    meta[s, M_TEXT_LEN] = keep
    if meta[s, M_NOINDEX] == 0:
        clear_index(store, meta, totals, s, nord)
        index_range(store, meta, totals, s, 0, max(keep - 1, 0), orders, nord)
    text_extend(store, meta, totals, s, tokens, keep, length, orders, nord)


@njit(cache=True)
def _is_this_step(tokens, prev, length, nsamp, base, fd, lo, n):
    accepted = nsamp - 1
    if base != prev or length != base + nsamp or accepted > n:
        return False
    for i in range(accepted):  # noqa: SIM110 (numba compiles loops, not generators)
        if tokens[base + i] != fd[lo + i]:
            return False
    return True


@njit(cache=True)
def sync_batch(store, meta, totals, rng, jw, jl, acc, dpow, floor, cfg, orders, stats,
               slots, nsamp, num_tokens, token_ids, tinfo, fd, fy):
    """LookaheadDrafter._sync for every row with a slot; returns the drafts verified."""
    nord = cfg[C_NORD]
    grid = np.empty((cfg[C_K] + 1, cfg[C_LIN] + 2), dtype=np.int64)
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    verified_total = 0
    for row in range(slots.shape[0]):
        s = slots[row]
        if s < 0:
            continue
        tokens = token_ids[row]
        length = np.int64(num_tokens[row])
        prev = meta[s, M_COMMITTED]
        if length < prev or tokens[prev - 1] != meta[s, M_LAST]:
            stats[T_RESYNCS] += 1
            meta[s, M_NGUESS] = 0
            jw[s, J_FLAG, :] = 0
            _rebuild_text(store, meta, totals, s, tokens, length, orders, nord)
        else:
            base, lo, hi = tinfo[row, 0], tinfo[row, 1], tinfo[row, 2]
            if hi > lo and _is_this_step(tokens, prev, length, nsamp[row], base, fd, lo,
                                         hi - lo):
                verified = hi - lo
                verified_total += verified
                _learn(meta, jw, acc, dpow, floor, stats, s, verified, nsamp[row] - 1)
                stats[T_NGRAMS] += _observe(store, meta, totals, rng, jw, jl, s, cfg, tokens,
                                            base, fd, fy, lo, verified, nsamp[row] - 1, grid,
                                            hashes)
            elif length != prev + nsamp[row]:
                stats[T_RESYNCS] += 1
            text_extend(store, meta, totals, s, tokens, prev, length, orders, nord)
        meta[s, M_ISSUED] = 0
        meta[s, M_COMMITTED] = length
        meta[s, M_LAST] = tokens[length - 1]
    return verified_total


# --- one step: compose ------------------------------------------------------------------------


@njit(cache=True)
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
def _compose(store, meta, rng, jw, jl, acc, cfg, orders, copy_prim, pool_prim, jac_prim, nsmap,
             s, tokens, length, out_tok, out_reach, out_src, out_feat, row, scratch, hashes,
             result, otok, op, oprim, osrc, okind, orun):
    """LookaheadDrafter._compose for one row: the chain, its per-token reach, sources and
    features; returns its length."""
    c, mkl = cfg[C_CONT], cfg[C_MKL]
    support, nord, hits_max = cfg[C_SUPPORT], cfg[C_NORD], cfg[C_HITS]
    g = meta[s, M_GREEDY]
    budget = min(meta[s, M_BUDGET], cfg[C_MAXLEN] - length - 1)
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
    text = store[s * NREG + R_TEXT]
    nprompt = meta[s, M_NPROMPT]
    phash = store[s * NREG + R_PHASH]
    pkeys = store[s * NREG + R_PKEYS]
    nodes = store[s * NREG + R_PNODES]
    hbits = meta[s, M_HBITS]
    kw, nw = mkl + 2, c + 1
    run_node, run_j, run_k, run_hits = -1, 0, 0, 0
    reach = 1.0
    hint_own, hint_shared = meta[s, M_HINT_OWN], meta[s, M_HINT_SHARED]
    while n < budget:
        _suffix_hashes(scratch, clen - 1, min(MAX_ORDER, clen), hashes)
        noff = 0
        if own and _match(store, meta, s, scratch, clen, hashes, orders, nord, result,
                          hint_own):
            hint_own = result[0]
            if n == 0:
                meta[s, M_HINT_OWN] = hint_own
            end = result[1]
            source = S_PROMPT if end + 1 < nprompt else S_OUTPUT
            noff = _offer(otok, op, oprim, osrc, okind, orun, noff, text[end + 1], K_OWN, source,
                          copy_prim[0, result[0], result[2]], -1, 0, 0, 0, acc, g, support)
        if ns >= 0 and _match(store, meta, ns, scratch, clen, hashes, orders, nord, result,
                              hint_shared):
            hint_shared = result[0]
            if n == 0:
                meta[s, M_HINT_SHARED] = hint_shared
            ntext = store[ns * NREG + R_TEXT]
            noff = _offer(otok, op, oprim, osrc, okind, orun, noff, ntext[result[1] + 1],
                          K_SHARED, S_SHARED, copy_prim[1, result[0], result[2]], -1, 0, 0, 0,
                          acc, g, support)
        if run_node >= 0:
            nxt = run_node if run_j + 1 < c else -1
            noff = _offer(otok, op, oprim, osrc, okind, orun, noff, nodes[run_node * nw + run_j],
                          K_POOL, S_TRAJ, pool_prim[run_k, min(run_hits, hits_max), run_j], nxt,
                          run_j + 1, run_k, run_hits, acc, g, support)
        for k in range(min(mkl, clen), 0, -1):
            kid = _find_key(phash, pkeys, hbits, kw, mkl, scratch, clen - 1, k,
                            _key_hash(hashes[k - 1], k))
            if kid < 0:
                continue
            node = pkeys[kid * kw + mkl]
            while node >= 0:
                hits = nodes[node * nw + c] & 255
                nxt = node if c > 1 else -1
                noff = _offer(otok, op, oprim, osrc, okind, orun, noff, nodes[node * nw],
                              K_POOL, S_TRAJ, pool_prim[k, min(hits, hits_max), 0], nxt, 1, k,
                              hits, acc, g, support)
                node = _next(nodes, node * nw, c)
        if n < nguess:
            guess = jw[s, J_GUESS, offset + n]
            if guess >= 0:
                noff = _offer(otok, op, oprim, osrc, okind, orun, noff, guess, K_JACOBI,
                              S_JACOBI, jac_prim[n], -1, 0, 0, 0, acc, g, support)
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
        out_tok[row, n] = token
        out_reach[row, n] = reach
        out_src[row, n] = osrc[best]
        out_feat[row, n] = best_f
        scratch[clen] = token
        clen += 1
        n += 1
        run_node, run_j, run_k, run_hits = orun[best, 0], orun[best, 1], orun[best, 2], \
            orun[best, 3]
    if n < budget and meta[s, M_NFILL] > 0:
        fill_feat = cfg[C_FILLFEAT]
        p_fill = acc[2, g, fill_feat]
        while n < budget:
            reach = reach * p_fill
            out_tok[row, n] = _fill_token(store, meta, rng, s)
            out_reach[row, n] = reach
            out_src[row, n] = S_FILL
            out_feat[row, n] = fill_feat
            n += 1
    _issue_window(meta, jw, jl, cfg, s, length, out_tok, row, n)
    return n


@njit(cache=True)
def _issue_window(meta, jw, jl, cfg, s, index, out_tok, row, n):
    """JacobiWindow.issue: which chain tokens are the current guesses for their positions."""
    span = cfg[C_LIN]
    jw[s, J_FLAG, :] = 0
    offset = index - meta[s, M_ANCHOR]
    avail = meta[s, M_NGUESS] - max(offset, 0)
    start = max(-offset, 0)
    for pos in range(start, min(n, start + max(avail, 0))):
        gi = pos - start + max(offset, 0)
        if out_tok[row, pos] == jw[s, J_GUESS, gi]:
            jw[s, J_FLAG, pos] = 1
            for m in range(span):
                jl[s, J_ISSUED, pos, m] = jl[s, J_LINEAGE, gi, m]


@njit(cache=True)
def compose_batch(store, meta, rng, jw, jl, acc, cfg, orders, copy_prim, pool_prim, jac_prim,
                  nsmap, stats, slots, num_tokens, token_ids, out_tok, out_len, out_reach,
                  out_src, out_feat, adaptive, step_cost, token_cost):
    """Compose every row's chain, cut the batch (`estimator.cut_chains`), issue the chains."""
    k_max, mkl, g = cfg[C_K], cfg[C_MKL], cfg[C_G]
    scratch = np.empty(MAX_ORDER + k_max + 1, dtype=np.int64)
    hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    result = np.empty(3, dtype=np.int64)
    max_offers = 4 + g * mkl
    otok = np.empty(max_offers, dtype=np.int64)
    op = np.empty(max_offers, dtype=np.float64)
    oprim = np.empty(max_offers, dtype=np.int64)
    osrc = np.empty(max_offers, dtype=np.int64)
    okind = np.empty(max_offers, dtype=np.int64)
    orun = np.empty((max_offers, 4), dtype=np.int64)
    rows = 0
    total = 0
    for row in range(slots.shape[0]):
        s = slots[row]
        out_len[row] = 0
        if s < 0:
            continue
        rows += 1
        n = _compose(store, meta, rng, jw, jl, acc, cfg, orders, copy_prim, pool_prim, jac_prim,
                     nsmap, s, token_ids[row], np.int64(num_tokens[row]), out_tok, out_reach,
                     out_src, out_feat, row, scratch, hashes, result, otok, op, oprim, osrc,
                     okind, orun)
        out_len[row] = n
        total += n
    if adaptive and rows > 0:
        _cut(slots, out_len, out_reach, stats, rows, total, step_cost, token_cost)
    for row in range(slots.shape[0]):
        s = slots[row]
        if s < 0:
            continue
        n = out_len[row]
        stats[T_CHAINS] += 1
        stats[T_DRAFT] += n
        meta[s, M_ISSUED] = n
        for i in range(n):
            jw[s, J_SRC, i] = out_src[row, i]
            jw[s, J_FEAT, i] = out_feat[row, i]
            stats[T_DRAFTED + out_src[row, i]] += 1
    return rows


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
