"""The drafter driven by a simulated engine: a deterministic 'model' and vLLM's greedy verification
rule, with batch rows shuffled every step as vLLM's persistent batch does. The compiled drafter
(the default) runs them, except where a test looks inside the reference's per-request objects
(`ReferenceDrafter`); tests/test_compiled_drafter.py checks that both propose the same chains."""

import random

import numpy as np
import pytest

from vllm_lookahead.acceptance import Calibration
from vllm_lookahead.config import LookaheadConfig, RequestOptions
from vllm_lookahead.counters import Source
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.reference.drafter import ReferenceDrafter
from vllm_lookahead.simulation import SimulatedEngine
from vllm_lookahead.trajectory import Requests

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


def simulate(cfg, k, prompts, seed=0, model=model, adaptive=False, max_len=MAX_LEN,
             drafter=LookaheadDrafter):
    return SimulatedEngine(cfg, k, prompts, model, seed=seed, adaptive=adaptive, max_len=max_len,
                           drafter=drafter)


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
    assert s.drafted_by_source[Source.TRAJECTORY] > 0
    assert s.accepted_by_source[Source.TRAJECTORY] > 0


def test_first_trajectory_candidate_comes_from_past_the_first_rejection():
    """Catch the first proposal of a trajectory n-gram and check where it was harvested."""
    eng = simulate(LookaheadConfig(ngram_size=3, window_size=5, pool_from_prompt=False), k=6,
                   prompts=[[30, 31, 32, 33, 2]], model=successor, drafter=ReferenceDrafter)
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
        sources = state.issued.sources
        if sources and sources[0] == Source.TRAJECTORY:
            toks = eng.tokens[rid]
            run = len(sources) - sources[::-1].index(Source.TRAJECTORY) if all(
                s == Source.TRAJECTORY for s in sources) else sources.index(
                next(s for s in sources if s != Source.TRAJECTORY))
            cand = tuple(eng.drafts[rid][:min(run, 2)])
            assert any(key == toks[-1] and c[:len(cand)] == cand for key, c in harvested)
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


@pytest.mark.parametrize("drafter", [LookaheadDrafter, ReferenceDrafter])
def test_a_chain_below_min_tokens_leaves_its_bonus_token_inside_the_mask(drafter):
    """vLLM masks the stop tokens at the bonus position by the step's start, so a chain that could
    be accepted whole up to `min_tokens` would hide a stop emitted there: below it, a chain ends
    one short of the mask's end; from it on, the chain is free."""
    k, prompt, min_tokens = 8, [1, 2], 20
    eng = simulate(LookaheadConfig(ngram_size=4, window_size=5), k=k, prompts=[], drafter=drafter)
    rid = eng.add(prompt, stop_token_ids=frozenset({model(prompt)}), min_tokens=min_tokens)
    masked_until = len(prompt) + min_tokens
    capped, longest_after = [], 0
    while len(eng.tokens[rid]) < masked_until + 2 * k:
        eng.step([rid])
        length = len(eng.tokens[rid])
        if length < masked_until:
            room = masked_until - length - 1
            assert len(eng.drafts[rid]) <= room, length
            if room < k:
                capped.append(len(eng.drafts[rid]) == room)
        else:
            longest_after = max(longest_after, len(eng.drafts[rid]))
    assert capped and all(capped)  # the chain fills the room it has: the cap is no tighter
    assert longest_after == k  # the cap ends with the mask


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


@pytest.mark.parametrize("reports_removals", [False, True])
def test_finished_and_reused_ids_get_fresh_state(reports_removals):
    eng = simulate(LookaheadConfig(), k=7, prompts=[[1, 2, 3, 4]])
    eng.requests.reports_removals = reports_removals
    eng.run(10)
    old = eng.drafter.states["req-0"]
    if reports_removals:  # vLLM's removal hook runs before the id is scheduled again
        eng.drafter.remove("req-0")
    # Without the hook, only the owner tells the new request from the old one.
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
    # A request still in its prefill is being admitted: its prompt is indexed meanwhile, and the
    # admission completes at its first sample.
    assert drafter.states["a"].prompt is not None


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


def cycle_model(tokens):
    """Greedy continuation of a phrase that repeats: the request's own text predicts it."""
    return (tokens[-1] + 1) % 7


def test_adaptive_chains_follow_the_step_cost():
    """Tokens are verified where they pay: none when a verified token costs a whole step's worth,
    long chains of a repeating phrase when tokens are cheap; outputs exact either way."""
    prompt = list(range(7)) * 3
    for token_cost, check in ((10.0, lambda lengths: max(lengths) == 0),
                              (1e-6, lambda lengths: max(lengths) >= 6)):
        eng = simulate(LookaheadConfig(), k=8, prompts=[prompt], model=cycle_model,
                       adaptive=True)
        eng.drafter.cost.theta[:] = (0.05, 0.01, token_cost)
        lengths = []
        for _ in range(20):
            eng.step(["req-0"])
            lengths.append(len(eng.drafts["req-0"]))
        assert check(lengths), lengths
        toks = eng.tokens["req-0"]
        assert toks[len(prompt):] == [(toks[len(prompt) - 1] + 1 + i) % 7
                                      for i in range(len(toks) - len(prompt))]


def test_adaptive_cut_keeps_prefixes_of_the_full_chain():
    eng = simulate(LookaheadConfig(), k=8, prompts=PROMPTS, adaptive=True,
                   drafter=ReferenceDrafter)
    drafter = eng.drafter
    full = []
    shortened = []
    original = drafter._cut

    def recording_cut(chains, *args):
        full.append([list(c.tokens) for c in chains])
        original(chains, *args)
        for before, after in zip(full[-1], chains, strict=True):
            assert before[:len(after.tokens)] == after.tokens
            shortened.append(len(after.tokens) < len(before))

    drafter._cut = recording_cut
    eng.run(40)
    # Without a chain the cut shortened, the prefix check above would hold for any cut.
    assert any(shortened)


def test_request_options_cap_or_disable_drafting():
    eng = simulate(LookaheadConfig(), k=8, prompts=[], model=cycle_model)
    off = eng.add(list(range(7)) * 3, RequestOptions(enabled=False))
    capped = eng.add(list(range(7)) * 3, RequestOptions(num_speculative_tokens=3))
    full = eng.add(list(range(7)) * 3)
    for _ in range(10):
        eng.step([off, capped, full])
        assert eng.drafts[off] == []
        assert len(eng.drafts[capped]) == 3  # fixed chains fill the request's whole budget
        assert len(eng.drafts[full]) == 8


def shared_draft(options_first, options_second):
    """Tokens the second request drafts from the shared corpus after the first finished."""
    eng = simulate(LookaheadConfig(), k=8, prompts=[], model=cycle_model)
    first = eng.add([50, 60], options_first)
    eng.run(30)  # 0..6 repeating, seen by the first request only as its output
    eng.finish(first)
    second = eng.add([40, 3], options_second)  # its own text has never seen 3 followed by 4
    eng.step([second])
    eng.step([second])
    return eng.drafter.stats.drafted_by_source[Source.SHARED]


def test_a_finished_request_drafts_for_later_ones_in_its_namespace_only():
    assert shared_draft(None, None) > 0
    assert shared_draft(RequestOptions(namespace="a"), RequestOptions(namespace="a")) > 0
    assert shared_draft(RequestOptions(namespace="a"), RequestOptions(namespace="b")) == 0
    assert shared_draft(RequestOptions(share=False), None) == 0
    assert shared_draft(None, RequestOptions(share=False)) == 0


def test_shared_pool_off():
    eng = simulate(LookaheadConfig(shared_pool_tokens=0), k=8, prompts=[], model=cycle_model)
    first = eng.add([50, 60])
    eng.run(30)
    eng.finish(first)
    eng.add([40, 3])
    eng.run(5)
    assert eng.drafter.stats.drafted_by_source[Source.SHARED] == 0


def test_masked_prompt_positions_are_never_drafted():
    """Positions without a real token id (prompt_embeds, multimodal placeholders) hold whatever
    the runner put there; they are neither copied nor used to pad the window."""
    placeholder = 33
    prompt = [placeholder] * 12 + [1, 2]
    mask = [False] * 12 + [True, True]
    eng = simulate(LookaheadConfig(), k=8, prompts=[], model=lambda t: placeholder)
    rid = eng.add(prompt, prompt_mask=mask)
    eng.step([rid])
    assert placeholder not in eng.drafts[rid]
    assert len(eng.drafts[rid]) == 8  # padded from the real prompt tokens


def test_guess_set_size_changes_the_drafts():
    """G continuations are kept per key and the best-evidenced one is drafted: under key 5, the
    trajectory showed (6, 7) three times, then (8, 9) once. G = 1 keeps only the latest; with
    G = 2 the one seen more often wins."""

    def first_draft(g):
        eng = simulate(LookaheadConfig(ngram_size=3, guess_set_size=g, max_key_len=1,
                                       pool_from_prompt=False), k=2, prompts=[[1, 2, 3, 4, 5]],
                       drafter=ReferenceDrafter)
        eng.step(["req-0"])
        state = eng.drafter.states["req-0"]
        for cont in [(6, 7)] * 3 + [(8, 9)]:
            state.pool.add(np.array([5]), np.array([0]), np.array([cont]))
        return eng.drafter._compose(state, np.array(eng.tokens["req-0"]), 5).tokens

    assert first_draft(1) == [8, 9]
    assert first_draft(2) == [6, 7]


def test_a_chain_is_priced_with_its_requests_calibration():
    """Where verification showed the estimates promise twice what is accepted, every token's
    reach halves (the tokens stay the same); a request whose own drafts were accepted as priced
    is drawn back towards them."""

    def chain_after(engine, own):
        eng = simulate(LookaheadConfig(), k=4, prompts=[[1, 2, 3, 4, 1, 2, 3]],
                       drafter=ReferenceDrafter)
        eng.step(["req-0"])
        eng.drafter.acceptance[True].calibration = engine
        state = eng.drafter.states["req-0"]
        state.calibration = own
        tokens = eng.tokens["req-0"]
        return eng.drafter._compose(state, np.array(tokens), len(tokens))

    honest = chain_after(Calibration(), Calibration())
    doubted = chain_after(Calibration(1000.0, 500.0), Calibration())
    vouched = chain_after(Calibration(1000.0, 500.0), Calibration(20.0, 20.0))
    assert doubted.tokens == honest.tokens and len(honest.tokens) >= 2
    assert doubted.reach[0] == pytest.approx(honest.reach[0] * 0.5, rel=0.01)
    assert doubted.reach[1] == pytest.approx(honest.reach[1] * 0.25, rel=0.02)
    assert doubted.reach[0] < vouched.reach[0] < honest.reach[0]


def seeded_chains(seeded: bool, company: bool) -> list[list[int]]:
    """The chains of one request, alone or in company: after requests that finished in its
    namespace (the corpus knows its text), next to others that teach the acceptance model, with
    step times that vary with the batch (the cost model moves)."""
    cfg = LookaheadConfig(shared_pool_tokens=4096)
    eng = simulate(cfg, k=7, prompts=[], model=cycle_model, adaptive=True)
    calls = [0]
    draft_batch = eng.drafter.draft_batch

    def timed(req_ids, *args, **kwargs):
        calls[0] += 1
        kwargs["step_seconds"] = 0.02 + 0.01 * len(req_ids) + 0.003 * (calls[0] % 4)
        return draft_batch(req_ids, *args, **kwargs)

    eng.drafter.draft_batch = timed
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    if company:
        for _ in range(2):
            rid = eng.add(prompt)
            eng.run(40)
            eng.finish(rid)
        others = [eng.add([5, 3, 5, 8, 9, 7]) for _ in range(3)]
    rid = eng.add(prompt, greedy=False, seeded=seeded)
    chains = []
    for _ in range(12):
        eng.step([rid, *(others if company else [])])
        chains.append(list(eng.drafts[rid]))
    return chains


def test_a_seeded_requests_chains_depend_on_its_own_tokens_only():
    """A seeded request reproduces its tokens only if its drafts do: no shared corpus, no learned
    acceptance, no batch-wide cut may reach them. An unseeded request in the same places drafts
    differently, which is what the seeded one must not."""
    assert seeded_chains(True, company=False) == seeded_chains(True, company=True)
    assert seeded_chains(False, company=False) != seeded_chains(False, company=True)
    assert any(seeded_chains(True, company=True))
