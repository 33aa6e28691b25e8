"""The harness's engine wrapper with two real vLLM engines loaded at once, as
`benchmarks.run --interleave` loads them."""

from pathlib import Path

from benchmarks import engine as eng
from tests.conftest import MAX_MODEL_LEN


def test_two_loaded_engines_each_count_their_own_drafts(tiny_model, prompts):
    cfg = eng.EngineConfig(model=Path(tiny_model), dtype="float32", max_model_len=MAX_MODEL_LEN,
                           max_num_seqs=2, seed=0, enforce_eager=True)
    params = eng.greedy(32, 0)
    # Built second, `none`'s engine is the one whose metrics vLLM leaves in Prometheus's
    # registry; the lookahead engine's must still be read from its own.
    with (eng.engine(cfg, {"method": "lookahead", "num_speculative_tokens": 4}) as lookahead,
          eng.engine(cfg, None) as none):
        start = {"lookahead": eng.read_counters(lookahead), "none": eng.read_counters(none)}
        eng.generate(lookahead, prompts[:2], params, 2)
        drafted = eng.read_counters(lookahead).minus(start["lookahead"])
        assert drafted.drafts > 0 and drafted.draft_tokens >= drafted.accepted > 0
        eng.generate(none, prompts[:2], params, 2)
        assert eng.read_counters(none).minus(start["none"]).drafts == 0
        # `none`'s run moved none of lookahead's counters.
        assert eng.read_counters(lookahead).minus(start["lookahead"]).drafts == drafted.drafts
