"""What a request near max_model_len costs the rest of its batch.

vLLM 0.32 runs the proposer only while the batch's longest sequence plus K fits in
max_model_len; past that, for the whole batch, it skips the proposer and schedules K zero tokens
per request as drafts (verified and rejected). vllm-lookahead lifts that batch-wide gate
(`runner_hooks.lift_batch_length_gate`): its chains stop at max_model_len per request. This runs the
same batch (the tiny test model, greedy, float32, engine in-process) with and without requests that
run into max_model_len, with the gate lifted (as shipped) and with vLLM's gate, and prints engine
steps, tokens per step, zero drafts verified and the time.

    .venv/bin/python -m benchmarks.near_limit [--k 6] [--max-model-len 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    # The engine core and its worker in this process, so that the hook can be switched here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from benchmarks.tiny_model import make_prompts, tiny_model
    from vllm_lookahead import runner_hooks

    model = str(tiny_model())
    prompts = [p for p in make_prompts(AutoTokenizer.from_pretrained(model), n=40)
               if len(p) >= 8][:args.batch]
    long_prompts = [(prompts[i % len(prompts)] * 200)[:args.max_model_len - m]
                    for i, m in enumerate(args.near)]
    llm = LLM(model=model, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True,
              seed=0, max_num_seqs=args.batch + len(long_prompts), disable_log_stats=False,
              distributed_executor_backend="uni",  # the worker in this process too
              # No cross-request corpus: each cell sends the same prompts again, and recalling
              # the earlier cells' outputs would make every later cell faster.
              speculative_config={"method": "lookahead", "num_speculative_tokens": args.k,
                                  "lookahead": {"shared_pool_tokens": 0}})
    lift = runner_hooks.lift_batch_length_gate
    (runner,) = llm.collective_rpc(_runner)
    results = []
    try:
        # Warm-up (discarded): the acceptance and step-cost models learn online.
        _measure(llm, runner, prompts + long_prompts, args, SamplingParams)
        for near in (False, True):
            for gate in ("vllm", "lifted"):
                runner_hooks.lift_batch_length_gate = lift if gate == "lifted" else _keep_vllm_gate
                runner.effective_drafter_max_model_len = args.max_model_len
                batch = prompts + (long_prompts if near else [])
                results.append(_measure(llm, runner, batch, args, SamplingParams) |
                               {"gate": gate, "near_limit_requests": len(batch) - len(prompts)})
    finally:
        runner_hooks.lift_batch_length_gate = lift
    return results


def _runner(worker: Any) -> Any:
    return worker.model_runner


def _keep_vllm_gate(runner: Any) -> None:
    """vLLM's own behaviour, for comparison."""


def _counters(llm: Any, runner: Any) -> tuple[float, float, int]:
    steps = next((m.count for m in llm.get_metrics() if m.name == "vllm:iteration_tokens_total"),
                 0)
    vllm_drafts = next((m.value for m in llm.get_metrics()
                        if m.name == "vllm:spec_decode_num_draft_tokens"), 0)
    return float(steps), float(vllm_drafts), int(runner.drafter.drafter.stats.verified_tokens)


def _measure(llm: Any, runner: Any, batch: list[list[int]], args: argparse.Namespace,
             sampling_params: Any) -> dict[str, Any]:
    params = sampling_params(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    steps0, vllm0, ours0 = _counters(llm, runner)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    steps1, vllm1, ours1 = _counters(llm, runner)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = steps1 - steps0
    return {"requests": len(batch), "generated_tokens": tokens, "engine_steps": int(steps),
            "tokens_per_step": round(tokens / steps, 2) if steps else None,
            "zero_drafts_verified": int((vllm1 - vllm0) - (ours1 - ours0)),
            "seconds": round(seconds, 2),
            "outputs": [list(o.outputs[0].token_ids) for o in outs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="requests far from the limit")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--near", type=int, nargs="+", default=[24, 48, 72, 96, 120, 144],
                   help="room left (tokens) by each request that runs into max_model_len")
    args = p.parse_args(argv)
    results = run(args)
    print("| gate | near-limit requests | requests | tokens | engine steps | tokens/step | "
          "zero drafts verified | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['gate']} | {r['near_limit_requests']} | {r['requests']} | "
              f"{r['generated_tokens']} | {r['engine_steps']} | {r['tokens_per_step']} | "
              f"{r['zero_drafts_verified']} | {r['seconds']} |")
    same = {r["near_limit_requests"]: r["outputs"] for r in results if r["gate"] == "vllm"}
    exact = all(r["outputs"] == same[r["near_limit_requests"]] for r in results)
    print(f"outputs identical with the gate lifted and with vLLM's: {exact}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
