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
from collections.abc import Callable, Sequence

import numpy as np
from numba import njit
from numba.extending import register_jitable


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

    The arithmetic is scalar, in one float64 state array (`cost_observe`), so that the compiled
    drafter runs the very same operations compiled (`use_compiled`) and both fit bit for bit
    alike; numpy's 3x3 solve took 50 µs a step.
    """

    def __init__(self, prior: tuple[float, float, float], half_life: float = 200.0,
                 prior_steps: float = 50.0) -> None:
        self._state = np.zeros(_COST_FIELDS)
        self._state[_SHAPE:_SHAPE + 3] = prior
        self._state[_THETA:_THETA + 3] = prior
        self._state[_DECAY] = 0.5 ** (1 / half_life)
        self._state[_PRIOR_STEPS] = prior_steps
        self._observe = cost_observe

    def use_compiled(self, observe: Callable[[np.ndarray, float, float, float], None]) -> None:
        """Run `observe` (the compiled `cost_observe`) instead of the Python one."""
        self._observe = observe

    @property
    def theta(self) -> np.ndarray:
        """(a, b, c), a view: writing it sets the fit."""
        return self._state[_THETA:_THETA + 3]

    @property
    def observations(self) -> int:
        return int(self._state[_OBSERVATIONS])

    @property
    def token_cost(self) -> float:
        return float(self._state[_THETA + 2])

    def predict(self, rows: int, tokens: int) -> float:
        return cost_predict(self._state, float(rows), float(tokens))

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        self._observe(self._state, float(rows), float(tokens), float(seconds))


# CostModel's state: decayed sums x·xᵀ (3x3) and x·y, the scale fit, theta, the prior shape.
_XX, _XY, _SF, _THETA, _SHAPE = 0, 9, 12, 14, 17
_DECAY, _PRIOR_STEPS, _OBSERVATIONS = 20, 21, 22
_COST_FIELDS = 23


@register_jitable
def cost_predict(st: np.ndarray, rows: float, tokens: float) -> float:
    return max(st[_THETA] + st[_THETA + 1] * rows + st[_THETA + 2] * tokens, 1e-9)


@register_jitable
def cost_observe(st: np.ndarray, rows: float, tokens: float, seconds: float) -> None:
    """One step's time: update the decayed statistics and refit. Scalar operations only, in a
    fixed order, so that Python and numba compute the same bits."""
    # One pause (a client gone quiet, a GC, a busy machine) must not teach the model that
    # tokens are dear.
    if st[_OBSERVATIONS] >= 10 and seconds > 3 * cost_predict(st, rows, tokens):
        return
    d = st[_DECAY]
    x = (1.0, rows, tokens)
    for i in range(3):
        for j in range(3):
            st[_XX + 3 * i + j] = d * st[_XX + 3 * i + j] + x[i] * x[j]
        st[_XY + i] = d * st[_XY + i] + x[i] * seconds
    shaped = st[_SHAPE] + rows * st[_SHAPE + 1] + tokens * st[_SHAPE + 2]
    st[_SF] = d * st[_SF] + seconds * shaped
    st[_SF + 1] = d * st[_SF + 1] + shaped * shaped
    st[_OBSERVATIONS] += 1.0
    _cost_refit(st)


@register_jitable
def _cost_refit(st: np.ndarray) -> None:
    scale = st[_SF] / st[_SF + 1]
    xx00 = st[_XX]
    # As strong as `prior_steps` typical steps, per parameter.
    weight = st[_PRIOR_STEPS] * min(1.0, xx00)
    a = np.empty((3, 4))
    for i in range(3):
        prior_i = st[_SHAPE + i] * scale
        ridge = weight * (st[_XX + 4 * i] / max(xx00, 1e-9))
        for j in range(3):
            a[i, j] = st[_XX + 3 * i + j]
        a[i, i] += ridge
        a[i, 3] = st[_XY + i] + ridge * prior_i
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
        st[_THETA + i] = max(theta[i], 0.02 * st[_SHAPE + i] * scale)
    cap = 2 * (st[_SHAPE + 1] * scale + st[_SHAPE + 2] * scale)
    st[_THETA + 2] = min(st[_THETA + 2], cap)


# Compiled here, not in kernels.py: numba's cache is invalidated by the file that defines the
# function, so an edit to the cost model above recompiles it.
cost_observe_compiled = njit(cache=True)(cost_observe)


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
