"""What drafting from its own tokens only costs a seeded request, in tokens per target forward.

    python -m benchmarks.seeded_cost [--model smollm2-135m] [--num-prompts 8] [--max-tokens 96]

The same sampled requests (temperature 0.7, top-p 0.9) through lookahead twice, on fresh engines:
without a seed (they draft as every request does: the learned acceptance, the shared corpus, the
batch-wide cut) and with one (by the acceptance prior, from no corpus, cut at a fixed reach). At
one request in flight and at `--concurrency`, after the same warm-up. Prints tokens per forward
and output tokens/s of each.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from benchmarks import engine as eng
from benchmarks.datasets import mixed_chat_prompts
from benchmarks.methods import builtin_methods
from benchmarks.models import DEFAULT_MODEL


def sampled(max_tokens: int, seed: int | None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens, seed=seed,
                          output_kind=RequestOutputKind.DELTA)


def measure(cfg: eng.EngineConfig, tokenizer: Any, prompts: Sequence[Sequence[int]],
            max_tokens: int, seeded: bool, concurrency: int) -> tuple[float, float]:
    """(tokens per forward, output tokens/s) of the prompts on a fresh lookahead engine."""
    with eng.engine(cfg, builtin_methods()["lookahead"]) as engine:
        eng.warm_up(engine, tokenizer, concurrency)
        # vLLM takes one SamplingParams per call here: a seed per request needs one call each,
        # and every request of a call shares it; distinct seeds per prompt would change nothing
        # the drafter does.
        batch = eng.generate(engine, prompts, sampled(max_tokens, 1234 if seeded else None),
                             concurrency)
    return batch.output_tokens / max(batch.forwards, 1), batch.output_tokens / batch.wall_s


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    eng.configure_env()
    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    prompts = mixed_chat_prompts(tokenizer, args.num_prompts)
    cfg = eng.EngineConfig(model, "float32",
                           eng.model_len_for(prompts, tokenizer, args.max_tokens),
                           max(args.concurrency, 1), 0, True)
    print(f"{args.model}, {len(prompts)} prompts, {args.max_tokens} tokens, T=0.7 top-p 0.9")
    print("| c | request | tokens per forward | output tokens/s |")
    print("|---|---|---|---|")
    for concurrency in (1, args.concurrency):
        for seeded in (False, True):
            per_forward, per_s = measure(cfg, tokenizer, prompts, args.max_tokens, seeded,
                                         concurrency)
            print(f"| {concurrency} | {'seeded' if seeded else 'unseeded'} | {per_forward:.2f} "
                  f"| {per_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
