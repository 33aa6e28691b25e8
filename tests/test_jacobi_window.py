import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lookahead.reference.jacobi_window import JacobiWindow


def window(n=3, max_key_len=1, seed=0, prompt=(10, 11, 12, 13), stops=frozenset()):
    return JacobiWindow(n, max_key_len, seed, np.array(prompt, dtype=np.int64), stops)


def test_iterate_after_first_rejection_becomes_position_exact_guesses():
    w = window()
    context = np.array([1, 2, 3, 4, 5])
    drafts = np.array([6, 70, 80, 90])
    argmax = np.array([6, 7, 8, 9])  # first draft right, second wrong
    w.observe(context, base=5, drafts=drafts, argmax=argmax, accepted=1)
    # committed: 6 (draft) and 7 (the correction) at indices 5 and 6; next unknown index is 7
    assert w.anchor == 7
    assert w.guesses_from(7).tolist() == [8, 9]
    assert w.guesses_from(8).tolist() == [9]
    assert w.guesses_from(6).tolist() == []


def test_harvested_ngrams_end_in_a_prediction_made_from_their_prefix():
    w = window(n=3)
    context = np.array([1, 2, 3, 4, 5])
    drafts = np.array([6, 70, 80, 90])
    argmax = np.array([6, 7, 8, 9])
    h = w.observe(context, base=5, drafts=drafts, argmax=argmax, accepted=1)
    inputs = np.concatenate([context, drafts])
    grams = [(int(h.seq[s]), tuple(c)) for s, c in zip(h.starts, h.conts.tolist(), strict=True)]
    # only positions past the first rejection (j = 2, 3): the model predicted argmax[j] after
    # seeing inputs[base + j - 2], inputs[base + j - 1]
    assert grams == [(int(inputs[5]), (70, 8)), (int(inputs[6]), (80, 9))]


def test_stop_tokens_never_become_guesses():
    w = window(stops=frozenset({2}))
    w.observe(np.array([5, 6]), base=2, drafts=np.array([1, 1, 1]), argmax=np.array([0, 2, 2]),
              accepted=0)
    guesses = w.guesses_from(3)
    assert len(guesses) == 2 and 2 not in guesses.tolist()
    assert set(guesses.tolist()) <= {10, 11, 12, 13}


def test_random_fill_is_seeded_and_drawn_from_the_prompt():
    a, b, c = window(seed=1), window(seed=1), window(seed=2)
    fa, fb, fc = (w.random_fill(50).tolist() for w in (a, b, c))
    assert fa == fb
    assert fa != fc
    assert set(fa) <= {10, 11, 12, 13}


def test_reset_forgets_guesses():
    w = window()
    w.observe(np.array([1]), base=1, drafts=np.array([5, 5]), argmax=np.array([4, 4]), accepted=0)
    w.reset()
    assert w.guesses_from(w.anchor).tolist() == []


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(2, 5), max_key_len=st.integers(1, 3))
def test_harvest_invariants(data, n, max_key_len):
    base = data.draw(st.integers(1, 12))
    context = np.array(data.draw(st.lists(st.integers(0, 50), min_size=base, max_size=base)))
    k = data.draw(st.integers(1, 8))
    drafts = np.array(data.draw(st.lists(st.integers(0, 50), min_size=k, max_size=k)))
    argmax = np.array(data.draw(st.lists(st.integers(0, 50), min_size=k, max_size=k)))
    accepted = data.draw(st.integers(0, k))
    w = window(n=n, max_key_len=max_key_len)
    h = w.observe(context, base, drafts, argmax, accepted)
    inputs = np.concatenate([context, drafts])
    js = [j for j in range(accepted + 1, k) if base + j - (n - 1) >= 0]
    assert len(h.starts) == len(js)
    for s, cont, j in zip(h.starts, h.conts, js, strict=True):
        first = base + j - (n - 1)
        assert cont[-1] == argmax[j]
        assert cont[:-1].tolist() == inputs[first + 1:base + j].tolist()
        # keys of every length up to max_key_len end at the n-gram's first token; context that
        # does not exist (before the first token) is marked -1
        key_context = h.seq[s - max_key_len + 1:s + 1].tolist()
        expected = [int(inputs[i]) if i >= 0 else -1
                    for i in range(first - max_key_len + 1, first + 1)]
        assert key_context == expected
    assert w.anchor == base + accepted + 1
    assert w.guesses_from(w.anchor).tolist() == argmax[accepted + 1:].tolist()


def test_ngrams_follow_the_diagonal_of_issued_guesses():
    """A guess was predicted after its own input a step earlier, not after the chain's other
    inputs, so its n-gram continues its diagonal (LADE's lookahead-window harvest)."""
    w = window(n=3, max_key_len=1)
    w.observe(np.array([1, 2, 3]), base=3, drafts=np.array([10, 20, 30]),
              argmax=np.array([11, 21, 31]), accepted=0)
    assert w.guesses_from(4).tolist() == [21, 31]
    chain = np.array([21, 31, 40])
    w.issue(4, chain.tolist())
    h = w.observe(np.array([1, 2, 3, 11]), base=4, drafts=chain, argmax=np.array([50, 60, 70]),
                  accepted=0)
    grams = [(int(h.seq[s]), tuple(c)) for s, c in zip(h.starts, h.conts.tolist(), strict=True)]
    # 21 was predicted after 10 and 31 after 20 (the previous step's inputs at their diagonals)
    assert grams == [(10, (21, 60)), (20, (31, 70))]


def test_a_token_that_is_not_the_guess_for_its_position_keeps_its_causal_inputs():
    w = window(n=3, max_key_len=1)
    w.observe(np.array([1, 2, 3]), base=3, drafts=np.array([10, 20, 30]),
              argmax=np.array([11, 21, 31]), accepted=0)
    w.issue(4, [22, 31])  # 22 is not the guess for index 4 (21); 31 is the one for index 5
    h = w.observe(np.array([1, 2, 3, 11]), base=4, drafts=np.array([22, 31]),
                  argmax=np.array([50, 60]), accepted=0)
    grams = [(int(h.seq[s]), tuple(c)) for s, c in zip(h.starts, h.conts.tolist(), strict=True)]
    assert grams == [(11, (22, 60))]


def test_a_chain_cut_before_the_issued_guesses_is_harvested_from_its_inputs():
    """The scheduler may verify fewer tokens than the pool candidate that preceded the guesses."""
    w = window(n=2, max_key_len=1)
    w.observe(np.array([1, 2, 3]), base=3, drafts=np.arange(10, 90, 10),
              argmax=np.arange(11, 91, 10), accepted=0)
    # the next chain: three candidate tokens, then the guesses for token indices 7, 8, 9
    assert w.guesses_from(7).tolist()[:3] == [51, 61, 71]
    w.issue(4, [7, 8, 9, 51, 61, 71])
    h = w.observe(np.array([1, 2, 3, 11]), base=4, drafts=np.array([7, 8]),
                  argmax=np.array([50, 60]), accepted=0)
    grams = [(int(h.seq[s]), tuple(c)) for s, c in zip(h.starts, h.conts.tolist(), strict=True)]
    assert grams == [(7, (60,))]
