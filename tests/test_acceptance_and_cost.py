import random

import pytest

from vllm_lookahead.acceptance import (
    CALIBRATION_PRIOR,
    FILL_PRIMARY,
    MATCH_BUCKETS,
    NUM_FEATURES,
    AcceptanceModel,
    calibrated,
    calibration,
    copy_primary,
    feature,
    jacobi_primary,
    pool_primary,
)
from vllm_lookahead.reference.chain import cut_chains
from vllm_lookahead.step_cost import CostModel


def copy_feature(shared, match_len, consistent, support=0):
    return feature(copy_primary(shared, match_len, consistent), support)


def test_features_are_distinct_and_in_range():
    primaries = {FILL_PRIMARY}
    primaries |= {copy_primary(s, m, c) for s in (False, True) for m in MATCH_BUCKETS
                  for c in (False, True)}
    primaries |= {pool_primary(k, h, o) for k in (1, 2) for h in (1, 2, 3) for o in (0, 1, 2)}
    primaries |= {jacobi_primary(o) for o in range(4)}
    features = {feature(p, s) for p in primaries for s in range(3)}
    assert features == set(range(NUM_FEATURES))


def test_agreement_raises_the_prior():
    model = AcceptanceModel()
    for primary in (copy_primary(False, 1, False), pool_primary(1, 1, 0), jacobi_primary(0)):
        assert model.p(feature(primary, 0)) < model.p(feature(primary, 1)) < model.p(
            feature(primary, 2))


def test_acceptance_converges_to_the_observed_rate():
    model = AcceptanceModel(prior_weight=4.0, half_life=0)
    f, g = copy_feature(False, 4, True), feature(pool_primary(1, 1, 0), 0)
    rng = random.Random(0)
    for _ in range(4000):
        # f is accepted 80 % of the time; g, placed after it, 30 % of the time.
        a = 0 if rng.random() > 0.8 else (1 if rng.random() > 0.3 else 2)
        model.observe([f, g], a)
    assert model.p(f) == pytest.approx(0.8, abs=0.03)
    assert model.p(g) == pytest.approx(0.3, abs=0.04)


def test_positions_after_the_first_rejection_teach_nothing():
    model = AcceptanceModel()
    f = feature(jacobi_primary(2), 0)
    before = model.p(f)
    for _ in range(100):
        model.observe([copy_feature(False, 1, False), f], 0)
    assert model.p(f) == before


def test_recent_outcomes_outweigh_old_ones():
    model = AcceptanceModel(prior_weight=4.0, half_life=200)
    f = copy_feature(True, 8, True)
    for _ in range(2000):
        model.observe([f], 1)
    for _ in range(2000):
        model.observe([f], 0)
    assert model.p(f) < 0.1


def test_the_calibration_catches_what_a_lagging_estimate_overpromises():
    """A feature always accepted on one workload and half the time on the next: its estimate,
    learned over thousands of verifications, still believes; the engine's calibration has moved
    to the new workload within a thousand verified tokens."""
    model = AcceptanceModel()
    f = copy_feature(False, 16, True)
    for _ in range(3000):
        model.observe([f], 1)
    rng = random.Random(2)
    for _ in range(1000):
        model.observe([f], int(rng.random() < 0.5))
    engine = model.calibration
    assert model.p(f) > 0.8
    assert model.p(f) * calibration(engine.expected, engine.realized, 0.0, 0.0) == \
        pytest.approx(0.5, abs=0.08)


def test_a_chain_is_evidence_up_to_its_first_rejection():
    model = AcceptanceModel()
    f, g = copy_feature(False, 4, True), feature(jacobi_primary(1), 0)
    p_f, p_g = model.p(f), model.p(g)
    outcome = model.observe([f, g, g], 1)
    assert (outcome.expected, outcome.realized) == (p_f + p_g, 1.0)
    assert model.observe([f, g], 2).realized == 2.0
    assert model.observe([], 0).expected == 0.0


def test_a_calibration_only_ever_lowers_a_price():
    assert calibrated(0.8, 0.5) == pytest.approx(0.4)
    assert calibrated(0.8, 1.5) == 0.8
    assert calibrated(0.999, 1.0) == 0.999


def test_a_request_starts_at_the_engines_calibration_and_moves_to_its_own():
    assert calibration(0.0, 0.0, 0.0, 0.0) == 1.0
    engine = (100.0, 50.0)
    start = calibration(*engine, 0.0, 0.0)
    assert start == pytest.approx((50.0 + CALIBRATION_PRIOR) / (100.0 + CALIBRATION_PRIOR))
    # Its drafts accepted as priced: it leaves the engine's figure behind.
    assert start < calibration(*engine, 4.0, 4.0) < calibration(*engine, 40.0, 40.0) < 1.0
    assert calibration(*engine, 400.0, 400.0) == pytest.approx(1.0, abs=0.01)


def test_cost_model_recovers_a_linear_step_cost():
    cost = CostModel((0.01, 0.01, 0.01), half_life=1000)
    rng = random.Random(1)
    for _ in range(3000):
        rows = rng.randint(1, 16)
        tokens = rows + rng.randint(0, 8 * rows)
        cost.observe(rows, tokens, 0.050 + 0.004 * rows + 0.002 * tokens + rng.gauss(0, 1e-3))
    assert cost.token_cost == pytest.approx(0.002, rel=0.1)
    assert cost.predict(4, 20) == pytest.approx(0.050 + 0.016 + 0.040, rel=0.05)


def test_cost_model_is_not_thrown_by_noise_and_pauses():
    """Constant rows and tokens (nothing to tell a from c) on a machine with noisy step times and
    occasional long pauses: the fit stays near the prior shape, scaled to the step time."""
    cost = CostModel((0.04, 0.008, 0.003))
    rng = random.Random(2)
    for i in range(2000):
        seconds = 0.2 * rng.uniform(0.5, 2.0) * (20 if i % 97 == 0 else 1)
        cost.observe(1, 9, seconds)
    assert 0.0 < cost.token_cost < 0.2 * 0.2
    assert cost.predict(1, 9) == pytest.approx(0.2 * 1.25, rel=0.4)


def test_cut_keeps_what_pays_and_less_as_the_batch_grows():
    cost = CostModel((0.050, 0.010, 0.003))
    chain = [0.9, 0.6, 0.3, 0.1, 0.04, 0.01]
    # One request: a token pays if q > 0.003 * N / T, with N expected tokens in T seconds:
    # 0.9, 0.6 and 0.3 do (N = 2.8 in 72 ms then), 0.1 does not (0.1 < 0.003 * 2.8 / 0.072).
    assert cut_chains([chain], cost) == [3]
    many = cut_chains([chain] * 32, cost)
    assert len(set(many)) <= 2  # equal chains are cut (almost) equally
    assert max(many) < 3
    assert cut_chains([[0.01] * 8] * 64, cost) == [0] * 64  # nothing pays: drafting off


def test_cut_keeps_prefixes():
    cost = CostModel((0.05, 0.01, 0.003))
    chains = [[0.95, 0.9, 0.5, 0.2], [0.5, 0.45, 0.05], [], [0.99] * 8]
    # One threshold for the whole batch: each chain keeps the prefix of its tokens above it,
    # whichever chain a probability sits in.
    assert cut_chains(chains, cost) == [3, 2, 0, 8]
