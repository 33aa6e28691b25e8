"""One engine step of the whole batch, compiled: learn from every verified chain, then compose,
cut and issue the next chains (`step`), over the drafter's state (`DrafterState`).

The Python side (`drafter.LookaheadDrafter`) maps request ids to slots, admits and frees requests,
keeps the shared corpora's bookkeeping and the memory budget, and turns the chains into the lists
vLLM wants; everything per row happens here, in one call per step. The plain-Python specification
is `reference.drafter.ReferenceDrafter.draft_batch`.
"""

from __future__ import annotations

import numpy as np
from numba import from_dtype, types
from numba.experimental import structref
from numba.typed import List

from vllm_lookahead import acceptance, chain, context_index, jacobi_window, ngram_cache, step_cost
from vllm_lookahead import request_state as rs
from vllm_lookahead.compiled import MEMORY, RecordType, borrowed, define_record, kernel
from vllm_lookahead.counters import KERNEL_COUNTERS

BATCH_ROW = np.dtype([
    ("slot", np.int32),  # the request's slot; -1: nothing was committed for it this step
    ("samples", np.int32),  # tokens vLLM committed this step (accepted drafts + one)
    ("verified_base", np.int64),  # where the chain verified this step started (token index)
    ("verified_start", np.int64),  # its drafts and predictions: [start, end) of the flat arrays
    ("verified_end", np.int64),
])
"""One row of the step's batch, as the Python side fills it."""

ADMISSION = np.dtype([
    ("num_prompt", np.int64),
    ("last_token", np.int64),
    ("budget", np.int64),
    ("stops_masked_until", np.int64),
    ("acceptance_row", np.int64),
    ("namespace", np.int64),
    ("independent", np.bool_),
    ("seed", np.uint64),  # of the Jacobi padding
    ("reserve", np.int64),  # text tokens to make room for (the prompt, and output it may make)
])
"""What admitting a request sets (`admit`)."""


class DrafterStateType(RecordType):
    pass


class DrafterState(structref.StructRefProxy):
    """Everything the step works on (a compiled record; see the module docstring)."""


DRAFTER_STATE = define_record(DrafterStateType, DrafterState, [
    ("requests", types.ListType(rs.REQUEST_STATE)),  # by slot
    ("corpora", types.ListType(context_index.TEXT_INDEX)),  # shared corpora by namespace id
    ("no_corpus", context_index.TEXT_INDEX),  # empty: what a request that does not share sees
    ("settings", chain.CHAIN_SETTINGS),
    ("acceptance", acceptance.ACCEPTANCE),
    ("cost", types.Array(from_dtype(step_cost.COST_STATE), 1, "C")),  # one record
    ("counters", types.Array(from_dtype(KERNEL_COUNTERS), 1, "C")),  # one record
    ("chains", chain.CHAINS),
    ("bids", chain.BIDS),
    ("grid", types.int64[:, ::1]),  # the harvest of one row (`jacobi_window.observe`)
    ("pool_shape", types.UniTuple(types.int64, 3)),  # N-1, max_key_len, G
    ("max_chain", types.int64),  # K
    ("lineage_len", types.int64),
    ("memory", MEMORY),
])


@kernel
def new_drafter_state(settings: chain.ChainSettings, model: acceptance.Acceptance,
                      cost: np.ndarray, counters: np.ndarray, chains: chain.Chains,
                      pool_shape: tuple[int, int, int], max_chain: int,
                      memory: np.ndarray) -> DrafterState:
    state = structref.new(DRAFTER_STATE)
    state.requests = List.empty_list(rs.REQUEST_STATE)
    state.corpora = List.empty_list(context_index.TEXT_INDEX)
    state.no_corpus = context_index.new_text_index(memory)
    state.settings, state.acceptance, state.cost, state.counters = settings, model, cost, counters
    state.chains = chains
    cont_len, max_key_len, capacity = pool_shape
    state.bids = chain.new_bids(4 + capacity * max_key_len, max_chain)
    state.lineage_len = cont_len - 1 + max_key_len - 1
    state.grid = np.zeros((max_chain + 1, state.lineage_len + 2), dtype=np.int64)
    state.pool_shape, state.max_chain, state.memory = pool_shape, max_chain, memory
    return state


@kernel
def scratch_bytes(state: DrafterState) -> int:
    """The step's own scratch arrays (sized once)."""
    bids = state.bids
    return bids.items.nbytes + bids.context.nbytes + bids.hashes.nbytes + state.grid.nbytes


@kernel
def set_chains(state: DrafterState, chains: chain.Chains) -> None:
    """The step's chain buffers, replaced where the batch outgrew them."""
    state.chains = chains


# --- requests ---------------------------------------------------------------------------------


@kernel
def admit(state: DrafterState, slot: int, admission: np.ndarray, fill: np.ndarray,
          stops: np.ndarray) -> None:
    """A fresh state in `slot` (one past the last slot, or a freed one) for a request whose
    prompt is not indexed yet (`index_prompt`); `admission` is one ADMISSION record."""
    a = admission[0]
    request = rs.new_request_state(state.memory, state.pool_shape, state.max_chain,
                                   state.lineage_len, fill, stops, a.seed)
    request.num_prompt = request.committed = a.num_prompt
    request.last_token, request.budget = a.last_token, a.budget
    request.stops_masked_until = a.stops_masked_until
    request.acceptance_row, request.namespace = a.acceptance_row, a.namespace
    request.independent = a.independent
    context_index.reserve(request.index, a.reserve)
    if slot == len(state.requests):
        state.requests.append(request)
    else:
        state.requests[slot] = request


@kernel
def index_prompt(state: DrafterState, slot: int, tokens: np.ndarray) -> None:
    """Append part of the request's prompt (as stored: -1 where drafts may not copy from)."""
    context_index.extend(state.requests[slot].index, tokens)


@kernel
def finished_output(state: DrafterState, slot: int) -> np.ndarray:
    """The request's output so far (empty if its text was evicted)."""
    request = state.requests[slot]
    return context_index.text_of(request.index, request.num_prompt)


@kernel
def release(state: DrafterState, slot: int) -> None:
    rs.release_arrays(state.memory, state.requests[slot])


@kernel
def pool_bytes(state: DrafterState, slot: int) -> int:
    return ngram_cache.nbytes(state.requests[slot].pool)


@kernel
def text_bytes(state: DrafterState, slot: int) -> int:
    return context_index.nbytes(state.requests[slot].index)


@kernel
def clear_pool(state: DrafterState, slot: int) -> None:
    ngram_cache.clear(state.requests[slot].pool)


@kernel
def evict_text(state: DrafterState, slot: int) -> None:
    context_index.evict(state.requests[slot].index)


@kernel
def held_bytes(state: DrafterState) -> int:
    """What every array of the state holds, counted afresh (`memory` counts it as it goes)."""
    held = context_index.nbytes(state.no_corpus)
    for request in state.requests:
        held += rs.nbytes(request)
    for corpus in state.corpora:
        held += context_index.nbytes(corpus)
    return held


@kernel
def pool_sizes(state: DrafterState, slots: np.ndarray) -> tuple[int, int]:
    """(keys, continuations) of the pools of these slots."""
    keys = continuations = 0
    for slot in slots:
        pool = state.requests[slot].pool
        keys += pool.num_keys
        continuations += pool.num_continuations
    return keys, continuations


@kernel
def request_index(state: DrafterState, slot: int) -> context_index.TextIndex:
    return state.requests[slot].index


# --- shared corpora ---------------------------------------------------------------------------


@kernel
def corpus(state: DrafterState, namespace: int) -> context_index.TextIndex:
    """The namespace's corpus, made (empty) if it has none yet."""
    while len(state.corpora) <= namespace:
        state.corpora.append(context_index.new_text_index(state.memory))
    return state.corpora[namespace]


@kernel
def free_corpus(state: DrafterState, namespace: int) -> None:
    context_index.free(state.corpora[namespace])


# --- the step ---------------------------------------------------------------------------------


@kernel(inline=True)
def _is_this_step(tokens: np.ndarray, prev: int, length: int, row: np.ndarray,
                  drafts: np.ndarray) -> bool:
    """Whether the row's verified chain is the one that took the request from `prev` committed
    tokens to `length`: it started there, and vLLM committed its accepted drafts."""
    accepted = row.samples - 1
    base, start = row.verified_base, row.verified_start
    if base != prev or length != base + row.samples or accepted > row.verified_end - start:
        return False
    for i in range(accepted):  # noqa: SIM110 (numba compiles loops, not generators)
        if tokens[base + i] != drafts[start + i]:
            return False
    return True


@kernel
def _rebuild_text(request: rs.RequestState, tokens: np.ndarray, length: int,
                  hashes: np.ndarray) -> None:
    """The committed tokens changed under the text: the prompt as stored, then the tokens."""
    index = request.index
    if index.evicted:
        index.length = length
        return
    keep = min(request.num_prompt, length, index.length)
    index.length = keep
    context_index.clear(index)
    context_index.index_ends(index, 0, max(keep - 1, 0), hashes)
    context_index.append(index, tokens, keep, length, hashes)


@kernel
def _learn(state: DrafterState, request: rs.RequestState, counters: np.ndarray, verified: int,
           accepted: int) -> None:
    """Count the verified chain and teach the acceptance model its outcome."""
    issued, sources = request.issued_length, borrowed(request.issued_sources)
    counters.verified_chains += 1
    counters.verified_tokens += verified
    counters.accepted_tokens += accepted
    for i in range(min(accepted, issued)):
        counters.accepted_by_source[sources[i]] += 1
    touched = min(min(verified, issued), accepted + 1)
    expected, realized = acceptance.learn(state.acceptance, request.acceptance_row,
                                          request.issued_features, touched, accepted)
    request.expected += expected
    request.realized += realized


@kernel
def _sync(state: DrafterState, request: rs.RequestState, tokens: np.ndarray, length: int,
          row: np.ndarray, drafts: np.ndarray, predictions: np.ndarray, counters: np.ndarray,
          hashes: np.ndarray) -> int:
    """Bring the request to `length` committed tokens (`tokens` is the source of truth) and
    learn from the chain verified this step; returns its drafts."""
    prev = request.committed
    verified = 0
    if length < prev or tokens[prev - 1] != request.last_token:
        # vLLM discarded output (rollback): the guesses refer to tokens that are gone.
        counters.resyncs += 1
        jacobi_window.reset(request.window)
        _rebuild_text(request, tokens, length, hashes)
    else:
        start, end = row.verified_start, row.verified_end
        if end > start and _is_this_step(tokens, prev, length, row, drafts):
            verified = end - start
            accepted = row.samples - 1
            _learn(state, request, counters, verified, accepted)
            harvest = jacobi_window.observe(request.window, tokens, row.verified_base,
                                            drafts[start:end], predictions[start:end], accepted,
                                            state.grid)
            counters.trajectory_ngrams += ngram_cache.add_harvest(request.pool, state.grid,
                                                                  harvest, hashes)
        elif length != prev + row.samples:
            counters.resyncs += 1  # steps were skipped; the committed tokens fill the gap
        context_index.append(request.index, tokens, prev, length, hashes)
    request.issued_length = 0
    request.committed = length
    request.last_token = tokens[length - 1]
    return verified


@kernel
def _issue(state: DrafterState, rows: np.ndarray, counters: np.ndarray) -> int:
    """Every row's chain becomes its request's issued chain; returns the chains' total length,
    laid end to end in `chains.flat`."""
    chains = state.chains
    total = 0
    for r in range(rows.shape[0]):
        slot = rows[r].slot
        if slot < 0:
            continue
        n = chains.length[r]
        if n > 0:
            counters.chains += 1
        counters.draft_tokens += n
        request = state.requests[slot]
        request.issued_length = n
        sources, features = borrowed(request.issued_sources), borrowed(request.issued_features)
        for i in range(n):
            source = chains.sources[r, i]
            sources[i] = source
            features[i] = chains.features[r, i]
            counters.drafted_by_source[source] += 1
            chains.flat[total] = chains.tokens[r, i]
            total += 1
    return total


@kernel(inline=True)
def _calibration(state: DrafterState, request: rs.RequestState) -> float:
    """What the request's reach is priced with (1: an independent request drafts by the
    prior alone)."""
    if request.independent:
        return 1.0
    model, row = state.acceptance, request.acceptance_row
    return acceptance.calibration(model.expected[row], model.realized[row], request.expected,
                                  request.realized)


@kernel
def step(state: DrafterState, rows: np.ndarray, token_ids: np.ndarray, num_tokens: np.ndarray,
         drafts: np.ndarray, predictions: np.ndarray, step_seconds: float) -> int:
    """One engine step: sync every row (learning from its verified chain), fit the step cost
    (`step_seconds` >= 0: the time of a step that verified nothing but these chains), compose
    every chain, cut the batch (adaptive) and issue the chains. `rows` are BATCH_ROW records;
    row r's tokens are token_ids[r, :num_tokens[r]]; its verified drafts and the target's
    predictions are in `drafts` and `predictions`. Returns the chains' total length."""
    counters = state.counters[0]
    cost = state.cost[0]
    requests = state.requests
    hashes = state.bids.hashes
    batch = rows.shape[0]
    live = 0
    verified = 0
    for r in range(batch):
        row = rows[r]
        if row.slot < 0:
            continue
        live += 1
        verified += _sync(state, requests[row.slot], token_ids[r], np.int64(num_tokens[r]), row,
                          drafts, predictions, counters, hashes)
    if step_seconds >= 0.0:
        step_cost.observe(cost, float(live), float(live + verified), step_seconds)
    settings, chains, p_of = state.settings, state.chains, state.acceptance.p
    floor = step_cost.reach_floor(cost, float(live)) if settings.adaptive else 0.0
    own_floor = chain.INDEPENDENT_REACH_FLOOR if settings.adaptive else 0.0
    total = 0
    for r in range(batch):
        chains.length[r] = 0
        chains.independent[r] = False
        slot = rows[r].slot
        if slot < 0:
            continue
        request = requests[slot]
        namespace = request.namespace
        corpus = state.no_corpus if namespace == rs.NO_NAMESPACE else state.corpora[namespace]
        chains.independent[r] = request.independent
        n = chain.compose(settings, p_of[request.acceptance_row], _calibration(state, request),
                          request, corpus, token_ids[r], np.int64(num_tokens[r]), chains, r,
                          state.bids, own_floor if request.independent else floor)
        chains.length[r] = n
        total += n
    if settings.adaptive and live > 0:
        counters.cut_tokens += chain.cut(chains, batch, live, total,
                                         step_cost.predict(cost, float(live), float(live)),
                                         cost.theta[2])
    return _issue(state, rows, counters)

