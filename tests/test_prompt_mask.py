"""Prompt positions without a token id (prompt_embeds, multimodal placeholders): the mask that
`engine_requests` builds from vLLM's request state, and the token array the drafter then reads (no
engine; the end-to-end check with prompt_embeds is in test_features.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_lookahead import engine_requests


def state(**kw):
    fields = {"prompt_token_ids": [5, 6, 7, 8], "prompt_is_token_ids": None, "mm_features": [],
              "num_prompt_tokens": 4}
    return SimpleNamespace(**{**fields, **kw})


def mm(offset, length, is_embed=None):
    return SimpleNamespace(mm_position=SimpleNamespace(offset=offset, length=length,
                                                       is_embed=is_embed))


def test_a_prompt_of_token_ids_needs_no_mask():
    assert engine_requests.prompt_mask(state()) is None


def test_a_request_state_without_the_fields_the_mask_reads_fails_rather_than_unmasking():
    # vllm_boundary checks these fields before any hook is installed; should one still be
    # missing, the step fails instead of letting stale ids into drafts.
    without = {"prompt_token_ids": [5, 6], "mm_features": [], "num_prompt_tokens": 2}
    with pytest.raises(AttributeError, match="prompt_is_token_ids"):
        engine_requests.prompt_mask(SimpleNamespace(**without))


def test_prompt_embeds_mask_every_prompt_position():
    mask = engine_requests.prompt_mask(state(prompt_token_ids=None))
    assert mask is not None and mask.tolist() == [False] * 4


def test_mixed_prompts_follow_prompt_is_token_ids():
    mask = engine_requests.prompt_mask(state(prompt_is_token_ids=[True, False, False, True]))
    assert mask is not None and mask.tolist() == [True, False, False, True]


def test_multimodal_placeholders_are_masked_where_embeddings_go():
    whole = engine_requests.prompt_mask(state(mm_features=[mm(1, 2)]))
    assert whole is not None and whole.tolist() == [True, False, False, True]
    # is_embed: only these positions of the range take the encoder's output (the others are
    # real tokens such as an image-start marker)
    partial = engine_requests.prompt_mask(
        state(mm_features=[mm(0, 3, torch.tensor([False, True, True]))]))
    assert partial is not None and partial.tolist() == [True, False, False, True]


def test_the_mask_is_cached_on_the_request_state():
    s = state(prompt_token_ids=None)
    first = engine_requests.prompt_mask(s)
    s.prompt_token_ids = [1, 2, 3, 4]  # not re-read: a request's prompt never changes
    assert engine_requests.prompt_mask(s) is first
    plain = state()
    assert engine_requests.prompt_mask(plain) is None
    plain.prompt_token_ids = None  # would need a mask if it were read again
    assert engine_requests.prompt_mask(plain) is None  # the cached "no mask" reads as None


def runner(states, embeds=True):
    return SimpleNamespace(enable_prompt_embeds=embeds, supports_mm_inputs=False,
                           requests=states)


def test_the_drafter_reads_minus_one_at_masked_positions_and_vllms_buffer_is_untouched():
    # Row 0 holds stale ids from whatever request had the row before (the runner never writes
    # prompt positions that came from prompt_embeds); row 1 is a plain prompt.
    buffer = np.arange(100, 100 + 3 * 16, dtype=np.int32).reshape(3, 16)
    before = buffer.copy()
    states = {"a": state(prompt_token_ids=None), "b": state()}
    num_tokens = np.array([6, 9, 0], dtype=np.int32)
    tokens = engine_requests.drafter_token_ids(runner(states), buffer, num_tokens, ["a", "b"])
    assert np.array_equal(buffer, before)
    assert tokens.shape == (2, 9)  # the batch's rows, up to its longest sequence
    assert tokens[0, :4].tolist() == [-1] * 4
    assert tokens[0, 4:6].tolist() == buffer[0, 4:6].tolist()  # generated tokens are real
    assert tokens[1].tolist() == buffer[1, :9].tolist()


def test_no_copy_without_masked_positions():
    buffer = np.zeros((2, 8), dtype=np.int32)
    num_tokens = np.array([4, 4], dtype=np.int32)
    plain = {"a": state(), "b": state()}
    assert engine_requests.drafter_token_ids(runner(plain), buffer, num_tokens,
                                             ["a", "b"]) is buffer
    # an engine that can take neither prompt_embeds nor multimodal input is not even looked at
    masked = {"a": state(prompt_token_ids=None)}
    assert engine_requests.drafter_token_ids(runner(masked, embeds=False), buffer, num_tokens,
                                             ["a"]) is buffer


def test_runner_requests_hand_the_mask_to_the_drafter():
    params = SimpleNamespace(extra_args=None, all_stop_token_ids={2}, max_tokens=None,
                             sampling_type=SimpleNamespace(name="GREEDY"), seed=None,
                             min_tokens=0)
    s = state(prompt_token_ids=None, sampling_params=params)
    r = SimpleNamespace(requests={"a": s},
                        input_batch=SimpleNamespace(num_prompt_tokens=np.array([4])))
    info = engine_requests.RunnerRequests(r).info(0, "a")
    assert info.prompt_mask is not None and not info.prompt_mask.any()
