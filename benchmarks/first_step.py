"""What a request's first step costs with lookahead: its first token's latency against no
speculation's, and the proposer's share of that step.

    python -m benchmarks.first_step [--model smollm2-135m] [--num-prompts 12] [--rounds 3]

Each prompt (the harness's sets in turn, in the chat template) is sent alone with max_tokens=1,
so a request is exactly its prefill step: the latency from `generate` to its one token is the
engine's time to first token without a server in front. `none` and lookahead run on fresh
engines, round after round, the order reversed every other round, after the same warm-up. For
lookahead the proposer's own counters give what it spent in those steps (it indexes the whole
prompt there, and drafts from it for the token sampled). Prints one row per round and method.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import engine as eng
from benchmarks.datasets import mixed_chat_prompts
from benchmarks.labels import BASELINE
from benchmarks.methods import builtin_methods
from benchmarks.models import DEFAULT_MODEL

LOOKAHEAD = builtin_methods()["lookahead"]
"""The harness's lookahead, at its K."""


def one_token(seed: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, seed=seed)


def measure(cfg: eng.EngineConfig, tokenizer: Any, prompts: Sequence[Sequence[int]],
            speculative_config: dict[str, Any] | None) -> tuple[list[float], float | None]:
    """Each prompt's first-token latency (s) on a fresh engine, and for lookahead the
    proposer's seconds per step over those requests."""
    with eng.engine(cfg, speculative_config) as engine:
        eng.warm_up(engine, tokenizer, 1)
        before = eng.proposer_stats(engine.llm) if engine.lookahead else None
        latencies = []
        for prompt in prompts:
            start = time.perf_counter()
            engine.llm.generate([{"prompt_token_ids": list(prompt)}], one_token(cfg.seed),
                                use_tqdm=False)
            latencies.append(time.perf_counter() - start)
        after = eng.proposer_stats(engine.llm) if engine.lookahead else None
    if before is None or after is None:
        return latencies, None
    steps = after["steps"] - before["steps"]
    return latencies, (after["propose_seconds"] - before["propose_seconds"]) / max(steps, 1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    eng.configure_env()
    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    prompts = mixed_chat_prompts(tokenizer, args.num_prompts)
    cfg = eng.EngineConfig(model, "float32", eng.model_len_for(prompts, tokenizer, 1), 1, 0,
                           True)
    lengths = sorted(len(p) for p in prompts)
    print(f"{args.model}, {len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens (median "
          f"{statistics.median(lengths):.0f}), one at a time, max_tokens=1, float32, eager")
    print(f"| round | method | first token p50 ms | mean ms | x {BASELINE} (p50) "
          "| proposer ms per step |")
    print("|---|---|---|---|---|---|")
    methods: list[tuple[str, dict[str, Any] | None]] = [(BASELINE, None), ("lookahead", LOOKAHEAD)]
    for r in range(1, args.rounds + 1):
        measured = {name: measure(cfg, tokenizer, prompts, config)
                    for name, config in (methods if r % 2 else methods[::-1])}
        base = statistics.median(measured[BASELINE][0])
        for name, _ in methods:
            latencies, propose = measured[name]
            p50 = statistics.median(latencies)
            print(f"| {r} | {name} | {1000 * p50:.1f} | {1000 * statistics.mean(latencies):.1f} "
                  f"| {p50 / base:.3f} | {'-' if propose is None else f'{1000 * propose:.2f}'} |",
                  flush=True)


if __name__ == "__main__":
    main()
