"""How likely a draft token is to be accepted, learned online.

For a draft token described by a small integer *feature* (its source and the evidence behind it:
match length, whether that context always continued alike, its position in a pool n-gram, how many
kinds of source agree on it...), the acceptance model estimates the probability that the target
accepts it given that every token before it in the chain was accepted. The estimate is learned
from verification outcomes (accepted: counts for the feature; first rejected: counts against;
later positions: not observed), starting from a prior per source, with old outcomes decaying so
that a change of workload is followed. Learning it online, rather than fixing weights, is what
keeps the drafter honest on prompt kinds nobody tuned it for. Greedy and sampled requests learn
apart: a sampled request accepts a draft with the target's probability of it, not its argmax.

A feature's estimate moves only as fast as that feature is verified, and at high load few drafts
are: after a workload where long matches always continue (code), the same evidence on prose is
priced as if it still did, and the cut keeps drafts that are accepted far less often than it
believes. So the model also keeps its *calibration*, accepted over expected acceptances of the
tokens it priced, recent and engine-wide (per kind of request), and each request its own, which
starts at the engine's and moves to what the request itself shows (`calibration`). A chain's
reach is priced with the request's calibration where it is below 1 (`calibrated`); which token
wins a position is not changed.

`AcceptanceModel` is the plain-Python model the reference drafter runs; the compiled drafter keeps
the same numbers in an `Acceptance` record (`learn`), initialised from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from numba import types
from numba.experimental import structref

from vllm_lookahead.compiled import F64, F64_2D, RecordType, define_record, jitable, kernel

# Features: small integers. A token's *primary* feature is its strongest single piece of evidence
# (its source and what that source knows); its *support* is how many other kinds of source propose
# the same token at that position. Agreement matters most: a token that several kinds of
# source propose is accepted far more often than one that a single source proposes.
MATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
"""Effective match length (the matched context plus the tokens copied since), bucketed."""
POOL_HITS = 3  # 1, 2, 3+ harvests of that continuation
POOL_OFFSETS = 3  # position inside the n-gram: 0, 1, 2+
JACOBI_OFFSETS = 4
SUPPORT_LEVELS = 3  # no other kind of source agrees, one does, two or more do
CALIBRATION_HALF_LIFE = 200
"""Verified draft tokens over which the engine-wide calibration forgets half of what it saw:
short, so that it follows a change of workload within the few drafts a loaded batch verifies."""
CALIBRATION_PRIOR = 4.0
"""The weight, in verified tokens, of where a calibration starts: the engine's at 1 (the features'
estimates taken at their word), a request's at the engine's."""
MAX_P = 0.999
"""No draft token is certain."""
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


CALIBRATION_DECAY = 0.5 ** (1 / CALIBRATION_HALF_LIFE)


@dataclasses.dataclass
class Calibration:
    """Acceptances expected by the features' estimates and realised, over verified tokens."""

    expected: float = 0.0
    realized: float = 0.0

    def add(self, outcome: Calibration, decay: float = 1.0) -> None:
        self.expected = self.expected * decay + outcome.expected
        self.realized = self.realized * decay + outcome.realized

    def factor(self) -> float:
        """What a request with no evidence of its own is priced with, if this is the engine's."""
        return float(calibration(self.expected, self.realized, 0.0, 0.0))


@jitable
def calibration(engine_expected, engine_realized, expected, realized):  # type: ignore[no-untyped-def]
    """The factor a request's reach is priced with: realised over expected acceptances, the
    engine's (for its kind of request) drawn towards 1 and the request's towards the engine's,
    each by `CALIBRATION_PRIOR` tokens of belief."""
    engine = (engine_realized + CALIBRATION_PRIOR) / (engine_expected + CALIBRATION_PRIOR)
    return (realized + CALIBRATION_PRIOR * engine) / (expected + CALIBRATION_PRIOR)


@jitable
def calibrated(p, factor):  # type: ignore[no-untyped-def]
    """`p` priced with a calibration `factor`, which only ever lowers it. A draft priced too high
    costs throughput wherever it is verified, and at high load the cut keeps exactly the drafts
    priced highest, so over-promising is what must be caught; one priced too low costs only a
    chance, and the features learn from it as it is verified. Nor is a factor measured mostly
    on unlikely drafts (long chains at low load) a measure of likely ones."""
    return p * min(factor, 1.0)


class AcceptanceModel:
    """P(accepted | the chain before it was accepted) per feature, learned online."""

    def __init__(self, prior_weight: float = 4.0, half_life: int = 20000) -> None:
        prior = _prior()
        self.accepted = prior * prior_weight
        self.seen = np.full(NUM_FEATURES, prior_weight)
        self._decay = 0.5 ** (1 / half_life) if half_life > 0 else 1.0
        self._floor = prior_weight
        self._probs = (self.accepted / self.seen).tolist()
        self.calibration = Calibration()

    def p(self, feature: int) -> float:
        return self._probs[feature]

    def observe(self, features: Sequence[int], accepted: int) -> Calibration:
        """One verified chain: `features[:accepted]` were accepted, `features[accepted]` (if any)
        rejected; the positions after it say nothing about their own tokens. Returns the chain's
        own calibration evidence (expected and realised acceptances of the touched tokens)."""
        touched = features[:accepted + 1]
        outcome = Calibration()
        if not touched:
            return outcome
        for f in touched:
            outcome.expected += self._probs[f]
        outcome.realized = float(min(accepted, len(touched)))
        self.calibration.add(outcome, CALIBRATION_DECAY ** len(touched))
        decay = self._decay ** len(touched)
        for i, f in enumerate(touched):
            # Decay only what is touched, lazily: each feature keeps its recent history.
            self.accepted[f] *= decay
            self.seen[f] = max(self.seen[f] * decay, self._floor)
            self.seen[f] += 1.0
            if i < accepted:
                self.accepted[f] += 1.0
            self._probs[f] = float(min(self.accepted[f] / self.seen[f], MAX_P))
        return outcome

    def table(self) -> list[float]:
        return list(self._probs)


SAMPLED, GREEDY, PRIOR = 0, 1, 2
"""Rows of the compiled tables: the acceptance of sampled requests, of greedy ones (each learned
from its own kind), and the prior, which never learns (seeded requests draft by it)."""


class AcceptanceType(RecordType):
    pass


class Acceptance(structref.StructRefProxy):
    """The compiled acceptance model of both kinds of request (a record)."""


ACCEPTANCE = define_record(AcceptanceType, Acceptance, [
    ("accepted", F64_2D),  # [SAMPLED, GREEDY or PRIOR, feature]: decayed acceptances
    ("seen", F64_2D),  # decayed verifications
    ("p", F64_2D),  # the estimate
    ("floor", types.float64),  # `seen` decays no lower (the prior's weight)
    ("decay_powers", F64),  # decay ** n: the same powers the reference computes
    ("expected", F64),  # [row]: the engine's calibration (`Calibration`) per kind of request
    ("realized", F64),
    ("calibration_powers", F64),  # CALIBRATION_DECAY ** n
])


def acceptance_tables(max_chain: int) -> dict[str, np.ndarray | float]:
    """The compiled model's arrays, as a fresh `AcceptanceModel` holds them (one row each for
    SAMPLED, GREEDY and PRIOR), for chains of up to `max_chain` tokens."""
    model = AcceptanceModel()
    rows = len((SAMPLED, GREEDY, PRIOR))
    return {
        "accepted": np.stack([model.accepted] * rows).astype(np.float64),
        "seen": np.stack([model.seen] * rows).astype(np.float64),
        "p": np.stack([np.array(model.table())] * rows),
        "floor": float(model._floor),
        # Precomputed in Python, so that no pow() of compiled code can differ in the last bit.
        "decay_powers": np.array([model._decay ** n for n in range(max_chain + 2)]),
        "calibration_powers": np.array([CALIBRATION_DECAY ** n for n in range(max_chain + 2)]),
        "expected": np.zeros(rows),
        "realized": np.zeros(rows),
    }


@kernel
def new_acceptance(accepted: np.ndarray, seen: np.ndarray, p: np.ndarray, floor: float,
                   decay_powers: np.ndarray, calibration_powers: np.ndarray,
                   expected: np.ndarray, realized: np.ndarray) -> Acceptance:
    """A record over these arrays (not copies: Python reads `p`, `expected` and `realized`
    where the kernels write them)."""
    model = structref.new(ACCEPTANCE)
    model.accepted, model.seen, model.p = accepted, seen, p
    model.floor, model.decay_powers = floor, decay_powers
    model.calibration_powers, model.expected, model.realized = (calibration_powers, expected,
                                                                realized)
    return model


@kernel
def learn(model: Acceptance, row: int, features: np.ndarray, touched: int,
          accepted: int) -> tuple[float, float]:
    """`AcceptanceModel.observe` of one verified chain: its first `touched` features, of which
    the first `accepted` were accepted; returns its calibration evidence (expected, realised).
    The PRIOR row never learns."""
    if touched == 0 or row == PRIOR:
        return 0.0, 0.0
    expected = 0.0
    for i in range(touched):
        expected += model.p[row, features[i]]
    realized = float(min(accepted, touched))
    powers = model.calibration_powers[touched]
    model.expected[row] = model.expected[row] * powers + expected
    model.realized[row] = model.realized[row] * powers + realized
    decay, floor = model.decay_powers[touched], model.floor
    for i in range(touched):
        f = features[i]
        model.accepted[row, f] *= decay
        model.seen[row, f] = max(model.seen[row, f] * decay, floor)
        model.seen[row, f] += 1.0
        if i < accepted:
            model.accepted[row, f] += 1.0
        model.p[row, f] = min(model.accepted[row, f] / model.seen[row, f], MAX_P)
    return expected, realized
