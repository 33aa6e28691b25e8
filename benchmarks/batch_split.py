"""Where a batch's time goes when all its requests arrive at once: their prefill, and the decode
after it, with lookahead drafting, with lookahead on but every request's drafting off, and without
speculation.

    python -m benchmarks.batch_split [--model qwen2.5-coder-1.5b] [--dtype bfloat16]
        [--batch 32] [--max-tokens 48] [--sets gsm8k,mtbench] [--rounds 2]

For each set, `--batch` prompts (taken after the first `--batch`, which other runs use) go to
the engine together, greedy with `ignore_eos`, first with max_tokens=1 (the prefill: every
request's first token) and then with `--max-tokens` (decode = that time minus the prefill's).
Each method runs on a fresh engine after the same warm-up, round after round, the order reversed
every other round. This is the shape of the harness's runs at c=32 with 32 prompts per set: one
wave, in which the prompts' prefill is the same work for every method.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import engine as eng
from benchmarks.datasets import chat_prompts
from benchmarks.labels import BASELINE
from benchmarks.methods import builtin_methods

LOOKAHEAD = builtin_methods()["lookahead"]
"""The harness's lookahead, at its K."""
DRAFTING_OFF = {"lookahead": {"enabled": False}}
METHODS: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = [
    (BASELINE, None, None),
    ("lookahead", LOOKAHEAD, None),
    ("lookahead, drafting off", LOOKAHEAD, DRAFTING_OFF),
]
"""Name, speculative config, per-request extra_args."""


def timed_batch(llm: Any, prompts: Sequence[Sequence[int]], max_tokens: int,
                extra_args: dict[str, Any] | None) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            extra_args=extra_args)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def measure(cfg: eng.EngineConfig, tokenizer: Any, prompts: dict[str, list[list[int]]],
            max_tokens: int, speculative_config: dict[str, Any] | None,
            extra_args: dict[str, Any] | None) -> dict[str, tuple[float, float]]:
    """Per set: (prefill seconds, decode seconds) on one fresh engine."""
    with eng.engine(cfg, speculative_config) as engine:
        eng.warm_up(engine, tokenizer, cfg.max_num_seqs)
        split = {}
        for name, batch in prompts.items():
            prefill = timed_batch(engine.llm, batch, 1, extra_args)
            whole = timed_batch(engine.llm, batch, max_tokens, extra_args)
            split[name] = (prefill, whole - prefill)
        return split


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--sets", default="gsm8k,mtbench")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    eng.configure_env()
    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    prompts = {name: chat_prompts(name, tokenizer, 2 * args.batch)[args.batch:]
               for name in args.sets.split(",")}
    every = [p for batch in prompts.values() for p in batch]
    cfg = eng.EngineConfig(model, args.dtype, eng.model_len_for(every, tokenizer, args.max_tokens),
                           args.batch, 0, True)
    print(f"{args.model}, {args.dtype}, {args.batch} prompts at once per set, "
          f"{args.max_tokens} new tokens, greedy, eager")
    print("| round | method | set | prefill s | decode s | total s |")
    print("|---|---|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        for name, config, extra in (METHODS if r % 2 else METHODS[::-1]):
            for set_name, (prefill, decode) in measure(cfg, tokenizer, prompts, args.max_tokens,
                                                        config, extra).items():
                print(f"| {r} | {name} | {set_name} | {prefill:.1f} | {decode:.1f} "
                      f"| {prefill + decode:.1f} |", flush=True)


if __name__ == "__main__":
    main()
