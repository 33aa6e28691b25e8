import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lookahead.reference.ngram_cache import Candidate, NGramPool


def add(pool, seq, starts, conts):
    pool.add(np.array(seq, dtype=np.int64), np.array(starts, dtype=np.int64),
             np.array(conts, dtype=np.int64).reshape(len(starts), -1))


def test_add_stores_under_every_key_length_that_exists():
    pool = NGramPool(ngram_size=3, capacity=4, max_key_len=2)
    add(pool, [-1, 1, 2], [2], [(3, 4)])
    assert pool.continuations((2,)) == [(3, 4)]
    assert pool.continuations((1, 2)) == [(3, 4)]
    add(pool, [-1, 7], [1], [(8, 9)])  # the longer key would hold a missing token
    assert pool.continuations((7,)) == [(8, 9)]
    assert pool.num_keys == 3


def test_candidates_longest_key_first_then_most_recent_with_hits():
    pool = NGramPool(ngram_size=2, capacity=4, max_key_len=2)
    add(pool, [7, 1], [1, 1, 1], [(8,), (9,), (8,)])  # (8,) harvested twice, most recently
    add(pool, [0, 1], [1], [(5,)])
    assert pool.candidates([7, 1]) == [Candidate(2, (8,), 2), Candidate(2, (9,), 1),
                                       Candidate(1, (5,), 1), Candidate(1, (8,), 2),
                                       Candidate(1, (9,), 1)]
    assert pool.candidates([3]) == []


def test_lru_refresh_and_eviction():
    pool = NGramPool(ngram_size=2, capacity=2, max_key_len=1)
    for nxt in (1, 2, 1, 3):  # 1 is refreshed, so 2 is the oldest when 3 arrives
        add(pool, [0], [0], [(nxt,)])
    assert pool.continuations((0,)) == [(1,), (3,)]
    assert len(pool) == 2


class ReferencePool:
    """The pool's contract, written as plainly as possible."""

    def __init__(self, capacity, max_key_len):
        self.capacity, self.max_key_len = capacity, max_key_len
        self.table = {}  # key -> list of [cont, hits], least recently refreshed first

    def add(self, seq, start, cont):
        for k in range(1, self.max_key_len + 1):
            key = tuple(seq[start - k + 1:start + 1])
            if start - k + 1 < 0 or min(key) < 0:
                break
            bucket = self.table.setdefault(key, [])
            hits = next((h for c, h in bucket if c == cont), 0)
            bucket[:] = [[c, h] for c, h in bucket if c != cont]
            if not hits and len(bucket) == self.capacity:
                bucket.pop(0)
            bucket.append([cont, hits + 1])

    def candidates(self, context):
        out = []
        for k in range(min(self.max_key_len, len(context)), 0, -1):
            for cont, hits in reversed(self.table.get(tuple(context[-k:]), [])):
                out.append(Candidate(k, cont, hits))
        return out


@settings(max_examples=200, deadline=None)
@given(grams=st.lists(st.tuples(st.lists(st.integers(-1, 4), min_size=3, max_size=3),
                                st.tuples(st.integers(0, 4), st.integers(0, 4))),
                      max_size=40),
       capacity=st.integers(1, 4), max_key_len=st.integers(1, 3),
       context=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_pool_matches_reference_model(grams, capacity, max_key_len, context):
    pool = NGramPool(3, capacity, max_key_len)
    ref = ReferencePool(capacity, max_key_len)
    for seq, cont in grams:
        if seq[-1] < 0:
            continue
        add(pool, seq, [2], [cont])
        ref.add(seq, 2, cont)
    for key, bucket in ref.table.items():
        assert pool.continuations(key) == [c for c, _ in bucket]
    assert len(pool) == sum(len(b) for b in ref.table.values())
    assert pool.candidates(context) == ref.candidates(context)


def test_nbytes_grows_with_new_ngrams_not_with_refreshed_ones():
    pool = NGramPool(ngram_size=3, capacity=2, max_key_len=1)
    empty = pool.nbytes()
    add(pool, [1, 4], [0, 1], [(2, 3), (5, 6)])
    held = pool.nbytes()
    assert held > empty
    add(pool, [1, 4], [0, 1], [(2, 3), (5, 6)])
    assert pool.nbytes() == held
    add(pool, [6], [0], [(7, 8)])
    assert pool.nbytes() > held
