"""One request's drafting state, a compiled record: its text index, its trajectory pool, its
Jacobi window, and what the step needs to know of the request (its committed tokens, its chain
budget, whom it shares with, the chain it was last issued)."""

from __future__ import annotations

import numpy as np
from numba import types
from numba.experimental import structref

from vllm_lookahead import context_index, jacobi_window, ngram_cache
from vllm_lookahead.compiled import I32, RecordType, define_record, kernel, replaced

NO_NAMESPACE = -1
"""The request does not share: it neither drafts from nor adds to a shared corpus."""


class RequestStateType(RecordType):
    pass


class RequestState(structref.StructRefProxy):
    """One live request's drafting state (a compiled record; see the module docstring)."""


REQUEST_STATE = define_record(RequestStateType, RequestState, [
    ("index", context_index.TEXT_INDEX),  # the prompt as stored, then the committed tokens
    ("pool", ngram_cache.TRAJECTORY_POOL),
    ("window", jacobi_window.JACOBI_WINDOW),
    ("num_prompt", types.int64),
    ("committed", types.int64),  # tokens committed when the state was last brought up to date
    ("last_token", types.int64),  # the last of them (a change means vLLM rolled back)
    ("budget", types.int64),  # draft tokens per step at most (the request's own limit)
    ("stops_masked_until", types.int64),  # committed length where `min_tokens` ends (0: none)
    ("acceptance_row", types.int64),  # `acceptance.GREEDY`, `SAMPLED` or `PRIOR`
    ("namespace", types.int64),  # its shared corpus's id, or NO_NAMESPACE
    ("independent", types.boolean),  # drafts from its own tokens only (a seeded request)
    ("issued_length", types.int64),  # the chain issued last step ...
    ("issued_sources", I32),  # ... where each of its tokens came from ...
    ("issued_features", I32),  # ... and the feature each was priced by
    ("own_hint", types.int64),  # the orders that matched at the last chain's first token
    ("shared_hint", types.int64),
    ("expected", types.float64),  # its own calibration (`acceptance.Calibration`)
    ("realized", types.float64),
])


@kernel
def new_request_state(memory: np.ndarray, pool_shape: tuple[int, int, int], max_chain: int,
                      lineage_len: int, fill: np.ndarray, stops: np.ndarray,
                      seed: np.uint64) -> RequestState:
    """A state with an empty index and pool; `pool_shape` is (N-1, max_key_len, G)."""
    request = structref.new(REQUEST_STATE)
    request.index = context_index.new_text_index(memory)
    cont_len, max_key_len, capacity = pool_shape
    request.pool = ngram_cache.new_pool(memory, cont_len, max_key_len, capacity)
    request.window = jacobi_window.new_window(memory, max_chain + 1, lineage_len, fill, stops,
                                              seed)
    request.issued_sources = np.zeros(max_chain + 1, dtype=np.int32)
    request.issued_features = np.zeros(max_chain + 1, dtype=np.int32)
    memory[0] += request.issued_sources.nbytes + request.issued_features.nbytes
    request.num_prompt = request.committed = request.last_token = 0
    request.budget = request.acceptance_row = request.issued_length = 0
    request.stops_masked_until = 0
    request.namespace = NO_NAMESPACE
    request.independent = False
    request.own_hint = request.shared_hint = 0
    request.expected = request.realized = 0.0
    return request


@kernel
def release_arrays(memory: np.ndarray, request: RequestState) -> None:
    """The request is gone: every array of its state is released (the slot keeps an empty
    record until another request takes it)."""
    context_index.free(request.index)
    ngram_cache.clear(request.pool)
    jacobi_window.free(memory, request.window)
    request.issued_sources = replaced(memory, request.issued_sources, 0)
    request.issued_features = replaced(memory, request.issued_features, 0)


@kernel
def nbytes(request: RequestState) -> int:
    return (context_index.nbytes(request.index) + ngram_cache.nbytes(request.pool)
            + jacobi_window.nbytes(request.window) + request.issued_sources.nbytes
            + request.issued_features.nbytes)
