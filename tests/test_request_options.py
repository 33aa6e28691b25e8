"""Per-request lookahead options: parsing, the front-end check, the plumbing to the drafter (no
engine; the engine and server paths are in test_observability.py)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_lookahead.config import (
    PROPOSER_CLASS,
    LookaheadConfig,
    LookaheadConfigError,
    RequestOptions,
)
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.trajectory import RequestInfo


def test_no_options_are_the_defaults():
    assert RequestOptions.from_extra_args(None) == RequestOptions()
    assert RequestOptions.from_extra_args({"other_extension": 1}) == RequestOptions()
    assert RequestOptions() == RequestOptions(enabled=True, num_speculative_tokens=None,
                                              namespace=None, share=True)


def test_nested_flat_and_json_string_forms_agree():
    """Offline callers nest a dict; HTTP callers (vllm_xargs: strings, numbers and lists only,
    booleans turned into 0/1) give flat keys or a JSON string."""
    nested = RequestOptions.from_extra_args(
        {"lookahead": {"enabled": False, "num_speculative_tokens": 3, "namespace": "t"}})
    flat = RequestOptions.from_extra_args(
        {"lookahead_enabled": 0, "lookahead_num_speculative_tokens": 3,
         "lookahead_namespace": "t"})
    as_json = RequestOptions.from_extra_args(
        {"lookahead": '{"enabled": false, "num_speculative_tokens": 3, "namespace": "t"}'})
    assert nested == flat == as_json == RequestOptions(False, 3, "t", True)
    assert flat.enabled is False  # 0 became a real bool


def test_chain_budget_clamps_to_the_engine_k():
    assert RequestOptions().chain_budget(7) == 7
    assert RequestOptions(num_speculative_tokens=3).chain_budget(7) == 3
    assert RequestOptions(num_speculative_tokens=100).chain_budget(7) == 7
    assert RequestOptions(num_speculative_tokens=0).chain_budget(7) == 0
    assert RequestOptions(enabled=False, num_speculative_tokens=5).chain_budget(7) == 0


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        RequestOptions().enabled = False  # type: ignore[misc]


def test_front_end_check_raises_the_validation_error_vllm_answers_with_400():
    from vllm.exceptions import VLLMValidationError

    from vllm_lookahead.plugin import LookaheadRequestError, check_request_options

    assert check_request_options({"lookahead": {"num_speculative_tokens": 6}}, 6) == \
        RequestOptions(num_speculative_tokens=6)
    with pytest.raises(LookaheadRequestError) as err:
        check_request_options({"lookahead": {"num_speculative_tokens": 7}}, 6)
    assert isinstance(err.value, VLLMValidationError)
    assert isinstance(err.value, LookaheadConfigError)
    assert str(err.value) == ("lookahead request option 'num_speculative_tokens'=7 is out of "
                              "range: valid range is [0, 6] (the engine's num_speculative_tokens "
                              "is 6)")
    assert err.value.parameter == "vllm_xargs"


def _processor(method: str = "custom_class", model: str = PROPOSER_CLASS, k: int = 6):
    return SimpleNamespace(speculative_config=SimpleNamespace(
        method=method, model=model, num_speculative_tokens=k))


def test_the_validate_params_hook_checks_lookahead_engines_only():
    from vllm_lookahead.plugin import LookaheadRequestError, _with_request_check

    calls = []
    hooked = _with_request_check(lambda self, params, tasks: calls.append(params) or "vllm's")
    bad = SimpleNamespace(extra_args={"lookahead": {"enabled": "yes"}})
    with pytest.raises(LookaheadRequestError, match="'enabled' must be a bool"):
        hooked(_processor(), bad, ())
    assert calls == [bad]  # vLLM's own checks ran first
    # Not a lookahead engine, no speculation, or pooling params: nothing to check.
    assert hooked(_processor(method="ngram", model=None), bad, ()) == "vllm's"
    assert hooked(SimpleNamespace(speculative_config=None), bad, ()) == "vllm's"
    assert hooked(_processor(), SimpleNamespace(extra_kwargs={}), ()) == "vllm's"


def test_the_hook_is_installed_once_over_vllms_method():
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_lookahead.plugin import install_request_check

    install_request_check()
    hooked = InputProcessor._validate_params
    install_request_check()
    assert InputProcessor._validate_params is hooked
    assert not getattr(hooked.__wrapped__, "_vllm_lookahead_hook", False)


class FakeRunner:
    def __init__(self, extra_args):
        params = SimpleNamespace(extra_args=extra_args, all_stop_token_ids={2}, max_tokens=9,
                                 sampling_type=SimpleNamespace(name="GREEDY"), seed=None,
                                 min_tokens=0)
        state = SimpleNamespace(sampling_params=params, num_prompt_tokens=5,
                                prompt_token_ids=[1, 2, 3, 4, 5], prompt_is_token_ids=None,
                                mm_features=[])
        self.requests = {"r": state}
        self.input_batch = SimpleNamespace(num_prompt_tokens=np.array([5]))


def test_runner_requests_carry_the_options_to_the_drafter():
    from vllm_lookahead.engine_requests import RunnerRequests

    runner = FakeRunner({"lookahead": {"num_speculative_tokens": 2, "namespace": "t"}})
    info = RunnerRequests(runner).info(0, "r")
    assert info.options == RequestOptions(num_speculative_tokens=2, namespace="t")
    assert info.num_prompt_tokens == 5
    assert info.stop_token_ids == frozenset({2})
    assert info.max_new_tokens == 9  # the drafter sizes the request's text index for them
    assert RunnerRequests(FakeRunner(None)).info(0, "r").options == RequestOptions()


def test_a_bad_option_that_reaches_the_worker_falls_back_to_defaults():
    """Only if the front-end check did not run (a front-end without the plugin): the engine must
    not fail for one request's options."""
    from vllm_lookahead.engine_requests import RunnerRequests

    records = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.lookahead.engine_requests")
    log.addHandler(handler)
    try:
        info = RunnerRequests(FakeRunner({"lookahead": {"enabled": "yes"}})).info(0, "r")
    finally:
        log.removeHandler(handler)
    assert info.options == RequestOptions()
    assert any("'enabled' must be a bool" in r.getMessage() for r in records)


class _Requests:
    def __init__(self, options: RequestOptions) -> None:
        self.info_ = RequestInfo(owner=object(), num_prompt_tokens=4,
                                 stop_token_ids=frozenset(), options=options)

    def owner(self, req_id):
        return self.info_.owner

    def info(self, row, req_id):
        return self.info_


def _chain(options: RequestOptions, k: int = 6) -> list[int]:
    drafter = LookaheadDrafter(LookaheadConfig(ngram_size=3, window_size=k - 2), k, 1024)
    tokens = np.zeros((1, 64), dtype=np.int64)
    tokens[0, :5] = [7, 8, 9, 7, 8]
    (chain,) = drafter.draft_batch(["r"], [[8]], np.array([5]), tokens, None,
                                   _Requests(options))
    return chain


def test_the_drafter_honours_enabled_and_the_per_request_budget():
    assert _chain(RequestOptions(enabled=False)) == []
    assert _chain(RequestOptions(num_speculative_tokens=0)) == []
    full = _chain(RequestOptions())
    assert len(full) == 6
    # The budget cuts the chain the request would have had, not some other, shorter one.
    assert _chain(RequestOptions(num_speculative_tokens=2)) == full[:2]


def test_only_a_sampled_request_with_a_seed_counts_as_seeded():
    """A greedy request's tokens never depend on its seed, so it drafts as any other; a sampled
    one with a seed drafts from its own tokens only."""
    from vllm_lookahead.engine_requests import RunnerRequests

    def seeded(name, seed):
        runner = FakeRunner(None)
        params = runner.requests["r"].sampling_params
        params.sampling_type, params.seed = SimpleNamespace(name=name), seed
        return RunnerRequests(runner).info(0, "r").seeded

    assert seeded("RANDOM_SEED", 3) and not seeded("RANDOM", None)
    assert not seeded("GREEDY", 3)
