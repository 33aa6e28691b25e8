"""Chain composition and the cost cut: which draft tokens each request verifies next (compiled).

vLLM verifies one linear chain per request, so the lookahead branch and LADE's G candidates fold
into choosing one chain, token by token (`compose`):

1. **Bids.** At each chain position the sources bid: the request's own text (prompt and output)
   and its namespace's shared corpus, each with the token after the longest earlier occurrence of
   the context's end (`context_index.match`); the trajectory pool, with every continuation stored
   under the context's last tokens, and the n-gram the chain is already following; the Jacobi
   guess for that position. Each bid is priced by the acceptance model from its evidence and from
   how many kinds of source propose the same token, and the likeliest wins; a pool n-gram is then
   followed, since its tokens were predicted one after another.
2. **Padding.** Once nobody bids, seeded prompt tokens (LADE's window start) fill the rest, up to
   the request's budget.
3. **The cut.** With `adaptive` on (the CPU default), the batch keeps only the draft tokens whose
   probability of being reached and accepted pays for verifying them (`cut`, with `step_cost`);
   composing stops once a token's reach is below what the cut could ever keep. Off (GPUs), every
   chain is its full length, so that CUDA graphs cover the batch.

The plain-Python specification is `reference.drafter.ReferenceDrafter._compose` and
`reference.chain.cut_chains`.
"""

from __future__ import annotations

import numpy as np
from numba import from_dtype, types
from numba.experimental import structref

from vllm_lookahead import context_index, jacobi_window, ngram_cache
from vllm_lookahead.acceptance import calibrated
from vllm_lookahead.compiled import (
    F64_2D,
    I32,
    I32_2D,
    I64,
    RecordType,
    borrowed,
    define_record,
    jitable,
    kernel,
)
from vllm_lookahead.counters import Source
from vllm_lookahead.hashing import MAX_ORDER, suffix_hashes
from vllm_lookahead.request_state import RequestState

OWN_TEXT, SHARED_TEXT, POOL, JACOBI = 1, 2, 4, 8
"""Kinds of source, as bits: a token's support is how many kinds propose it."""
INDEPENDENT_REACH_FLOOR = 0.5
"""Where an independent (seeded) request's chain ends when chains are cut: a fixed reach, since
the cut's own threshold follows the load and the measured step times. About the cut's threshold
at sixteen requests in flight on the CPU prior (`step_cost.CPU_STEP_COST_PRIOR`): a seeded
request then drafts little that would not pay in a loaded batch (`benchmarks.seeded_cost`)."""


class ChainSettingsType(RecordType):
    pass


class ChainSettings(structref.StructRefProxy):
    """What composing needs besides the request: limits and the acceptance features."""


CHAIN_SETTINGS = define_record(ChainSettingsType, ChainSettings, [
    ("max_model_len", types.int64),
    ("adaptive", types.boolean),
    ("support_levels", types.int64),  # support counts up to this many other kinds
    ("fill_feature", types.int64),
    ("max_hits", types.int64),  # hits beyond this are priced as this many
    ("copy_primary", types.int64[:, :, ::1]),  # [shared, order, consistent]
    ("pool_primary", types.int64[:, :, ::1]),  # [key length, hits, position in the n-gram]
    ("jacobi_primary", I64),  # [chain position]
])


@kernel
def new_settings(max_model_len: int, adaptive: bool, support_levels: int, fill_feature: int,
                 copy_primary: np.ndarray, pool_primary: np.ndarray,
                 jacobi_primary: np.ndarray) -> ChainSettings:
    settings = structref.new(CHAIN_SETTINGS)
    settings.max_model_len, settings.adaptive = max_model_len, adaptive
    settings.support_levels, settings.fill_feature = support_levels, fill_feature
    settings.max_hits = pool_primary.shape[1] - 1
    settings.copy_primary = copy_primary
    settings.pool_primary = pool_primary
    settings.jacobi_primary = jacobi_primary
    return settings


class ChainsType(RecordType):
    pass


class Chains(structref.StructRefProxy):
    """The step's chains, one row per batch row (Python keeps the arrays it built them from)."""


CHAINS = define_record(ChainsType, Chains, [
    ("tokens", I32_2D),  # [row, position]
    ("sources", I32_2D),  # `Source`
    ("features", I32_2D),  # the acceptance feature each token was priced by
    ("reach", F64_2D),  # P(the chain is accepted up to and including this token)
    ("length", I32),  # [row]
    ("independent", types.boolean[::1]),  # [row]: kept whole by the cut (a seeded request)
    ("flat", I32),  # every row's chain, end to end (what Python turns into lists)
])


@kernel
def new_chains(tokens: np.ndarray, sources: np.ndarray, features: np.ndarray,
               reach: np.ndarray, length: np.ndarray, flat: np.ndarray) -> Chains:
    chains = structref.new(CHAINS)
    chains.tokens, chains.sources, chains.features = tokens, sources, features
    chains.reach, chains.length, chains.flat = reach, length, flat
    chains.independent = np.zeros(length.shape[0], dtype=np.bool_)
    return chains


BID = np.dtype([
    ("token", np.int64),
    ("p", np.float64),  # the best single source's price of the token ...
    ("primary", np.int64),  # ... its primary feature ...
    ("source", np.int64),  # ... and its `Source`
    ("kinds", np.int64),  # every kind of source that bid the token (bits)
    ("run_node", np.int64),  # the pool n-gram the chain follows if the token wins (-1: none) ...
    ("run_position", np.int64),  # ... the position of the next token in it ...
    ("run_key_len", np.int64),  # ... the length of the key it was found under ...
    ("run_hits", np.int64),  # ... and its hits
], align=True)
"""A token bid for one chain position."""


class BidsType(RecordType):
    pass


class Bids(structref.StructRefProxy):
    """Scratch of `compose`: the tokens bid for one position, and the context."""


BIDS = define_record(BidsType, Bids, [
    ("items", types.Array(from_dtype(BID), 1, "C")),
    ("context", I64),  # the chain's context: the text's last tokens, then the chain
    ("hashes", types.uint64[::1]),  # suffix hashes of the context
])


@kernel
def new_bids(max_bids: int, max_chain: int) -> Bids:
    bids = structref.new(BIDS)
    bids.items = np.empty(max_bids, dtype=BID)
    bids.context = np.empty(MAX_ORDER + max_chain + 1, dtype=np.int64)
    bids.hashes = np.empty(MAX_ORDER, dtype=np.uint64)
    return bids


@kernel(inline=True)
def _bid(items: np.ndarray, count: int, p_of: np.ndarray, support: int, token: int, kind: int,
         source: int, primary: int, run_node: int, run_position: int, run_key_len: int,
         run_hits: int) -> int:
    """One source bids `token` (`items[:count]` are the bids so far; returns their new count):
    priced alone by its primary feature; a token already bid keeps the best single price and
    gathers the kinds of source that bid it."""
    p = p_of[primary * support]
    for i in range(count):
        bid = items[i]
        if bid.token == token:
            bid.kinds |= kind
            if p > bid.p:
                bid.p, bid.primary, bid.source = p, primary, source
                bid.run_node, bid.run_position = run_node, run_position
                bid.run_key_len, bid.run_hits = run_key_len, run_hits
            return count
    bid = items[count]
    bid.token, bid.p, bid.primary, bid.source, bid.kinds = token, p, primary, source, kind
    bid.run_node, bid.run_position = run_node, run_position
    bid.run_key_len, bid.run_hits = run_key_len, run_hits
    return count + 1


@kernel(inline=True)
def _kinds_agreeing(kinds: int) -> int:
    return (kinds & 1) + ((kinds >> 1) & 1) + ((kinds >> 2) & 1) + ((kinds >> 3) & 1)


@jitable
def chain_limit(request_budget, max_model_len, stops_masked_until, length):  # type: ignore[no-untyped-def]
    """The most draft tokens a request with `length` committed tokens may be issued: its own
    budget, never past max_model_len, and, while `min_tokens` masks its stop tokens, short enough
    that the bonus token after the chain falls where the mask has ended. vLLM masks a chain's
    draft positions by their place but samples the bonus token with the mask of the step's start,
    so a whole chain accepted across `min_tokens` would hide a stop the model emits there (vLLM
    0.32, every speculative method)."""
    budget = min(request_budget, max_model_len - length - 1)
    if length < stops_masked_until:
        budget = min(budget, stops_masked_until - length - 1)
    return budget


@kernel
def compose(settings: ChainSettings, p_of: np.ndarray, calibration: float,
            request: RequestState, corpus: context_index.TextIndex, tokens: np.ndarray,
            length: int, chains: Chains, row: int, bids: Bids, floor: float) -> int:
    """Row `row`'s chain (tokens, reach, sources, features) for a request with `length`
    committed `tokens`; returns its length. `p_of` is the request's row of the acceptance
    model, `calibration` what its reach is priced with (`acceptance.calibration`); `corpus` its
    namespace's shared text (an empty index if it does not share). Stops
    after the first token whose reach is below `floor` (no later token could survive the
    cut); never reaches past max_model_len."""
    index, pool, window = request.index, request.pool, request.window
    cont_len, max_key_len = pool.cont_len, pool.max_key_len
    support, max_hits = settings.support_levels, settings.max_hits
    copy_primary, pool_primary = borrowed(settings.copy_primary), borrowed(settings.pool_primary)
    jacobi_primary = borrowed(settings.jacobi_primary)
    budget = chain_limit(request.budget, settings.max_model_len, request.stops_masked_until,
                          length)
    if budget <= 0:
        return 0  # the window keeps what it issued last
    context, hashes, items = borrowed(bids.context), borrowed(bids.hashes), borrowed(bids.items)
    clen = 0
    for i in range(max(0, length - MAX_ORDER), length):
        context[clen] = tokens[i]
        clen += 1
    own = not index.evicted
    shared = corpus.indexed > 0
    text, corpus_text = borrowed(index.tokens), borrowed(corpus.tokens)
    keys, nodes = borrowed(pool.keys), borrowed(pool.continuations)
    node_tokens = borrowed(pool.continuation_tokens)
    out_tokens, out_sources = borrowed(chains.tokens)[row], borrowed(chains.sources)[row]
    out_features, out_reach = borrowed(chains.features)[row], borrowed(chains.reach)[row]
    run_node, run_position, run_key_len, run_hits = -1, 0, 0, 0
    reach = 1.0
    own_hint, shared_hint = request.own_hint, request.shared_hint
    n = 0
    while n < budget:
        suffix_hashes(context, clen - 1, min(MAX_ORDER, clen), hashes)
        count = 0
        if own:
            order, end, consistent = context_index.match(index, context, clen, hashes, own_hint)
            if order >= 0:
                own_hint = order
                if n == 0:
                    request.own_hint = own_hint
                source = Source.PROMPT if end + 1 < request.num_prompt else Source.OUTPUT
                count = _bid(items, count, p_of, support, text[end + 1], OWN_TEXT, source,
                             copy_primary[0, order, 1 if consistent else 0],
                             -1, 0, 0, 0)
        if shared:
            order, end, consistent = context_index.match(corpus, context, clen, hashes,
                                                         shared_hint)
            if order >= 0:
                shared_hint = order
                if n == 0:
                    request.shared_hint = shared_hint
                count = _bid(items, count, p_of, support, corpus_text[end + 1], SHARED_TEXT,
                             Source.SHARED, copy_primary[1, order, 1 if consistent else 0],
                             -1, 0, 0, 0)
        if run_node >= 0:
            follow = run_node if run_position + 1 < cont_len else -1
            count = _bid(items, count, p_of, support, node_tokens[run_node, run_position], POOL,
                         Source.TRAJECTORY,
                         pool_primary[run_key_len, min(run_hits, max_hits), run_position],
                         follow, run_position + 1, run_key_len, run_hits)
        for k in range(min(max_key_len, clen), 0, -1):
            kid = ngram_cache.find_key(pool, context, clen - 1, k,
                                       ngram_cache.key_hash(hashes[k - 1], k))
            if kid < 0:
                continue
            node = np.int64(keys[kid].first)
            while node >= 0:
                hits = np.int64(nodes[node].hits)
                follow = node if cont_len > 1 else -1
                count = _bid(items, count, p_of, support, node_tokens[node, 0], POOL,
                             Source.TRAJECTORY, pool_primary[k, min(hits, max_hits), 0], follow,
                             1, k, hits)
                node = np.int64(nodes[node].next)
        guess = jacobi_window.guess_for(window, length, n)
        if guess >= 0:
            count = _bid(items, count, p_of, support, guess, JACOBI, Source.JACOBI,
                         jacobi_primary[n], -1, 0, 0, 0)
        if count == 0:
            break
        best, best_p, best_feature = -1, 0.0, 0
        for i in range(count):
            f = items[i].primary * support + min(_kinds_agreeing(items[i].kinds) - 1,
                                                 support - 1)
            p = p_of[f]
            if best < 0 or p > best_p:
                best, best_p, best_feature = i, p, f
        reach = reach * calibrated(best_p, calibration)
        winner = items[best]
        token = winner.token
        out_tokens[n], out_sources[n], out_features[n] = token, winner.source, best_feature
        out_reach[n] = reach
        context[clen] = token
        clen += 1
        n += 1
        if reach < floor:
            break
        run_node, run_position = winner.run_node, winner.run_position
        run_key_len, run_hits = winner.run_key_len, winner.run_hits
    if n < budget and jacobi_window.can_pad(window) and reach >= floor:
        p_fill = calibrated(p_of[settings.fill_feature], calibration)
        while n < budget:
            reach = reach * p_fill
            out_tokens[n] = jacobi_window.fill_token(window)
            out_sources[n], out_features[n] = Source.FILL, settings.fill_feature
            out_reach[n] = reach
            n += 1
            if reach < floor:
                break
    jacobi_window.issue(window, length, out_tokens, n)
    return n


@kernel
def cut(chains: Chains, batch: int, live_rows: int, total: int, step_cost: float,
        token_cost: float) -> int:
    """Shorten the chains of the batch's rows (`live_rows` of them drafting, `total` tokens in
    all) to the tokens that pay: taken in decreasing order of reach (ties: the later row first)
    while each raises the batch's expected tokens per second, given the predicted `step_cost`
    without drafts and the cost of a verified token; a chain's prefix is kept whole. An
    independent row's chain is kept as it is, and counted as verified before the others are
    weighed. Returns how many tokens were cut."""
    reach = np.empty(total, dtype=np.float64)
    owner = np.empty(total, dtype=np.int64)
    expected = float(live_rows)
    i = 0
    for row in range(batch - 1, -1, -1):  # rows descending: the stable sort keeps it
        for j in range(chains.length[row]):
            if chains.independent[row]:
                expected += chains.reach[row, j]
                step_cost += token_cost
                continue
            reach[i] = -chains.reach[row, j]
            owner[i] = row
            i += 1
    order = np.argsort(reach[:i], kind="mergesort")
    keep = np.zeros(batch, dtype=np.int64)
    for k in range(i):
        q = -reach[order[k]]
        if q * step_cost <= token_cost * expected:
            break
        keep[owner[order[k]]] += 1
        expected += q
        step_cost += token_cost
    cut_tokens = 0
    for row in range(batch):
        if chains.independent[row]:
            continue
        cut_tokens += chains.length[row] - keep[row]
        chains.length[row] = keep[row]
    return cut_tokens
