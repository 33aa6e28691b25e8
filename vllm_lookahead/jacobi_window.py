"""One request's Jacobi state: guesses for the positions after its committed tokens.

Notation for one verification step: `base` is the number of committed tokens before the step, the
chain `d[0..n)` sat at token indices `base .. base+n`, and `y[j]` is the target's greedy prediction
for index `base + j` given the committed tokens and `d[:j]`. With `a` drafts accepted, vLLM commits
`d[:a]` plus one token at index `base + a`, so the predictions `y[a+1:]` are for exactly the next
unknown indices: they are the next Jacobi iterate and become the new guesses, position-exact.

Every prediction also closes an n-gram whose last token the model predicted from the n-1 tokens
before it (committed tokens, then the chain); those past the first rejection are the trajectory
n-grams LADE harvests, and go into the pool.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

_EMPTY = np.empty(0, dtype=np.int64)


@dataclasses.dataclass
class Harvest:
    """Trajectory n-grams in the form `NGramPool.add` takes: continuation `conts[i]` belongs under
    the keys of `seq` that end at `starts[i]`."""

    seq: np.ndarray
    starts: np.ndarray
    conts: np.ndarray


class JacobiWindow:
    def __init__(self, ngram_size: int, max_key_len: int, seed: int,
                 fill_tokens: np.ndarray, stop_token_ids: frozenset[int]) -> None:
        self.ngram_size = ngram_size
        self.max_key_len = max_key_len
        self.stop_token_ids = stop_token_ids
        # Padding tokens are drawn from the prompt, as LADE does; stop tokens would end the chain.
        fill = fill_tokens[~np.isin(fill_tokens, list(stop_token_ids))] if stop_token_ids \
            else fill_tokens
        self._fill_tokens = fill.astype(np.int64) if len(fill) else _EMPTY
        # Seeded by the prompt as well, so runs are reproducible whatever vLLM's request ids are.
        self._rng = np.random.default_rng([seed, zlib.crc32(fill_tokens.tobytes())])
        self.anchor = 0
        self.guesses = _EMPTY

    def guesses_from(self, index: int) -> np.ndarray:
        """Guesses for token indices `index, index+1, ...` (empty if none are known)."""
        offset = index - self.anchor
        if offset < 0:
            return _EMPTY
        return self.guesses[offset:]

    def reset(self) -> None:
        self.guesses = _EMPTY

    def random_fill(self, n: int) -> np.ndarray:
        """`n` prompt tokens chosen by the seeded generator, the Jacobi starting point."""
        if n <= 0 or len(self._fill_tokens) == 0:
            return _EMPTY
        return self._rng.choice(self._fill_tokens, size=n)

    def observe(self, context: np.ndarray, base: int, drafts: np.ndarray, argmax: np.ndarray,
                accepted: int) -> Harvest:
        """Take one verification step's predictions: keep the Jacobi iterate, return its n-grams.

        `context` holds at least the `base` tokens committed before the step; `drafts` and `argmax`
        have one entry per chain position; `accepted` drafts were accepted.
        """
        iterate = argmax[accepted + 1:].astype(np.int64)
        self.guesses = self._without_stop_tokens(iterate)
        self.anchor = base + accepted + 1
        return self._trajectory_ngrams(context, base, drafts, argmax, accepted)

    def _without_stop_tokens(self, guesses: np.ndarray) -> np.ndarray:
        if not self.stop_token_ids or len(guesses) == 0:
            return guesses
        stops = np.isin(guesses, list(self.stop_token_ids))
        if not stops.any():
            return guesses
        # A stop token is a poor guess (the chain after it is never reached); LADE replaces it.
        guesses = guesses.copy()
        replacement = self.random_fill(int(stops.sum()))
        if len(replacement) == 0:
            return guesses[:int(np.argmax(stops))]
        guesses[stops] = replacement
        return guesses

    def _trajectory_ngrams(self, context: np.ndarray, base: int, drafts: np.ndarray,
                           argmax: np.ndarray, accepted: int) -> Harvest:
        n = self.ngram_size
        js = np.arange(accepted + 1, len(drafts))
        starts = base + js - (n - 1)
        js, starts = js[starts >= 0], starts[starts >= 0]
        # The inputs the model saw: committed tail (enough for keys and n-gram heads), then chain.
        lo = max(0, base - (n - 2) - (self.max_key_len - 1))
        seq = np.concatenate([context[lo:base].astype(np.int64), drafts.astype(np.int64)])
        rel = starts - lo
        heads = seq[rel[:, None] + np.arange(1, n - 1)]
        conts = np.concatenate([heads, argmax[js, None].astype(np.int64)], axis=1)
        return Harvest(seq=seq, starts=rel, conts=conts)
