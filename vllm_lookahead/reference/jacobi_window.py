"""One request's Jacobi state in plain Python: the specification of `vllm_lookahead.jacobi_window`
(whose docstring has the notation, the iterate and LADE's diagonals). The compiled window keeps
the same guesses and lineages in arrays; this one keeps them in numpy arrays and a dict of issued
positions, and returns its harvest for `reference.ngram_cache.NGramPool.add`.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

_EMPTY = np.empty(0, dtype=np.int64)
_MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64: `(next state, 64-bit output)`. A counter-based generator that
    compiled code reproduces bit for bit, so every implementation of the drafter pads alike."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


@dataclasses.dataclass
class Harvest:
    """Trajectory n-grams in the form `NGramPool.add` takes: continuation `conts[i]` belongs under
    the keys of `seq` that end at `starts[i]` (-1 marks context that does not exist)."""

    seq: np.ndarray
    starts: np.ndarray
    conts: np.ndarray


class JacobiWindow:
    def __init__(self, ngram_size: int, max_key_len: int, seed: int,
                 fill_tokens: np.ndarray, stop_token_ids: frozenset[int]) -> None:
        self.ngram_size = ngram_size
        self.max_key_len = max_key_len
        # Tokens before a guess along its diagonal: the n-gram head plus the longest key's context.
        self.lineage_len = ngram_size - 2 + max_key_len - 1
        self.stop_token_ids = np.array(sorted(stop_token_ids), dtype=np.int64)
        # Padding tokens are drawn from the prompt, as LADE does; stop tokens would end the chain.
        fill = fill_tokens[~np.isin(fill_tokens, self.stop_token_ids)]
        self._fill_tokens = fill.astype(np.int64)
        # Seeded by the prompt as well, so runs are reproducible whatever vLLM's request ids are.
        self._rng_state = (seed * 0x100000001B3 + zlib.crc32(fill_tokens.tobytes())) & _MASK64
        self.anchor = 0
        self.guesses = _EMPTY
        self._lineage = np.empty((0, self.lineage_len), dtype=np.int64)
        self._issued: dict[int, list[int]] = {}

    def guesses_from(self, index: int) -> np.ndarray:
        """Guesses for token indices `index, index+1, ...` (empty if none are known)."""
        offset = index - self.anchor
        if offset < 0:
            return _EMPTY
        return self.guesses[offset:]

    def issue(self, index: int, chain: list[int]) -> None:
        """Remember which tokens of the next chain (placed from token index `index`) are the
        current guesses for their positions, whatever proposed them, so that `observe` can
        follow their diagonals: the model predicted such a token along its lineage."""
        offset = index - self.anchor
        guesses = self.guesses.tolist()[max(offset, 0):]
        start = max(-offset, 0)
        self._issued = {pos: self._lineage[offset + pos].tolist()
                        for pos in range(start, min(len(chain), start + len(guesses)))
                        if chain[pos] == guesses[pos - start]}

    def reset(self) -> None:
        self.guesses = _EMPTY
        self._issued = {}

    def random_fill(self, n: int) -> np.ndarray:
        """`n` prompt tokens chosen by the seeded generator, the Jacobi starting point."""
        if n <= 0 or len(self._fill_tokens) == 0:
            return _EMPTY
        out = np.empty(n, dtype=np.int64)
        state, size = self._rng_state, len(self._fill_tokens)
        for i in range(n):
            state, value = splitmix64(state)
            out[i] = self._fill_tokens[value % size]
        self._rng_state = state
        return out

    def observe(self, context: np.ndarray, base: int, drafts: np.ndarray, argmax: np.ndarray,
                accepted: int) -> Harvest:
        """Take one verification step's predictions: keep the Jacobi iterate, return its n-grams.

        `context` holds at least the `base` tokens committed before the step; `drafts` and `argmax`
        have one entry per chain position; `accepted` drafts were accepted.
        """
        # Python lists, not arrays: a chain is a few tokens, where numpy's call overhead dominates.
        d, y = drafts.tolist(), argmax.tolist()
        lineages = self._lineages(context, base, d)
        # The n-gram ending in prediction y[j]: the lineage of input d[j-1], d[j-1], y[j].
        rows = [[*lineages[j - 1], d[j - 1], y[j]] for j in range(accepted + 1, len(d))]
        width = self.lineage_len + 2
        grid = np.array(rows, dtype=np.int64).reshape(len(rows), width)
        self.guesses, self._lineage = self._without_stop_tokens(grid[:, -1], grid[:, 1:-1])
        self.anchor = base + accepted + 1
        self._issued = {}
        # An n-gram needs all of its N tokens; only the key's extra context may be missing.
        grid = grid[(grid[:, self.max_key_len - 1:] >= 0).all(axis=1)]
        return Harvest(seq=grid.ravel(),
                       starts=np.arange(len(grid)) * width + self.max_key_len - 1,
                       conts=grid[:, self.max_key_len:])

    def _lineages(self, context: np.ndarray, base: int, drafts: list[int]) -> list[list[int]]:
        """For every chain input, the `lineage_len` tokens that precede it along its diagonal."""
        span = self.lineage_len
        lo = max(0, base - span)
        inputs = [-1] * (span - (base - lo)) + context[lo:base].tolist() + drafts
        causal = [inputs[i:i + span] for i in range(len(drafts))]
        # The scheduler may have cut the chain, even before the first guess; a guess it kept is
        # at its issued position.
        for pos, lineage in self._issued.items():
            if pos < len(drafts):
                causal[pos] = lineage
        return causal

    def _without_stop_tokens(self, guesses: np.ndarray,
                             lineage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stops = np.isin(guesses, self.stop_token_ids)
        if not stops.any():
            return guesses, lineage
        # A stop token is a poor guess (the chain after it is never reached); LADE replaces it.
        replacement = self.random_fill(int(stops.sum()))
        if len(replacement) == 0:
            cut = int(np.argmax(stops))
            return guesses[:cut], lineage[:cut]
        guesses, lineage = guesses.copy(), lineage.copy()
        guesses[stops] = replacement
        lineage[stops] = -1
        return guesses, lineage
