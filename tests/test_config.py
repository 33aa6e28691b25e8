import pytest

from vllm_lookahead.config import (
    PROPOSER_CLASS,
    LookaheadConfig,
    LookaheadConfigError,
    translate_speculative_config,
)

VLLM_FIELDS = {"method", "model", "num_speculative_tokens", "rejection_sample_method",
               "disable_lookahead_block_hashes", "prompt_lookup_max"}


def translate(user):
    return translate_speculative_config(user, VLLM_FIELDS)


def test_defaults_give_k_from_ngram_and_window():
    spec, cfg = translate({"method": "lookahead"})
    assert spec == {"method": "custom_class", "model": PROPOSER_CLASS,
                    "num_speculative_tokens": 3 + 4}
    assert cfg == LookaheadConfig()


def test_k_alone_sets_the_window():
    spec, cfg = translate({"method": "lookahead", "num_speculative_tokens": 10})
    assert spec["num_speculative_tokens"] == 10
    assert cfg.window_size == 10 - (cfg.ngram_size - 1)


def test_nested_and_flat_parameters():
    _, nested = translate({"method": "lookahead",
                           "lookahead": {"ngram_size": 3, "guess_set_size": 2, "seed": 7}})
    _, flat = translate({"method": "lookahead", "lookahead_ngram_size": 3,
                         "lookahead_guess_set_size": 2, "lookahead-seed": 7})
    assert nested == flat
    assert (nested.ngram_size, nested.guess_set_size, nested.seed) == (3, 2, 7)


def test_vllm_fields_pass_through_untouched():
    spec, _ = translate({"method": "lookahead", "disable_lookahead_block_hashes": True})
    assert spec["disable_lookahead_block_hashes"] is True


@pytest.mark.parametrize(("user", "words"), [
    ({"lookahead_ngram_size": 1}, ["'ngram_size'=1", "[2, 16]"]),
    ({"num_speculative_tokens": 0}, ["'num_speculative_tokens'=0", "[3, 128]"]),
    ({"num_speculative_tokens": 129}, ["'num_speculative_tokens'=129", "[3, 128]"]),
    ({"num_speculative_tokens": 2}, ["'num_speculative_tokens'=2", "hold a candidate"]),
    ({"lookahead_ngram_size": "4"}, ["'ngram_size'", "must be an int", "'4'"]),
    ({"lookahead_window_size": 2.5}, ["'window_size'", "must be an int"]),
    ({"lookahead_ngram_size": True}, ["'ngram_size'", "must be an int"]),
    ({"lookahead_pool_from_prompt": 1}, ["'pool_from_prompt'", "must be a bool"]),
    ({"lookahead_colour": 1}, ["unknown lookahead parameter 'colour'"]),
    ({"lookahead": {"windw_size": 3}}, ["unknown lookahead parameter 'windw_size'"]),
    ({"ngram_size": 3}, ["unknown key 'ngram_size'", "lookahead_<name>"]),
    ({"lookahead": 5}, ["must be an object"]),
    ({"lookahead": {"seed": 1}, "lookahead_seed": 2}, ["'seed' is given twice"]),
    ({"rejection_sample_method": "synthetic"}, ["'synthetic' is lossy", "'standard'"]),
    ({"model": "some/draft-model"}, ["no draft model"]),
    ({"num_speculative_tokens": 9, "lookahead_window_size": 4},
     ["num_speculative_tokens=9", "window_size=4", "= 7"]),
])
def test_bad_configuration_names_parameter_value_and_range(user, words):
    with pytest.raises(LookaheadConfigError) as err:
        translate({"method": "lookahead", **user})
    for word in words:
        assert word in str(err.value)
