from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lookahead.context_index import ORDERS, SEPARATOR
from vllm_lookahead.reference.context_index import ContextIndex, SharedCorpus


def reference_match(text, context, orders=ORDERS):
    """The contract, plainly: the longest order k whose context suffix occurs in `text` followed
    by a token, with the latest such occurrence, its count and whether successors agree."""
    best = None
    for k in orders:
        if k > len(context):
            break
        key = list(context[-k:])
        ends = [e for e in range(k - 1, len(text) - 1)
                if text[e - k + 1:e + 1] == key and SEPARATOR not in text[e - k + 1:e + 2]]
        if ends:
            successors = {text[e + 1] for e in ends}
            best = (k, ends[-1], len(ends), len(successors) == 1)
    return best


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.lists(st.integers(0, 3), max_size=25), min_size=1, max_size=4),
       context=st.lists(st.integers(0, 3), min_size=1, max_size=20))
def test_match_is_the_longest_latest_occurrence(chunks, context):
    index = ContextIndex()
    text = []
    for chunk in chunks:  # appended in pieces, as a request's tokens arrive
        index.extend(chunk)
        text += chunk
    got = index.match(context)
    want = reference_match(text, context)
    assert (None if got is None else (got.length, got.end, got.count, got.consistent)) == want


def test_continuation_is_the_text_after_the_match():
    index = ContextIndex()
    index.extend([5, 6, 7, 8, 9, 5, 6])
    m = index.match([1, 5, 6])
    assert (m.length, m.end) == (2, 1)
    assert index.continuation(m.end, 3) == [7, 8, 9]
    assert index.continuation(m.end, 99) == [7, 8, 9, 5, 6]


def test_the_last_token_is_indexed_only_once_its_successor_is_known():
    index = ContextIndex()
    index.extend([1, 2, 3])
    assert index.match([3]) is None
    index.extend([4])
    assert index.match([3]).end == 2


def test_nothing_spans_a_separator():
    index = ContextIndex()
    index.extend([1, 2, SEPARATOR, 3, 4])
    assert index.match([2]) is None  # 2 is followed by the separator
    assert index.match([2, 3]).length == 1  # only [3]: the text has no 2 before 3
    assert index.match([3]).end == 3
    assert index.continuation(0, 5) == [2]


def test_shared_corpus_keeps_its_budget_and_drops_the_oldest():
    corpus = SharedCorpus(max_tokens=20)
    for i in range(10):
        corpus.add(None, [100 + i] * 2 + [i] * 4)
        assert corpus.retained <= 20
        assert len(corpus.index(None)) <= 20 + 20 // 4 + 7
    assert corpus.index(None).match([109, 109]) is not None  # the newest is kept
    assert corpus.index(None).match([100, 100]) is None  # the oldest went


def test_namespaces_share_the_budget_but_not_their_text():
    corpus = SharedCorpus(max_tokens=30)
    corpus.add("a", [1, 2, 3, 4])
    corpus.add("b", [5, 6, 7, 8])
    assert corpus.index("a").match([3]) is not None
    assert corpus.index("a").match([6]) is None
    assert corpus.index(None) is None
    for _ in range(10):
        corpus.add("b", [9, 9, 9, 9])
    assert corpus.retained <= 30
    assert corpus.index("a") is None  # its only sequence was the oldest: evicted


def test_shared_corpus_off_keeps_nothing():
    corpus = SharedCorpus(max_tokens=0)
    corpus.add(None, [1, 2, 3])
    assert corpus.index(None) is None
