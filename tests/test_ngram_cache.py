import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lookahead.ngram_cache import NGramPool, Origin


def arr(*tokens):
    return np.array(tokens, dtype=np.int64)


def test_add_sequence_stores_every_ngram_under_first_token_and_longer_keys():
    pool = NGramPool(ngram_size=3, capacity=4, max_key_len=2)
    pool.add_sequence(arr(1, 2, 3, 4, 5), 0, Origin.PROMPT)
    assert pool.continuations((1,)) == [(2, 3)]
    assert pool.continuations((2,)) == [(3, 4)]
    assert pool.continuations((3,)) == [(4, 5)]
    assert pool.continuations((1, 2)) == [(3, 4)]
    assert pool.continuations((4,)) == []  # no room for a full continuation


def test_lookup_prefers_the_longest_matching_key():
    pool = NGramPool(ngram_size=2, capacity=4, max_key_len=2)
    pool.add_sequence(arr(7, 1, 8, 9, 1, 5), 0, Origin.OUTPUT)
    assert pool.lookup(arr(0, 1)) == ((5,), Origin.OUTPUT)  # (1,) → most recent: 5
    assert pool.lookup(arr(7, 1)) == ((8,), Origin.OUTPUT)  # (7, 1) → 8
    assert pool.lookup(arr(3)) is None


def test_lru_refresh_and_eviction():
    pool = NGramPool(ngram_size=2, capacity=2, max_key_len=1)
    for nxt in (1, 2, 1, 3):  # 1 is refreshed, so 2 is the oldest when 3 arrives
        pool.add(arr(0, nxt), np.array([0]), arr(nxt)[:, None], Origin.OUTPUT)
    assert pool.continuations((0,)) == [(1,), (3,)]
    assert len(pool) == 2


def test_origin_is_where_the_ngram_was_first_seen():
    pool = NGramPool(ngram_size=2, capacity=2, max_key_len=1)
    pool.add(arr(0), np.array([0]), arr(5)[:, None], Origin.TRAJECTORY)
    pool.add(arr(0), np.array([0]), arr(5)[:, None], Origin.OUTPUT)
    assert pool.lookup(arr(0)) == ((5,), Origin.TRAJECTORY)


class ReferencePool:
    """The pool's contract, written as plainly as possible."""

    def __init__(self, n, capacity, max_key_len):
        self.n, self.capacity, self.max_key_len = n, capacity, max_key_len
        self.table = {}

    def add_sequence(self, seq):
        for s in range(len(seq) - self.n + 1):
            cont = tuple(seq[s + 1:s + self.n])
            for k in range(1, self.max_key_len + 1):
                if s - k + 1 >= 0:
                    bucket = self.table.setdefault(tuple(seq[s - k + 1:s + 1]), [])
                    if cont in bucket:
                        bucket.remove(cont)
                    elif len(bucket) == self.capacity:
                        bucket.pop(0)
                    bucket.append(cont)

    def lookup(self, context):
        for k in range(min(self.max_key_len, len(context)), 0, -1):
            bucket = self.table.get(tuple(context[-k:]))
            if bucket:
                return bucket[-1]
        return None


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 5), max_size=30), min_size=1, max_size=4),
       n=st.integers(2, 5), capacity=st.integers(1, 4), max_key_len=st.integers(1, 3),
       context=st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_pool_matches_reference_model(seqs, n, capacity, max_key_len, context):
    pool = NGramPool(n, capacity, max_key_len)
    ref = ReferencePool(n, capacity, max_key_len)
    for seq in seqs:
        pool.add_sequence(np.array(seq, dtype=np.int64), 0, Origin.OUTPUT)
        ref.add_sequence(seq)
    for key, bucket in ref.table.items():
        assert pool.continuations(key) == bucket
        assert len(bucket) <= capacity
    assert len(pool) == sum(len(b) for b in ref.table.values())
    hit = pool.lookup(np.array(context, dtype=np.int64))
    assert (hit[0] if hit else None) == ref.lookup(context)


@settings(max_examples=100, deadline=None)
@given(seq=st.lists(st.integers(0, 9), min_size=2, max_size=40), first=st.integers(0, 40))
def test_add_sequence_from_an_offset_adds_only_later_ngrams(seq, first):
    pool = NGramPool(ngram_size=2, capacity=64, max_key_len=1)
    pool.add_sequence(np.array(seq, dtype=np.int64), first, Origin.OUTPUT)
    expected = {(a, b) for i, (a, b) in enumerate(itertools.pairwise(seq)) if i >= first}
    stored = {(key[0], cont[0]) for key in {(t,) for t in seq} for cont in pool.continuations(key)}
    assert stored == expected


def test_nbytes_grows_with_new_ngrams_not_with_refreshed_ones():
    pool = NGramPool(ngram_size=3, capacity=2, max_key_len=1)
    empty = pool.nbytes()
    pool.add_sequence(arr(1, 2, 3, 1, 4, 5), 0, Origin.OUTPUT)
    held = pool.nbytes()
    assert held > empty
    pool.add_sequence(arr(1, 2, 3, 1, 4, 5), 0, Origin.OUTPUT)
    assert pool.nbytes() == held
    pool.add_sequence(arr(6, 7, 8), 0, Origin.OUTPUT)
    assert pool.nbytes() > held
