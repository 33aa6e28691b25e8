"""Every way a user asks for lookahead reaches the same validated config (no engine started)."""

import pytest

from vllm_lookahead.config import PROPOSER_CLASS, LookaheadConfigError


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, max_model_len=512, **kwargs).create_engine_config()


def test_llm_style_dict_becomes_custom_class_with_params(tiny_model):
    cfg = engine_config(tiny_model, speculative_config={
        "method": "lookahead", "lookahead": {"ngram_size": 5, "guess_set_size": 3}})
    spec = cfg.speculative_config
    assert spec.method == "custom_class"
    assert spec.model == PROPOSER_CLASS
    assert spec.num_speculative_tokens == 4 + 4
    assert spec.lookahead_params["ngram_size"] == 5
    assert spec.lookahead_params["guess_set_size"] == 3


def test_engine_args_can_build_the_config_twice(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_model, max_model_len=512,
                      speculative_config={"method": "lookahead", "num_speculative_tokens": 5})
    first = args.create_engine_config().speculative_config
    second = args.create_engine_config().speculative_config
    assert first.lookahead_params == second.lookahead_params
    assert args.speculative_config == {"method": "lookahead", "num_speculative_tokens": 5}


@pytest.mark.parametrize("argv", [
    ["--speculative-config", '{"method": "lookahead", "num_speculative_tokens": 6}'],
    ["--spec-method", "lookahead", "--spec-tokens", "6"],
])
def test_cli_flags(tiny_model, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", tiny_model, "--max-model-len", "512", *argv])
    spec = AsyncEngineArgs.from_cli_args(args).create_engine_config().speculative_config
    assert spec.method == "custom_class"
    assert spec.num_speculative_tokens == 6
    assert spec.lookahead_params["window_size"] == 3


def test_llm_fails_before_starting_an_engine(tiny_model):
    from vllm import LLM

    with pytest.raises(LookaheadConfigError, match=r"'num_speculative_tokens'=200 is out of range"):
        LLM(model=tiny_model, speculative_config={"method": "lookahead",
                                                  "num_speculative_tokens": 200})


def test_forced_v2_model_runner_is_refused(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(LookaheadConfigError, match="VLLM_USE_V2_MODEL_RUNNER"):
        engine_config(tiny_model, speculative_config={"method": "lookahead"})


def test_other_methods_are_untouched(tiny_model):
    spec = engine_config(tiny_model, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}).speculative_config
    assert spec.method == "ngram"
    assert not hasattr(spec, "lookahead_params")


def test_params_reach_a_worker_that_only_has_the_pickled_config(tiny_model, monkeypatch):
    """Ray ships the engine config to workers with cloudpickle, and a worker on another node has
    none of the driver's environment: the parameters must travel inside the config. (vLLM's CPU
    platform refuses Ray, so no Ray cluster runs here.)"""
    import pickle

    import cloudpickle

    from vllm_lookahead.config import PARAMS_ENV
    from vllm_lookahead.proposer import _config_for

    cfg = engine_config(tiny_model, speculative_config={
        "method": "lookahead", "lookahead": {"ngram_size": 5, "guess_set_size": 3}})
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        shipped = _config_for(pickle.loads(dumps(cfg)).speculative_config)
        assert (shipped.ngram_size, shipped.guess_set_size, shipped.window_size) == (5, 3, 4)
