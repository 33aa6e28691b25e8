"""The compiled drafter against the reference: the same random traffic through the simulated engine
drives both (`Twin` hands every call to each), and every step's chains must be identical, as must
the statistics. Traffic: arrivals and finishes, rollbacks, skipped proposals, chains the scheduler
cut short, per-request options and namespaces, prompt masks, stop tokens and min_tokens, greedy,
sampled and seeded requests, adaptive chains with deterministic step times."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_lookahead import context_index, step
from vllm_lookahead.config import (
    MAX_SHARED_TOKENS,
    LookaheadConfig,
    LookaheadConfigError,
    RequestOptions,
)
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.reference.drafter import ReferenceDrafter
from vllm_lookahead.simulation import SimulatedEngine

VOCAB = 24


class Twin:
    """Both drafters behind one interface; `draft_batch` checks that they agree."""

    def __init__(self, cfg, k, max_len, adaptive):
        self.ref = ReferenceDrafter(cfg, k, max_len, adaptive)
        self.new = LookaheadDrafter(cfg, k, max_len, adaptive)
        self.calls = 0
        self.prefill_rows = 0

    def draft_batch(self, req_ids, sampled, num_tokens, token_ids, trajectory, requests,
                    step_seconds=None):
        self.calls += 1
        rows = sum(1 for s in sampled if s)
        self.prefill_rows += len(sampled) - rows
        # Deterministic step times that vary with the load, so the cost model moves.
        seconds = 0.02 + 0.004 * rows + 0.001 * (self.calls % 7)
        want = self.ref.draft_batch(req_ids, sampled, num_tokens, token_ids, trajectory,
                                    requests, seconds)
        got = self.new.draft_batch(req_ids, sampled, num_tokens, token_ids, trajectory,
                                   requests, seconds)
        assert got == want, f"call {self.calls}: chains differ"
        assert self.new.stats.step_counts() == self.ref.stats.step_counts()
        assert self.new.stats.steps == self.ref.stats.steps
        for greedy in (True, False):
            assert (self.new.acceptance[greedy].calibration
                    == self.ref.acceptance[greedy].calibration)
        return got

    def remove(self, req_id):
        self.ref.remove(req_id)
        self.new.remove(req_id)
        # The compiled drafter holds requests still in their prefill too (indexing their prompt).
        sampled_yet = {r for r, h in self.new.states.items() if h.prompt is None}
        assert sampled_yet == set(self.ref.states)


def toy_model(seed):
    """Next token from the last two; most contexts continue a short cycle, so text repeats."""
    rng = random.Random(seed)
    table = {}

    def model(tokens):
        key = (tokens[-2] if len(tokens) > 1 else 0, tokens[-1])
        if key not in table:
            table[key] = (tokens[-1] * 5 + 3) % 9 if rng.random() < 0.7 else rng.randrange(VOCAB)
        return table[key]

    return model


def random_options(rng):
    roll = rng.random()
    if roll < 0.1:
        return RequestOptions(enabled=False)
    if roll < 0.2:
        return RequestOptions(num_speculative_tokens=rng.randint(0, 5))
    if roll < 0.35:
        return RequestOptions(namespace=rng.choice(["a", "b"]))
    if roll < 0.45:
        return RequestOptions(share=False)
    return None


def add_request(eng, rng):
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
    mask = None
    if rng.random() < 0.15 and len(prompt) > 2:
        cut = rng.randint(1, len(prompt) - 1)
        mask = [i >= cut for i in range(len(prompt))]
    stops = frozenset(rng.sample(range(VOCAB), 2)) if rng.random() < 0.3 else frozenset()
    max_new_tokens = rng.choice([None, rng.randint(1, 120)])
    min_tokens = rng.choice([0, 0, rng.randint(1, 60)])
    return eng.add(prompt, random_options(rng), mask, greedy=rng.random() < 0.7,
                   stop_token_ids=stops, max_new_tokens=max_new_tokens,
                   seeded=rng.random() < 0.2, min_tokens=min_tokens)


def drive(seed, cfg, k, adaptive, steps=60, prefill_chunk=None):
    rng = random.Random(seed)
    eng = SimulatedEngine(cfg, k, [], toy_model(seed), seed=seed, adaptive=adaptive,
                          max_len=160, drafter=Twin, prefill_chunk=prefill_chunk)
    live = [add_request(eng, rng) for _ in range(rng.randint(1, 4))]
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.08 and live:
            rid = live.pop(rng.randrange(len(live)))
            eng.finish(rid)
        if roll > 0.85 or not live:
            live.append(add_request(eng, rng))
        live = [r for r in live if len(eng.tokens[r]) < eng.max_len - 2]
        if not live:
            continue
        batch = rng.sample(live, rng.randint(1, len(live)))
        for rid in batch:
            if rng.random() < 0.1:
                eng.drafts[rid] = eng.drafts[rid][:rng.randint(0, len(eng.drafts[rid]))]
            if rng.random() < 0.03 and len(eng.tokens[rid]) > 45:
                del eng.tokens[rid][-rng.randint(1, 3):]  # vLLM discarded output
                eng.drafts[rid] = []
        eng.step(batch, propose=rng.random() > 0.05)
    return eng.drafter


CONFIGS = [
    (LookaheadConfig(), 7),
    (LookaheadConfig(ngram_size=3, guess_set_size=2, max_key_len=1), 5),
    (LookaheadConfig(ngram_size=5, guess_set_size=3, max_key_len=3, shared_pool_tokens=60), 9),
    (LookaheadConfig(ngram_size=2, max_key_len=1, pool_from_prompt=False, seed=3), 4),
]


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_identical_chains_under_random_traffic(config, adaptive):
    cfg, k = CONFIGS[config]
    for seed in range(3):
        twin = drive(seed * 11 + config, cfg, k, adaptive)
        assert twin.calls > 20
        assert twin.new.stats.accepted_tokens > 0


@pytest.mark.parametrize("admit_chunk", [1, 5])
def test_prompts_indexed_during_chunked_prefill_give_the_same_chains(monkeypatch, admit_chunk):
    """vLLM prefills long prompts over several steps; the compiled drafter indexes the prompt
    meanwhile (the reference at the first sample), a few tokens per step or as far as the engine
    has got: every chain must still match."""
    import vllm_lookahead.drafter as drafter_module

    monkeypatch.setattr(drafter_module, "ADMIT_CHUNK", admit_chunk)
    for seed, (config, adaptive) in enumerate([(0, True), (2, False), (2, True)]):
        cfg, k = CONFIGS[config]
        twin = drive(seed * 5 + 1, cfg, k, adaptive, steps=80, prefill_chunk=6)
        assert twin.calls > 20
        assert twin.new.stats.accepted_tokens > 0
        assert twin.prefill_rows > 10


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(2, 6), g=st.integers(1, 4),
       mkl=st.integers(1, 3), w=st.integers(0, 4), adaptive=st.booleans())
def test_identical_chains_hypothesis(seed, n, g, mkl, w, adaptive):
    cfg = LookaheadConfig(ngram_size=n, window_size=w, guess_set_size=g, max_key_len=mkl,
                          shared_pool_tokens=80)
    drive(seed, cfg, n - 1 + w if n - 1 + w > 0 else 1, adaptive, steps=40)


def test_identical_chains_in_a_batch_that_keeps_its_order_while_every_array_grows():
    """vLLM's batch keeps its order between arrivals and departures, and the drafter then reuses
    the last step's slots; here rows keep their order, requests arrive and leave mid-run, and
    the slots, the batch rows and the namespace map all outgrow their first sizes (each growth
    replaces arrays the step kernel holds)."""
    cfg = LookaheadConfig(shared_pool_tokens=300)
    rng = random.Random(7)
    eng = SimulatedEngine(cfg, 7, [], toy_model(7), seed=7, adaptive=True, max_len=160,
                          drafter=Twin, shuffle_rows=False)
    first = eng.drafter.new
    sizes = first._num_slots, first._buffers.rows, len(first._namespaces)
    live, reused = [], 0
    for round_ in range(70):
        if round_ % 3 == 0 and len(live) < 40:
            live += [eng.add([rng.randrange(VOCAB) for _ in range(rng.randint(2, 30))],
                             RequestOptions(namespace=f"ns{len(eng.tokens) % 12}"))
                     for _ in range(4)]
        if round_ % 7 == 6:
            eng.finish(live.pop(rng.randrange(len(live))))
        live = [r for r in live if len(eng.tokens[r]) < eng.max_len - 2]
        eng.step(live)
        reused += first._steady_rows is not None
    assert first._num_slots > sizes[0] and first._buffers.rows > sizes[1]
    assert len(first._namespaces) > sizes[2]
    assert reused > 20 and first.stats.accepted_tokens > 0


def test_rows_that_keep_their_order_after_a_discarded_sample_or_a_reused_id():
    """The same rows again reuse the last step's slots, unless a row sampled nothing in between
    (vLLM discarded it) or its id now names a new request: both must draft as the reference."""
    from vllm_lookahead.trajectory import Requests

    twin = Twin(LookaheadConfig(), 7, 64, False)
    requests = Requests(reports_removals=True)
    model = toy_model(1)
    text = {"a": [1, 2, 3, 1, 2], "b": [4, 5, 6, 4, 5]}
    for rid, tokens in text.items():
        requests.add(rid, len(tokens))

    def step(samples):
        for rid, n in zip(text, samples, strict=True):
            for _ in range(n):
                text[rid].append(model(text[rid]))
        rows = list(text)
        tokens = np.zeros((2, 64), dtype=np.int32)
        for row, rid in enumerate(rows):
            tokens[row, :len(text[rid])] = text[rid]
        return twin.draft_batch(rows, [text[r][len(text[r]) - n:] for r, n in
                                       zip(rows, samples, strict=True)],
                                np.array([len(text[r]) for r in rows]), tokens, None, requests)

    for samples in ((1, 1), (1, 1), (1, 1), (1, 0), (1, 1), (2, 1)):
        step(samples)
    twin.remove("b")
    requests.remove("b")
    text["b"] = [7, 8, 9, 7, 8]
    requests.add("b", 5)
    for samples in ((1, 1), (1, 1)):
        assert step(samples)[1]


def test_warm_up_leaves_no_trace():
    """A warmed-up drafter drafts what a fresh one does: the warm-up request's output reaches no
    shared corpus, and what warm-up replaced is what the step kernel works on."""
    chains = []
    for warm in (False, True):
        eng = SimulatedEngine(LookaheadConfig(), 7, [], toy_model(3), seed=3, adaptive=True,
                              max_len=200)
        if warm:
            eng.drafter.warm_up()
        assert eng.drafter.snapshot()["shared_tokens"] == 0
        rng = random.Random(3)
        for _ in range(3):
            eng.add([rng.randrange(VOCAB) for _ in range(20)])
        seen = []
        for _ in range(15):  # at most 8 tokens a step: within max_len
            eng.step(list(eng.tokens))
            seen.append(dict(eng.drafts))
        chains.append((seen, eng.drafter.snapshot(), eng.drafter.acceptance[True].table()))
    assert chains[0] == chains[1]
    assert any(any(d) for d in chains[0][0][-1].values())


def test_long_prompt_index_matches_the_reference():
    """A repetitive 3000-token prompt: matches at every order, many inconsistent keys."""
    rng = random.Random(1)
    phrase = [rng.randrange(50) for _ in range(40)]
    prompt = [t if rng.random() > 0.05 else rng.randrange(50) for t in phrase * 75]
    eng = SimulatedEngine(LookaheadConfig(), 7, [prompt], toy_model(4), max_len=3200,
                          drafter=Twin)
    eng.run(40)


def test_the_memory_budget_holds_through_a_soak():
    """Long prompts, arrivals and finishes, a shared corpus, under a 1 MiB budget: after every
    step and every finish the drafter holds at most the budget, it evicts to get there, and what
    it reports is what its arrays hold."""
    budget = 1 << 20
    cfg = LookaheadConfig(memory_budget_mib=1, shared_pool_tokens=200_000)
    eng = SimulatedEngine(cfg, 7, [], toy_model(2), max_len=6000)
    rng = random.Random(0)
    live = []
    for round_ in range(120):
        if len(live) < 6 and rng.random() < 0.3:
            live.append(eng.add([rng.randrange(1000) for _ in range(rng.randint(100, 4000))],
                                random_options(rng)))
        if live and rng.random() < 0.08:
            eng.finish(live.pop(rng.randrange(len(live))))
            assert eng.drafter.nbytes() <= budget
        live = [r for r in live if len(eng.tokens[r]) < eng.max_len - 10]
        if live:
            eng.step(list(live))
        drafter = eng.drafter
        assert drafter.nbytes() <= budget, round_
    snapshot = drafter.snapshot()
    assert snapshot["memory_evictions"] > 0
    assert 0 < snapshot["pool_bytes"] <= snapshot["memory_budget_bytes"] == budget
    assert step.held_bytes(drafter._state) == drafter._memory[0]


def test_the_compiled_cost_model_fits_bit_for_bit_alike():
    from numba import njit

    from vllm_lookahead import step_cost

    @njit
    def cost_observe_compiled(cells, rows, tokens, seconds):
        step_cost.observe(cells[0], rows, tokens, seconds)

    plain = step_cost.CostModel((0.04, 0.008, 0.003))
    compiled = step_cost.CostModel((0.04, 0.008, 0.003))
    rng = random.Random(3)
    for _ in range(500):
        rows = rng.randint(1, 64)
        args = (float(rows), float(rows + rng.randint(0, 7 * rows)), rng.uniform(0.01, 0.5))
        plain.observe(*args)
        cost_observe_compiled(compiled.cells, *args)
        assert plain.theta.tolist() == compiled.theta.tolist()
    assert plain.observations == compiled.observations > 400


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), vocab=st.integers(2, 6), chunk=st.integers(1, 40))
def test_the_text_index_matches_the_reference_whether_built_in_bulk_or_step_by_step(
        seed, vocab, chunk):
    from vllm_lookahead.reference.context_index import ContextIndex

    rng = random.Random(seed)
    text = [rng.randrange(vocab) if rng.random() > 0.02 else -1 for _ in range(700)]
    memory = np.zeros(1, dtype=np.int64)
    bulk, steps = context_index.new_text_index(memory), context_index.new_text_index(memory)
    context_index.extend(bulk, np.array(text, np.int32))
    for i in range(0, len(text), chunk):
        context_index.extend(steps, np.array(text[i:i + chunk], np.int32))
    reference = ContextIndex()
    reference.extend(text)
    for _ in range(50):
        start = rng.randrange(len(text))
        ctx = text[start:start + rng.randint(1, 20)]
        if rng.random() < 0.3:
            ctx = [*ctx, rng.randrange(vocab)]
        want = reference.match(ctx)
        want = (0, -1, 0) if want is None else (want.length, want.end, int(want.consistent))
        array = np.array(ctx, dtype=np.int64)
        for index in (bulk, steps):
            assert context_index.longest_match(index, array) == want


def test_every_text_fits_what_an_index_entry_addresses():
    # A namespace's text: what it retains, a quarter more before a rebuild, one more sequence.
    assert MAX_SHARED_TOKENS + MAX_SHARED_TOKENS // 4 + MAX_SHARED_TOKENS + 2 < \
        context_index.MAX_TEXT
    LookaheadDrafter(LookaheadConfig(), 8, context_index.MAX_TEXT - 9)
    with pytest.raises(LookaheadConfigError, match="smaller --max-model-len"):
        LookaheadDrafter(LookaheadConfig(), 8, context_index.MAX_TEXT - 8)


FILLED_PROMPT_LEN = 3 * 4096 // 5 - 1
"""Distinct tokens that, with the first sample indexed too (2 457 keys), fill every order's table
of 4 096 entries to the load of 3/5 it is sized for."""


@pytest.mark.parametrize(("max_new_tokens", "rebuilt"), [(None, True), (64, False)])
def test_an_index_sized_for_the_output_is_not_rebuilt_while_the_request_decodes(
        max_new_tokens, rebuilt):
    """A prompt of tokens never repeated, as long as fills every order's table to the load it is
    sized for (3/5 of 4096 entries). Sized for the prompt alone, the tables are rehashed from the
    first output tokens on; sized at admission for the `max_tokens` vLLM reports, never while it
    decodes."""
    prompt_len = FILLED_PROMPT_LEN
    eng = SimulatedEngine(LookaheadConfig(), 7, [], toy_model(1), max_len=prompt_len + 100)
    rid = eng.add(list(range(100, 100 + prompt_len)), max_new_tokens=max_new_tokens)
    eng.step([rid])
    index = step.request_index(eng.drafter._state, eng.drafter.states[rid].slot)
    admitted = context_index.table_bits(index)
    assert (admitted == 12).all() == (max_new_tokens is None)  # 4096 entries: at the limit
    eng.run(64)
    assert context_index.length_of(index) >= prompt_len + 64
    assert (context_index.table_bits(index) != admitted).any() == rebuilt


def test_a_growing_index_rehashes_one_table_per_step():
    """Past the headroom, a decoding request's tables fill at the same rate; each is grown in a
    step of its own, not all of them in one (each rehash stalls the step that does it)."""
    prompt_len = FILLED_PROMPT_LEN
    eng = SimulatedEngine(LookaheadConfig(), 7, [], lambda tokens: 5000 + len(tokens),
                          max_len=prompt_len + 41 * 8)
    rid = eng.add(list(range(100, 100 + prompt_len)))  # every output token new
    eng.step([rid])
    index = step.request_index(eng.drafter._state, eng.drafter.states[rid].slot)
    bits = [context_index.table_bits(index)]
    for _ in range(40):
        eng.step([rid])
        bits.append(context_index.table_bits(index))
    assert (bits[0] == 12).all() and (bits[-1] == 13).all()
    assert all((a != b).sum() <= 1 for a, b in itertools.pairwise(bits))
