"""The server soak (benchmarks/soak.py), shortened: 200 requests through the OpenAI server with
lookahead, 32 in flight, a tenth of the clients dropping their stream, a KV cache small enough
that requests are preempted and resumed; then the greedy ones replayed on a server without
speculation. Marked slow: `.ci/run` runs it, a plain `pytest` does not (`-m slow` to run it)."""

import json

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_soak_leaves_no_state_and_changes_no_output(tiny_model, tmp_path):
    from benchmarks import soak

    args = soak.parse_args([
        "--model", tiny_model, "--requests", "200", "--concurrency", "32",
        "--disconnect-rate", "0.1", "--num-gpu-blocks", "48", "--verify", "--warmup", "20",
        "--idle-after", "3", "--json", str(tmp_path / "soak.json")])
    result = soak.soak(args)
    print("\n".join(soak.summary(result)))
    outcomes = result["outcomes"]
    assert outcomes.get("failed", 0) == 0, result["failures"]
    assert outcomes.get("disconnected", 0) > 0
    assert outcomes.get("ok", 0) > 150
    assert result["health_failures"] == 0
    # nothing left behind: vLLM's queues and the proposer's per-request state are empty, the
    # shared corpus is within its budget
    assert result["requests_running_after"] == 0
    assert result["live_requests_after"] == 0
    assert 0 < result["shared_tokens_after"] <= result["shared_pool_tokens"]
    assert result["spec_accepted"] > 0
    # requests were preempted and resumed, and every completed greedy output is exact
    assert result["preemptions"] > 0
    assert result["verify"]["compared"] > 80
    assert result["verify"]["mismatches"] == 0, json.dumps(result["verify"])
