"""How likely a draft token is to be accepted, and whether verifying it pays.

`AcceptanceModel` estimates, for a draft token described by a small integer *feature* (its source
and the evidence behind it: match length, how often and how consistently that context continued,
its position in a pool n-gram...), the probability that the target accepts it given that every
token before it in the chain was accepted. The estimate is learned online from verification
outcomes (accepted: counts for the feature; first rejected: counts against; later positions: not
observed), starting from a prior per source, with old outcomes decaying so that a change of
workload is followed. Learning it online, rather than fixing weights, is what keeps the drafter
honest on prompt kinds nobody tuned it for.

`CostModel` learns what a step costs: wall time between steps against the rows and the tokens
verified, by recursive least squares with forgetting. `cut_chains` then keeps, over the whole
batch, exactly the draft tokens whose expected acceptance pays for their verification: adding a
token of cumulative acceptance probability q to a step that emits N tokens in T seconds raises
throughput iff q > (marginal cost of a token) · N / T; tokens are taken in order of q, so the
threshold rises as the batch's load grows and drafting stops where nothing pays.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np

from vllm_lookahead import kernels


class Source(enum.IntEnum):
    """What proposed a draft token; acceptance is counted per source."""

    PROMPT = 0
    """Copied from the request's prompt after a match of its context."""
    OUTPUT = 1
    """Copied from the request's own output so far."""
    SHARED = 2
    """Copied from earlier requests' outputs (the cross-request corpus)."""
    TRAJECTORY = 3
    """An n-gram of the Jacobi trajectory (the target's own predictions) from the pool."""
    JACOBI = 4
    """The current Jacobi guess for that position."""
    FILL = 5
    """Prompt tokens drawn by a seeded generator: the Jacobi starting point."""


# Features: small integers. A token's *primary* feature is its strongest single piece of evidence
# (its source and what that source knows); its *support* is how many other kinds of source propose
# the same token at that position. Agreement matters most: on SmolLM2 a first draft token proposed
# by one source was accepted 17 % of the time, by two 41 %, by three 72 %.
MATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
"""Effective match length (the matched context plus the tokens copied since), bucketed."""
POOL_HITS = 3  # 1, 2, 3+ harvests of that continuation
POOL_OFFSETS = 3  # position inside the n-gram: 0, 1, 2+
JACOBI_OFFSETS = 4
SUPPORT_LEVELS = 3  # no other kind of source agrees, one does, two or more do
_COPY_FEATURES = len(MATCH_BUCKETS) * 2  # x consistent
_BASE_OWN = 0
_BASE_SHARED = _BASE_OWN + _COPY_FEATURES
_BASE_POOL = _BASE_SHARED + _COPY_FEATURES
_BASE_JACOBI = _BASE_POOL + 2 * POOL_HITS * POOL_OFFSETS  # x key length 1 / 2+
FILL_PRIMARY = _BASE_JACOBI + JACOBI_OFFSETS
NUM_PRIMARY = FILL_PRIMARY + 1
NUM_FEATURES = NUM_PRIMARY * SUPPORT_LEVELS


def _match_bucket(length: int) -> int:
    for i, edge in enumerate(MATCH_BUCKETS):
        if length <= edge:
            return i
    return len(MATCH_BUCKETS) - 1


def copy_primary(shared: bool, match_len: int, consistent: bool) -> int:
    base = _BASE_SHARED if shared else _BASE_OWN
    return base + 2 * _match_bucket(match_len) + int(consistent)


def pool_primary(key_len: int, hits: int, offset: int) -> int:
    index = (min(key_len, 2) - 1) * POOL_HITS + min(hits, POOL_HITS) - 1
    return _BASE_POOL + index * POOL_OFFSETS + min(offset, POOL_OFFSETS - 1)


def jacobi_primary(offset: int) -> int:
    return _BASE_JACOBI + min(offset, JACOBI_OFFSETS - 1)


def feature(primary: int, support: int) -> int:
    return primary * SUPPORT_LEVELS + min(support, SUPPORT_LEVELS - 1)


FILL_FEATURE = feature(FILL_PRIMARY, 0)


def _prior() -> np.ndarray:
    """Prior acceptance per feature, before anything is observed: long, consistent matches are
    likely, short ones and pool n-grams less so, Jacobi guesses and padding rarely; agreement of
    other sources makes any of them likelier."""
    primary = np.empty(NUM_PRIMARY)
    for shared in (False, True):
        for edge in MATCH_BUCKETS:
            for consistent in (False, True):
                base = 0.2 + 0.6 * (1 - math.exp(-edge / 6)) + 0.1 * consistent
                primary[copy_primary(shared, edge, consistent)] = base * (0.7 if shared else 1)
    for key_len in (1, 2):
        for hits in range(1, POOL_HITS + 1):
            for offset in range(POOL_OFFSETS):
                primary[pool_primary(key_len, hits, offset)] = min(
                    0.9, 0.1 + 0.05 * key_len + 0.05 * hits + 0.15 * offset)
    for offset in range(JACOBI_OFFSETS):
        primary[jacobi_primary(offset)] = 0.07
    primary[FILL_PRIMARY] = 0.01
    p = np.empty(NUM_FEATURES)
    for f in range(NUM_PRIMARY):
        for support in range(SUPPORT_LEVELS):
            # Each agreeing source removes about half of what is left of the doubt.
            p[feature(f, support)] = 1 - (1 - primary[f]) * 0.5 ** support
    return p


class AcceptanceModel:
    """P(accepted | the chain before it was accepted) per feature, learned online."""

    def __init__(self, prior_weight: float = 4.0, half_life: int = 20000) -> None:
        prior = _prior()
        self.accepted = prior * prior_weight
        self.seen = np.full(NUM_FEATURES, prior_weight)
        self._decay = 0.5 ** (1 / half_life) if half_life > 0 else 1.0
        self._floor = prior_weight
        self._probs = (self.accepted / self.seen).tolist()

    def p(self, feature: int) -> float:
        return self._probs[feature]

    def observe(self, features: Sequence[int], accepted: int) -> None:
        """One verified chain: `features[:accepted]` were accepted, `features[accepted]` (if any)
        rejected; the positions after it say nothing about their own tokens."""
        touched = features[:accepted + 1]
        if not touched:
            return
        decay = self._decay ** len(touched)
        for i, f in enumerate(touched):
            # Decay only what is touched, lazily: each feature keeps its recent history.
            self.accepted[f] *= decay
            self.seen[f] = max(self.seen[f] * decay, self._floor)
            self.seen[f] += 1.0
            if i < accepted:
                self.accepted[f] += 1.0
            self._probs[f] = float(min(self.accepted[f] / self.seen[f], 0.999))

    def table(self) -> list[float]:
        return list(self._probs)


class CostModel:
    """Step time ≈ a + b·rows + c·tokens, fitted online; `token_cost` (c) is what one more
    verified token costs.

    The fit is a ridge regression on exponentially decayed statistics, pulled towards a prior
    *shape* (the relative sizes of a, b and c) scaled to the observed step times. Steps vary little
    in rows and tokens, and on a busy machine their times are noisy, so an unregularised fit wanders
    far (negative costs, a step's worth per token); the prior keeps it sane until the data speak
    clearly, and the scale keeps the prior meaningful for any model size and device.

    The arithmetic (`kernels.cost_observe`) is scalar, on one float64 state array, so that the
    compiled drafter runs the very same operations inside its step and both fit bit for bit
    alike (numpy's 3x3 solve also took 50 µs a step).
    """

    def __init__(self, prior: tuple[float, float, float], half_life: float = 200.0,
                 prior_steps: float = 20.0) -> None:
        self.state = np.zeros(kernels.CS_FIELDS)
        self.state[kernels.CS_SHAPE:kernels.CS_SHAPE + 3] = prior
        self.state[kernels.CS_THETA:kernels.CS_THETA + 3] = prior
        self.state[kernels.CS_DECAY] = 0.5 ** (1 / half_life)
        self.state[kernels.CS_PRIOR_STEPS] = prior_steps

    @property
    def theta(self) -> np.ndarray:
        """(a, b, c), a view: writing it sets the fit."""
        return self.state[kernels.CS_THETA:kernels.CS_THETA + 3]

    @property
    def observations(self) -> int:
        return int(self.state[kernels.CS_OBSERVATIONS])

    @property
    def token_cost(self) -> float:
        return float(self.state[kernels.CS_THETA + 2])

    def predict(self, rows: int, tokens: int) -> float:
        return float(kernels.cost_predict(self.state, float(rows), float(tokens)))

    def reach_floor(self, rows: int) -> float:
        """Below this reach no draft token of `rows` chains survives `cut_chains`."""
        return float(kernels.reach_floor(self.state, float(rows)))

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        kernels.cost_observe(self.state, float(rows), float(tokens), float(seconds))


def cut_chains(probs: Sequence[Sequence[float]], cost: CostModel) -> list[int]:
    """How many leading draft tokens of each chain to keep.

    `probs[r][i]` is the probability that chain r's first i+1 tokens are all accepted
    (non-increasing in i). Tokens are taken in decreasing order of that probability while each
    raises the batch's expected tokens per second, given `cost`; a chain's prefix is kept whole.
    """
    rows = len(probs)
    keep = [0] * rows
    if rows == 0:
        return keep
    tokens = rows  # each row verifies its last token
    expected = float(rows)
    order = sorted(((q, r) for r, qs in enumerate(probs) for q in qs), reverse=True)
    step_cost = cost.predict(rows, tokens)
    token_cost = cost.token_cost
    for q, r in order:
        if q * step_cost <= token_cost * expected:
            break
        keep[r] += 1
        tokens += 1
        expected += q
        step_cost += token_cost
    return keep
