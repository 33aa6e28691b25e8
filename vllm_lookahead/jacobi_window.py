"""One request's Jacobi state: guesses for the positions after its committed tokens (compiled).

Notation for one verification step: `base` is the number of committed tokens before the step, the
chain `d[0..n)` sat at token indices `base .. base+n`, and `y[j]` is the target's greedy prediction
for index `base + j` given the committed tokens and `d[:j]`. With `a` drafts accepted, vLLM commits
`d[:a]` plus one token at index `base + a`, so the predictions `y[a+1:]` are for exactly the next
unknown indices: they are the next Jacobi iterate and become the new guesses, position-exact.

Harvesting follows LADE's diagonals. `y[j]` was predicted right after the input `d[j-1]`; if that
input was itself a Jacobi guess, it was predicted a step earlier right after *its* input, and so on.
That lineage, not the chain's other inputs (which came from other iterations), is the sequence the
model actually extended token by token, so the n-gram harvested at `y[j]` is
`lineage(d[j-1]) + d[j-1] + y[j]`. For inputs that were not guesses (pool candidates, padding,
committed tokens) the lineage is simply the inputs before them. Only positions past the first
rejection are harvested here: earlier ones are committed output, which the pool gets anyway.

Stop tokens are poor guesses (the chain after one is never reached), so LADE's padding replaces
them: prompt tokens drawn by a seeded SplitMix64 generator (`fill_token`), which also pads chains
past what every source proposes. The plain-Python specification is
`reference.jacobi_window.JacobiWindow`.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.experimental import structref

from vllm_lookahead.compiled import (
    I32,
    I32_2D,
    U8,
    RecordType,
    borrowed,
    define_record,
    kernel,
    replaced,
    zeros,
)

MISSING = -1
"""A lineage token that does not exist (before the text's start, or after a replaced guess)."""


class JacobiWindowType(RecordType):
    pass


class JacobiWindow(structref.StructRefProxy):
    """One request's Jacobi iterate (a compiled record; see the module docstring)."""


JACOBI_WINDOW = define_record(JacobiWindowType, JacobiWindow, [
    ("guesses", I32),  # guesses[i]: the guess for token index anchor + i
    ("guess_lineage", I32_2D),  # the tokens before each guess along its diagonal
    ("num_guesses", types.int64),
    ("anchor", types.int64),
    ("issued", U8),  # per chain position: it holds the current guess for its index ...
    ("issued_lineage", I32_2D),  # ... whose lineage is this
    ("lineage_len", types.int64),
    ("rng", types.uint64),  # SplitMix64 state of the padding
    ("fill", I32),  # the prompt's tokens that pad (stop tokens excluded)
    ("stops", I32),  # the request's stop tokens
])


@kernel
def new_window(memory: np.ndarray, positions: int, lineage_len: int, fill: np.ndarray,
               stops: np.ndarray, seed: np.uint64) -> JacobiWindow:
    """A window for chains of up to `positions` tokens, padded from `fill`."""
    window = structref.new(JACOBI_WINDOW)
    window.guesses = zeros(memory, np.zeros(0, dtype=np.int32), positions)
    window.guess_lineage = zeros(memory, np.zeros((0, lineage_len), dtype=np.int32), positions)
    window.issued = zeros(memory, np.zeros(0, dtype=np.uint8), positions)
    window.issued_lineage = zeros(memory, window.guess_lineage, positions)
    window.fill = zeros(memory, window.guesses, fill.shape[0])
    window.fill[:] = fill
    window.stops = zeros(memory, window.guesses, stops.shape[0])
    window.stops[:] = stops
    window.num_guesses = 0
    window.anchor = 0
    window.lineage_len = lineage_len
    window.rng = seed
    return window


@kernel
def nbytes(window: JacobiWindow) -> int:
    return (window.guesses.nbytes + window.guess_lineage.nbytes + window.issued.nbytes
            + window.issued_lineage.nbytes + window.fill.nbytes + window.stops.nbytes)


@kernel
def free(memory: np.ndarray, window: JacobiWindow) -> None:
    """Release every array (the window is not used again)."""
    window.guesses = replaced(memory, window.guesses, 0)
    window.guess_lineage = replaced(memory, window.guess_lineage, 0)
    window.issued = replaced(memory, window.issued, 0)
    window.issued_lineage = replaced(memory, window.issued_lineage, 0)
    window.fill = replaced(memory, window.fill, 0)
    window.stops = replaced(memory, window.stops, 0)
    window.num_guesses = 0


@kernel(inline=True)
def _splitmix64(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    """One step of SplitMix64: (next state, 64-bit output)."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@kernel(inline=True)
def can_pad(window: JacobiWindow) -> bool:
    return window.fill.shape[0] > 0


@kernel(inline=True)
def fill_token(window: JacobiWindow) -> int:
    """The next padding token (callers check `can_pad`)."""
    state, value = _splitmix64(window.rng)
    window.rng = state
    fill = borrowed(window.fill)
    return fill[np.int64(value % np.uint64(fill.shape[0]))]


@kernel(inline=True)
def _is_stop(window: JacobiWindow, token: int) -> bool:
    stops = borrowed(window.stops)
    for i in range(stops.shape[0]):  # noqa: SIM110 (numba compiles loops, not generators)
        if stops[i] == token:
            return True
    return False


@kernel(inline=True)
def guess_for(window: JacobiWindow, index: int, position: int) -> int:
    """The guess for chain position `position` of a chain placed from token index `index`, or
    MISSING."""
    offset = index - window.anchor
    if offset < 0 or position >= window.num_guesses - offset:
        return MISSING
    return borrowed(window.guesses)[offset + position]


@kernel
def reset(window: JacobiWindow) -> None:
    """The committed tokens changed under the window (a rollback): its guesses are void."""
    window.num_guesses = 0
    window.issued[:] = 0


@kernel
def observe(window: JacobiWindow, tokens: np.ndarray, base: int, drafts: np.ndarray,
            predictions: np.ndarray, accepted: int, grid: np.ndarray) -> int:
    """Take one verification step's predictions: keep the Jacobi iterate, and write one row per
    prediction past the first rejection into `grid` (its lineage, its input, the prediction)
    for the pool; returns the rows. `tokens` holds at least the `base` tokens committed before
    the step."""
    span = window.lineage_len
    issued, issued_lineage = borrowed(window.issued), borrowed(window.issued_lineage)
    guesses, guess_lineage = borrowed(window.guesses), borrowed(window.guess_lineage)
    rows = max(drafts.shape[0] - accepted - 1, 0)
    for r in range(rows):
        j = accepted + 1 + r
        i = j - 1  # the input whose lineage is followed
        if issued[i] != 0:
            for m in range(span):
                grid[r, m] = issued_lineage[i, m]
        else:
            for m in range(span):
                p = i + m  # position in [padding] + tokens[base-span:base] + drafts
                if p < span:
                    q = base - span + p
                    grid[r, m] = tokens[q] if q >= 0 else MISSING
                else:
                    grid[r, m] = drafts[p - span]
        grid[r, span] = drafts[j - 1]
        grid[r, span + 1] = predictions[j]
    kept = rows
    for r in range(rows):
        guess = grid[r, span + 1]
        stop = _is_stop(window, guess)
        if stop and not can_pad(window):
            kept = r
            break
        if stop:
            guesses[r] = fill_token(window)
            guess_lineage[r, :] = MISSING
        else:
            guesses[r] = guess
            for m in range(span):
                guess_lineage[r, m] = grid[r, 1 + m]
    window.num_guesses = kept
    window.anchor = base + accepted + 1
    issued[:] = 0
    return rows


@kernel
def issue(window: JacobiWindow, index: int, chain: np.ndarray, n: int) -> None:
    """Remember which tokens of the next chain (`chain[:n]`, placed from token index `index`)
    are the current guesses for their positions, whatever proposed them, so that `observe` can
    follow their diagonals."""
    issued, guesses = borrowed(window.issued), borrowed(window.guesses)
    issued[:] = 0
    offset = index - window.anchor
    available = window.num_guesses - max(offset, 0)
    start = max(-offset, 0)
    for pos in range(start, min(n, start + max(available, 0))):
        gi = pos - start + max(offset, 0)
        if chain[pos] == guesses[gi]:
            issued[pos] = 1
            window.issued_lineage[pos, :] = window.guess_lineage[gi, :]
