"""Tensor parallelism 2 on CPU (vLLM's mp executor: one worker process per rank) with lookahead,
offline and through the OpenAI server: outputs equal to no speculation, only the output rank
drafts, and statistics are counted once per engine, not once per rank.

vLLM uses the drafts of the executor's output rank only (tensor-parallel rank 0 of the last
pipeline stage; `take_draft_token_ids` replies from that rank, and the scheduler sends the drafts
to every rank with the next step), so the other ranks propose empty chains and keep no state.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import (
    first_difference,
    generate_tokens,
    greedy_params,
    make_llm,
    shutdown,
)
from tests.test_server import (
    GREEDY,
    free_port,
    metric_samples,
    sample_values,
    server_command,
    serving,
    token_ids,
)
from tests.worker_probes import drafts_digest, record_drafts
from vllm_lookahead.engine_requests import worker_stats

# Each rank's drafts are recorded by functions sent to the workers (`worker_probes`).
pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("functions_to_workers")]

SPEC = {"method": "lookahead", "num_speculative_tokens": 6, "lookahead": {"ngram_size": 3}}
N = 16


def rss_mib() -> float:
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


@pytest.fixture(scope="module")
def tp2_offline(tiny_model, prompts):
    """One TP=2 engine, its outputs, every rank's draft digest and counters, vLLM's counters."""
    # Two ranks on one NUMA node: vLLM's automatic binding gives rank N the N-th NUMA node.
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # read when the workers start
    t0 = time.monotonic()
    try:
        llm = make_llm(tiny_model, SPEC, tensor_parallel_size=2,
                       distributed_executor_backend="mp", max_num_seqs=16,
                       disable_log_stats=False)
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    start_s, rss = time.monotonic() - t0, rss_mib()
    try:
        assert llm.collective_rpc(record_drafts) == [True, True]
        out = generate_tokens(llm, prompts[:N], greedy_params())
        one_by_one = generate_tokens(llm, prompts[N:N + 4], greedy_params(), one_at_a_time=True)
        digests = llm.collective_rpc(drafts_digest)
        stats = llm.collective_rpc(worker_stats)
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
                   if m.name.startswith("vllm:spec_decode")}
        from vllm_lookahead import metrics as lookahead_metrics

        per_engine = lookahead_metrics.engine_stats(llm)
    finally:
        shutdown(llm)
    print(f"[figures] offline TP=2: start_s={start_s:.1f}, rss_mib={rss:.0f}")
    return {"out": out, "one_by_one": one_by_one, "digests": digests, "stats": stats,
            "metrics": metrics, "per_engine": per_engine}


def test_offline_tp2_outputs_and_statistics_once_per_engine(tp2_offline, baseline):
    r = tp2_offline
    assert first_difference(baseline[:N], r["out"]) is None
    assert first_difference(baseline[N:N + 4], r["one_by_one"]) is None
    stats = r["stats"]
    assert len(stats) == 2 and all(s is not None for s in stats)  # every rank has a proposer
    assert stats[0]["accepted_tokens"] > 0
    # vLLM counts the engine's tokens once (rank 0's drafts are the ones verified).
    assert r["metrics"]["vllm:spec_decode_num_accepted_tokens"] == stats[0]["accepted_tokens"]
    assert r["metrics"]["vllm:spec_decode_num_draft_tokens"] == stats[0]["verified_tokens"]
    # the package's per-engine export: one engine, one snapshot
    assert len(r["per_engine"]) == 1
    assert r["per_engine"][0]["accepted_tokens"] == stats[0]["accepted_tokens"]


def test_offline_tp2_only_the_output_rank_drafts(tp2_offline):
    """vLLM takes rank 0's drafts (take_draft_token_ids replies from the executor's output rank
    only); rank 1 is asked every step and proposes empty chains instead of work thrown away."""
    digests, stats = tp2_offline["digests"], tp2_offline["stats"]
    assert [d["rank"] for d in digests] == [0, 1]
    assert digests[0]["calls"] > 0
    assert digests[0]["calls"] == digests[1]["calls"]
    assert stats[0]["chains"] > 0 and stats[0]["draft_tokens"] > 0
    assert (stats[1]["chains"], stats[1]["draft_tokens"], stats[1]["steps"]) == (0, 0, 0)


@pytest.fixture(scope="module")
def tp2_server(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("tp2-server") / "server.log"
    # Two ranks on one NUMA node: vLLM's automatic binding gives rank N the N-th NUMA node.
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    t0 = time.monotonic()
    argv = server_command(tiny_model, port, "--tensor-parallel-size", "2",
                          "--distributed-executor-backend", "mp",
                          "--speculative-config", json.dumps(SPEC))
    with serving(argv, port, log, env=env) as proc:
        import psutil

        server = psutil.Process(proc.pid)
        rss = sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])
        print(f"[figures] server TP=2: ready_s={time.monotonic() - t0:.1f}, "
              f"rss_mib={rss / 2**20:.0f}")
        yield port


def test_server_tp2_matches_and_reports_once_per_engine(tp2_server, prompts, baseline):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{tp2_server}/v1", api_key="unused")
    model = client.models.list().data[0].id

    def complete(prompt):
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=48,
                                         temperature=0, extra_body=GREEDY)
        return token_ids(resp.choices[0])

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(complete, prompts[:8]))
    assert first_difference(baseline[:8], out) is None
    stream = client.completions.create(model=model, prompt=prompts[4], max_tokens=48,
                                       temperature=0, stream=True, extra_body=GREEDY)
    assert [t for c in stream for t in token_ids(c.choices[0])] == baseline[4]

    samples = metric_samples(tp2_server)
    accepted = sample_values(samples, "vllm:spec_decode_num_accepted_tokens_total")
    assert len(accepted) == 1 and accepted[0] > 0
    # The proposer's own metrics: one engine, not one per rank.
    engines = {dict(labels)["engine"] for name, labels in samples
               if name.startswith("vllm:lookahead_") and "engine" in dict(labels)}
    assert engines == {"0"}
