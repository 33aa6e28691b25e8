"""The drafter driven by a simulated engine: a deterministic 'model' and vLLM's greedy verification
rule, with batch rows shuffled every step as vLLM's persistent batch does."""

import random

import numpy as np
import pytest

from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.drafter import LookaheadDrafter, Source
from vllm_lookahead.simulation import Requests, SimulatedEngine

VOCAB = 37
MAX_LEN = 256


PERMUTATION = random.Random(5).sample(range(VOCAB), VOCAB)


def model(tokens):
    """Greedy next token of a toy model: a fixed permutation of the last token, so outputs cycle
    and every (x, model(x)) pair the trajectory reveals is true."""
    return PERMUTATION[tokens[-1]]


def successor(tokens):
    """A toy model that counts: its output reaches tokens that the prompt names only later, so the
    Jacobi trajectory, walking ahead from prompt tokens, sees those transitions first."""
    return (tokens[-1] + 1) % VOCAB


def greedy(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(model(toks))
    return toks


def simulate(cfg, k, prompts, seed=0, model=model, adaptive=False, max_len=MAX_LEN):
    return SimulatedEngine(cfg, k, prompts, model, seed=seed, adaptive=adaptive, max_len=max_len)


PROMPTS = [[1, 2], [3, 4, 5, 6], [9, 9, 9], [11, 30, 2, 8, 19]]


def test_outputs_follow_the_model_and_take_fewer_steps():
    eng = simulate(LookaheadConfig(ngram_size=3, window_size=4), k=6, prompts=PROMPTS)
    steps = eng.run(60)
    for i, p in enumerate(PROMPTS):
        toks = eng.tokens[f"req-{i}"]
        assert toks == greedy(p, len(toks) - len(p))
    assert steps < 60 / 2
    assert eng.drafter.stats.resyncs == 0


def test_trajectory_ngrams_are_proposed_and_accepted():
    eng = simulate(LookaheadConfig(ngram_size=3, window_size=5, pool_from_prompt=False), k=6,
                 prompts=[[30, 31, 32, 33, 2]], model=successor)
    eng.run(34)
    s = eng.drafter.stats
    assert s.trajectory_ngrams > 0
    assert s.drafted_by_source[Source.CANDIDATE_TRAJECTORY] > 0
    assert s.accepted_by_source[Source.CANDIDATE_TRAJECTORY] > 0


def test_first_trajectory_candidate_comes_from_past_the_first_rejection():
    """Catch the first proposal of a trajectory n-gram and check where it was harvested."""
    eng = simulate(LookaheadConfig(ngram_size=3, window_size=5, pool_from_prompt=False), k=6,
                 prompts=[[30, 31, 32, 33, 2]], model=successor)
    rid = "req-0"
    harvested = []
    original_observe = None

    def recording_observe(context, base, drafts, argmax, accepted):
        h = original_observe(context, base, drafts, argmax, accepted)
        harvested.extend((int(h.seq[s]), tuple(c)) for s, c in zip(h.starts, h.conts.tolist(),
                                                                   strict=True))
        return h

    eng.step([rid])
    state = eng.drafter.states[rid]
    original_observe = state.window.observe
    state.window.observe = recording_observe
    for _ in range(40):
        eng.step([rid])
        if state.layout and state.layout[0][1] == Source.CANDIDATE_TRAJECTORY:
            toks = eng.tokens[rid]
            cand = tuple(eng.drafts[rid][:state.layout[0][0]])
            assert (toks[-1], cand) in harvested
            break
    else:
        pytest.fail("no trajectory candidate was proposed")


def test_chain_never_exceeds_k_or_max_model_len():
    k = 8
    eng = simulate(LookaheadConfig(ngram_size=4, window_size=5), k=k, prompts=[[1, 2]])
    rid = "req-0"
    while len(eng.tokens[rid]) < MAX_LEN - 1:
        eng.step([rid])
        assert len(eng.drafts[rid]) <= k
        assert len(eng.drafts[rid]) <= max(0, MAX_LEN - len(eng.tokens[rid]) - 1)


def test_rollback_and_skipped_steps_resync_from_committed_tokens():
    eng = simulate(LookaheadConfig(ngram_size=3, window_size=3), k=5, prompts=[[1, 2, 3]])
    rid = "req-0"
    for _ in range(5):
        eng.step([rid])
    eng.step([rid], propose=False)  # vLLM skipped propose (drafter input too long)
    eng.step([rid])
    assert eng.drafter.stats.resyncs == 1
    del eng.tokens[rid][-3:]  # vLLM discarded output
    eng.drafts[rid] = []
    eng.step([rid])
    assert eng.drafter.stats.resyncs == 2
    eng.run(30)
    toks = eng.tokens[rid]
    assert toks == greedy([1, 2, 3], len(toks) - 3)


def test_finished_and_reused_ids_get_fresh_state():
    eng = simulate(LookaheadConfig(), k=7, prompts=[[1, 2, 3, 4]])
    eng.run(10)
    old = eng.drafter.states["req-0"]
    eng.requests.add("req-0", 4)  # aborted and resubmitted under the same id
    eng.tokens["req-0"] = [5, 6, 7, 8]
    eng.drafts["req-0"] = []
    eng.step(["req-0"])
    assert eng.drafter.states["req-0"] is not old
    eng.drafter.remove("req-0")
    assert eng.drafter.states == {}


def test_rows_without_a_sample_get_no_drafts():
    drafter = LookaheadDrafter(LookaheadConfig(), 7, MAX_LEN)
    reqs = Requests()
    reqs.add("a", 3)
    out = drafter.draft_batch(["a"], [[]], np.array([3]), np.zeros((1, MAX_LEN), np.int32), None,
                              reqs)
    assert out == [[]]
    assert drafter.states == {}


def test_same_seed_same_chains_other_seed_other_padding():
    def chains(seed):
        eng = simulate(LookaheadConfig(ngram_size=3, window_size=4, seed=seed), k=6,
                     prompts=[[3, 4, 5, 6, 7, 8]])
        out = []
        for _ in range(6):
            eng.step(["req-0"])
            out.append(list(eng.drafts["req-0"]))
        return out

    assert chains(1) == chains(1)
    assert chains(1) != chains(2)


def test_adaptive_chain_follows_acceptance():
    """Shrinks to the accepted length + 1 after a rejection, doubles after full acceptance."""
    k = 8
    eng = simulate(LookaheadConfig(ngram_size=3, window_size=6), k=k, prompts=PROMPTS[:1],
                 adaptive=True)
    rid = "req-0"
    eng.step([rid])
    assert len(eng.drafts[rid]) == k  # no history yet: the full chain
    while len(eng.tokens[rid]) < MAX_LEN - 1:
        drafted = list(eng.drafts[rid])
        before = len(eng.tokens[rid])
        eng.step([rid])
        accepted = len(eng.tokens[rid]) - before - 1
        expected = accepted + 1 if accepted < len(drafted) else min(k, 2 * len(drafted))
        assert len(eng.drafts[rid]) == max(0, min(expected, MAX_LEN - len(eng.tokens[rid]) - 1))
    toks = eng.tokens[rid]
    assert toks == greedy(PROMPTS[0], len(toks) - len(PROMPTS[0]))
