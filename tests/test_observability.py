"""Observability and per-request control on the real engine: the plugin's log lines, its
Prometheus metrics next to vLLM's, and per-request options, through `LLM` and through the OpenAI
server (a subprocess queried with `openai` and plain HTTP), each started with INFO logging."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.test_server import free_port, metric_samples, server_command, serving

pytestmark = pytest.mark.engine

SPEC = {"method": "lookahead", "num_speculative_tokens": 6, "lookahead": {"ngram_size": 3}}
STARTUP_LINE = "Lookahead decoding: LookaheadConfig(ngram_size=3"


def info_env() -> dict[str, str]:
    env = os.environ.copy()
    env["VLLM_LOGGING_LEVEL"] = "INFO"
    # What users have: no insecure serialization (the offline reader must not need it).
    env.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    return env


# --- the OpenAI server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(server_command(tiny_model, port, "--speculative-config", json.dumps(SPEC)),
                 port, log, env=info_env()):
        yield port, log


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def total(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= ls)


def settled(port: int, timeout: float = 60) -> dict:
    """/metrics once the lookahead counters have caught up with vLLM's (the worker writes its
    exact totals when the engine goes idle)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = metric_samples(port)
        ours = total(samples, "vllm:lookahead_accepted_tokens_total")
        vllms = total(samples, "vllm:spec_decode_num_accepted_tokens_total")
        if (ours == vllms and total(samples, "vllm:lookahead_live_requests") == 0) \
                or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_server_log_shows_the_lookahead_lines(server, client, model_name, prompts):
    client.completions.create(model=model_name, prompt=prompts[0], max_tokens=8, temperature=0)
    text = server[1].read_text()
    # front-end: the translation; EngineCore (the CPU worker runs in it): the proposer start-up
    assert "method 'lookahead' -> custom_class vllm_lookahead.proposer.LookaheadProposer" in text
    (line,) = [x for x in text.splitlines() if STARTUP_LINE in x]
    assert "window_size=4" in line and "num_speculative_tokens=6" in line
    assert "INFO" in line and "[proposer.py:" in line  # vLLM's own format


def test_server_exports_lookahead_metrics_consistent_with_vllms(server, client, model_name,
                                                                prompts):
    port = server[0]
    for prompt in prompts[:6]:
        client.completions.create(model=model_name, prompt=prompt, max_tokens=32, temperature=0,
                                  extra_body={"ignore_eos": True})
    samples = settled(port)
    accepted = total(samples, "vllm:lookahead_accepted_tokens_total")
    assert accepted > 0
    assert accepted == total(samples, "vllm:spec_decode_num_accepted_tokens_total")
    assert total(samples, "vllm:lookahead_verified_tokens_total") == \
        total(samples, "vllm:spec_decode_num_draft_tokens_total")
    assert total(samples, "vllm:lookahead_draft_tokens_total", source="jacobi") > 0
    assert total(samples, "vllm:lookahead_proposer_seconds_total") > 0
    assert total(samples, "vllm:lookahead_chain_length_count") == \
        total(samples, "vllm:lookahead_chains_total") > 0
    assert total(samples, "vllm:lookahead_live_requests") == 0
    # labelled like vLLM's own metrics
    ours = {ls for (n, ls) in samples if n == "vllm:lookahead_steps_total"}
    theirs = {ls for (n, ls) in samples if n == "vllm:spec_decode_num_accepted_tokens_total"}
    assert ours == theirs and len(ours) == 1
    assert dict(next(iter(ours)))["engine"] == "0"
    (info,) = [dict(ls) for (n, ls) in samples if n == "vllm:lookahead_config_info"]
    assert (info["ngram_size"], info["num_speculative_tokens"]) == ("3", "6")


@pytest.mark.parametrize("xargs", [
    {"lookahead_num_speculative_tokens": 7},
    {"lookahead_enabled": 2},
    {"lookahead": '{"colour": 1}'},
    {"lookahead": "{not json"},
], ids=["above-K", "not-a-bool", "unknown-option", "bad-json"])
def test_a_bad_request_option_is_a_400_for_that_request_only(server, client, model_name, xargs):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model_name, prompt="the cat", max_tokens=4,
                                  extra_body={"vllm_xargs": xargs})
    assert err.value.status_code == 400
    message = err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
    assert "lookahead" in message
    if "lookahead_num_speculative_tokens" in xargs:
        assert "'num_speculative_tokens'=7 is out of range: valid range is [0, 6]" in message
    # the server keeps serving
    ok = client.completions.create(model=model_name, prompt="the cat", max_tokens=4,
                                   temperature=0,
                                   extra_body={"ignore_eos": True,
                                               "vllm_xargs": {"lookahead_enabled": 1}})
    assert ok.choices[0].finish_reason == "length"
    assert ok.usage.completion_tokens == 4


def test_chat_requests_are_checked_too(server, client, model_name):
    import openai

    with pytest.raises(openai.BadRequestError, match="unknown lookahead request option"):
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_body={"vllm_xargs": {"lookahead_colour": 1}})


def test_a_request_with_lookahead_off_gets_no_drafts(server, client, model_name, prompts):
    port = server[0]
    before = settled(port)
    client.completions.create(model=model_name, prompt=prompts[4], max_tokens=32, temperature=0,
                              extra_body={"ignore_eos": True,
                                          "vllm_xargs": {"lookahead_enabled": 0}})
    after = settled(port)
    # The proposer stepped for that request and its totals were read afterwards: the equalities
    # below are not two reads of one stale snapshot.
    steps = "vllm:lookahead_steps_total"
    assert total(after, steps) > total(before, steps)
    name = "vllm:lookahead_draft_tokens_total"
    assert total(after, name) == total(before, name)
    assert total(after, "vllm:spec_decode_num_draft_tokens_total") == \
        total(before, "vllm:spec_decode_num_draft_tokens_total")


# --- LLM (offline) --------------------------------------------------------------------------------

OFFLINE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    import vllm_lookahead

    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              speculative_config=json.loads(sys.argv[3]), disable_log_stats=False)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, greedy, use_tqdm=False)
    (stats,) = vllm_lookahead.engine_stats(llm)
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:lookahead_") or m.name.startswith("vllm:spec_decode_num"):
            key = m.name + ("{" + m.labels["source"] + "}" if "source" in m.labels else "")
            metrics[key] = getattr(m, "value", getattr(m, "count", None))
    bad = SamplingParams(max_tokens=4, extra_args={"lookahead": {"num_speculative_tokens": 99}})
    try:
        llm.generate(requests[:1], bad, use_tqdm=False)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    off = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                         extra_args={"lookahead": {"enabled": False}})
    out = llm.generate(requests[:1], off, use_tqdm=False)
    (after,) = vllm_lookahead.engine_stats(llm)
    print("RESULT " + json.dumps({"stats": stats, "metrics": metrics, "error": error,
                                  "after_bad": len(out[0].outputs[0].token_ids),
                                  "after": after}))
""")


@pytest.fixture(scope="module", params=["1", "0"], ids=["engine-process", "in-process"])
def offline(request, tiny_model, prompts):
    """`LLM` with its engine core in a process of its own (the default) and in the caller's."""
    env = {**info_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": request.param}
    proc = subprocess.run([sys.executable, "-c", OFFLINE, tiny_model, json.dumps(prompts[:8]),
                           json.dumps(SPEC)], capture_output=True, text=True, timeout=900,
                          env=env)
    output = proc.stdout + proc.stderr
    results = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and results, output[-5000:]
    return output, json.loads(results[0].removeprefix("RESULT "))


def test_llm_log_shows_the_lookahead_lines(offline):
    output, _ = offline
    assert "method 'lookahead' -> custom_class" in output
    assert STARTUP_LINE in output


def test_llm_reads_the_counters_without_insecure_serialization(offline):
    _, result = offline
    stats, metrics = result["stats"], result["metrics"]
    assert stats["accepted_tokens"] > 0
    assert stats["accepted_tokens"] == metrics["vllm:spec_decode_num_accepted_tokens"]
    assert stats["verified_tokens"] == metrics["vllm:spec_decode_num_draft_tokens"]
    assert stats["chain_length_counts"][0] == 0 and sum(stats["chain_length_counts"]) > 0
    # LLM.get_metrics() shows them too, next to vLLM's
    by_source = sum(v for k, v in metrics.items()
                    if k.startswith("vllm:lookahead_accepted_tokens{"))
    assert by_source == stats["accepted_tokens"]
    assert metrics["vllm:lookahead_steps"] == stats["steps"]


def test_llm_generate_raises_for_a_bad_request_option_and_keeps_working(offline):
    _, result = offline
    assert result["error"] == (
        "LookaheadRequestError: lookahead request option 'num_speculative_tokens'=99 is out of "
        "range: valid range is [0, 6] (the engine's num_speculative_tokens is 6)")
    assert result["after_bad"] == 32


def test_llm_request_with_lookahead_off_gets_no_drafts(offline):
    _, result = offline
    # The proposer stepped for the request with lookahead off, and drafted nothing for it.
    assert result["after"]["steps"] > result["stats"]["steps"]
    assert result["after"]["draft_tokens"] == result["stats"]["draft_tokens"]
